"""What DELLA's rank stage costs (docs/spec.md §8d), against the fused pass it feeds.

    python bench/della_rank_stage.py --shapes 4096x4096 --repeats 5 \
        --out bench/results/della_rank_stage.json

Per tensor (fp16, 2 models, density 0.4, epsilon 0.15): the rank stage in torch
(``fastmerge.della.keep_thresholds``: a stable sort per row, then T = ⌊p·2^32⌋), the C
fused pass of ``della`` fed with those thresholds, and for scale the C pass of
``dare_ties`` at the same density (no rank stage, one threshold per model). Timings
alternate in every repeat so machine noise hits all alike; medians in ms.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmerge import della, methods, philox  # noqa: E402
from fastmerge.backends import c_backend  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


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

        def rank():
            holder["keep"] = della.keep_thresholds(base, models, shape, dens, eps)

        def fused_della():
            cfg = methods.METHODS["della"].kernel_config((1.0, 1.0), 1.0, True, "sum",
                                                         keep=holder["keep"], key=key)
            c_backend.merge(base, models, out, cfg)

        def fused_dare():
            cfg = methods.METHODS["dare_ties"].kernel_config((1.0, 1.0), 1.0, True, "sum",
                                                             density=dens, key=key)
            c_backend.merge(base, models, out, cfg)

        rank()
        fused_della()
        fused_dare()
        times = {"rank_stage": [], "della_fused": [], "dare_ties_fused": []}
        for _ in range(args.repeats):
            times["rank_stage"].append(timed(rank))
            times["della_fused"].append(timed(fused_della))
            times["dare_ties_fused"].append(timed(fused_dare))
        row = {"shape": list(shape), "dtype": "float16", "n_models": 2,
               **{k: statistics.median(v) for k, v in times.items()}, "all_ms": times}
        rows.append(row)
        print(f"{spec}: rank stage {row['rank_stage']:.0f} ms, della fused "
              f"{row['della_fused']:.0f} ms, dare_ties fused {row['dare_ties_fused']:.0f} ms")
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python", *sys.argv]),
           "load_average": os.getloadavg(),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "c_threads": c_backend.get_num_threads() if hasattr(c_backend, "get_num_threads")
           else None, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
