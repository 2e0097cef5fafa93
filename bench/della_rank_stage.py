"""What DELLA's rank stage costs (docs/spec.md §8d), against the fused pass it feeds.

    python bench/della_rank_stage.py --shapes 4096x4096 --repeats 5 \
        --out bench/results/della_rank_stage.json

Per tensor (fp16, 2 models, density 0.4, epsilon 0.15), each step as the pipeline runs it:

* ``rank_stage``: the rank stage in torch (``fastmerge.della.keep_thresholds``: a sort
  per row, then T = ⌊p·2^32⌋), what the torch and Triton backends still get;
* ``della_fused``: the C pass of ``della`` fed those per-entry thresholds (KernelConfig.keep);
* ``della_c_ranked``: the C pass of ``della`` that ranks the rows itself (KernelConfig.rank_keep,
  the per-rank table; what the pipeline runs on the C backend): rank stage + merge;
* for scale, the C passes of ``dare_ties`` at the same density (no ranks, one threshold
  per model) and of ``ties`` (thresholds found beforehand, not timed);
* the sort floor: numpy's sort (x86-simd-sort, AVX-512 where the CPU has it) of the same
  rows of both models, 16 rows at a time in a reused buffer: the keys ``bits(|τ_i|)``
  packed with their index as ``key·2^32 + index`` (what an exact rank with ties by index
  needs), and the bare 32-bit keys (less than a rank needs). One thread; in the JSON also
  as ns per entry and model, next to the C passes run with one thread (``*_1t``): the
  rank stage's budget under the issue's 1.3× goal is 0.3× the TIES pass.

Timings alternate in every repeat so machine noise hits all alike; medians in ms.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmerge import della, methods, philox, select  # noqa: E402
from fastmerge.backends import c_backend  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def np_avx512() -> bool:
    """Whether numpy sees AVX-512 (Skylake-X set), which its sort dispatches on."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return False
    return bool(__cpu_features__.get("AVX512_SKX"))


def sort_rows(a: np.ndarray, batch: int = 16) -> None:
    """np.sort every row of ``a``, ``batch`` rows at a time in one reused buffer (cache
    resident, as the C pass's row scratch is; no fresh allocation to fault in)."""
    buf = np.empty((batch, a.shape[1]), a.dtype)
    for r in range(0, a.shape[0], batch):
        b = buf[:min(batch, a.shape[0] - r)]
        b[...] = a[r:r + batch]
        b.sort(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    g = torch.Generator().manual_seed(0)
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.split("x"))
        N = shape[0] * shape[1]
        base = (0.02 * torch.randn(N, generator=g)).half()
        models = (base.float() + 0.003 * torch.randn(2, N, generator=g)).half()
        out = torch.empty(N, dtype=torch.float16)
        key = philox.tensor_key(0, "w")
        dens, eps = (0.4, 0.4), (0.15, 0.15)
        holder = {}
        table = della.rank_table(shape[1], dens, eps)
        targets = select.Targets.of(dens, (0, 0), N)
        t, _ = select.thresholds(c_backend, targets, lambda: [(base, models)], (base, models),
                                 select.sample_keys(base, models))

        def c_pass(method, **kw):
            cfg = methods.METHODS[method].kernel_config((1.0, 1.0), 1.0, True, "sum", **kw)
            return lambda: c_backend.merge(base, models, out, cfg)

        def rank():
            holder["keep"] = della.keep_thresholds(base, models, shape, dens, eps)

        def fused_della():
            c_pass("della", keep=holder["keep"], key=key)()

        keys = (models.float() - base.float()).abs().view(torch.int32).numpy()
        keys = keys.view(np.uint32).reshape(2 * shape[0], shape[1])
        packed = keys.astype(np.uint64) << np.uint64(32) | np.arange(shape[1], dtype=np.uint64)

        def one_thread(fn):
            def run():
                threads = c_backend.get_num_threads()
                c_backend.set_num_threads(1)
                try:
                    fn()
                finally:
                    c_backend.set_num_threads(threads)
            return run

        steps = {"rank_stage": rank, "della_fused": fused_della,
                 "della_c_ranked": c_pass("della", rank_keep=table, key=key),
                 "dare_ties_fused": c_pass("dare_ties", density=dens, key=key),
                 "ties_fused": c_pass("ties", t=t),
                 "della_c_ranked_1t": one_thread(c_pass("della", rank_keep=table, key=key)),
                 "dare_ties_fused_1t": one_thread(c_pass("dare_ties", density=dens, key=key)),
                 "ties_fused_1t": one_thread(c_pass("ties", t=t)),
                 "numpy_sort_packed": lambda: sort_rows(packed),
                 "numpy_sort_keys": lambda: sort_rows(keys)}
        for fn in steps.values():
            fn()
        times = {k: [] for k in steps}
        for _ in range(args.repeats):
            for k, fn in steps.items():
                times[k].append(timed(fn))
        row = {"shape": list(shape), "dtype": "float16", "n_models": 2,
               **{k: statistics.median(v) for k, v in times.items()}, "all_ms": times}
        row["torch_stage_plus_pass"] = row["rank_stage"] + row["della_fused"]
        row["speedup_vs_torch_stage"] = row["torch_stage_plus_pass"] / row["della_c_ranked"]
        row["c_ranked_vs_ties"] = row["della_c_ranked"] / row["ties_fused"]
        row["c_ranked_vs_dare_ties"] = row["della_c_ranked"] / row["dare_ties_fused"]
        per = 1e6 / (2 * N)       # ms of the whole tensor -> ns per entry and model
        row["ns_per_entry_model_1t"] = {
            "ties_pass": row["ties_fused_1t"] * per,
            "dare_ties_pass": row["dare_ties_fused_1t"] * per,
            "della_pass": row["della_c_ranked_1t"] * per,
            "della_rank_stage": (row["della_c_ranked_1t"] - row["dare_ties_fused_1t"]) * per,
            "rank_budget_at_1_3x_ties": 0.3 * row["ties_fused_1t"] * per,
            "numpy_sort_packed": row["numpy_sort_packed"] * per,
            "numpy_sort_keys": row["numpy_sort_keys"] * per}
        rows.append(row)
        print(f"{spec}: " + ", ".join(f"{k} {row[k]:.1f} ms" for k in steps) +
              f"; torch stage + pass / C ranked {row['speedup_vs_torch_stage']:.1f}x, "
              f"C ranked / ties {row['c_ranked_vs_ties']:.2f}, "
              f"/ dare_ties {row['c_ranked_vs_dare_ties']:.2f}")
        print("  ns per entry and model, one thread: " + ", ".join(
            f"{k} {v:.2f}" for k, v in row["ns_per_entry_model_1t"].items()))
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python", *sys.argv]),
           "load_average": os.getloadavg(),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "numpy": np.__version__, "numpy_avx512_skx": bool(np_avx512()),
           "c_threads": c_backend.get_num_threads() if hasattr(c_backend, "get_num_threads")
           else None, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
