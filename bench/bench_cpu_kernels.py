"""Per-tensor CPU kernel benchmark: the C backend vs the PyTorch reference vs the incumbent.

    python bench/bench_cpu_kernels.py --out bench/results/cpu_kernels.json
    python bench/bench_cpu_kernels.py --shapes 4096x4096,11008x4096 --repeats 5 --out ...

One Llama-2-7B-shaped fp16 tensor at a time (4096x4096 attention, 11008x4096 MLP,
32000x4096 embedding), a base and 2 fine-tunes, TIES-SV with density 0.2 and slack 0.05.
Contenders, measured side by side in one run on the same tensors:

* ``c``: fastmerge's C backend as the pipeline runs a tensor held in memory: exact
  thresholds by bracketing (select.bracket_thresholds: a strided sample, one
  c_backend.bracket pass, a partial sort of the keys inside; radix select if a bracket
  misses) plus the one fused merge pass (c_backend.merge). The parts are also timed on
  their own: ``c_thresholds`` (bracketing), ``c_thresholds_radix`` (radix select over
  c_backend.histogram, 3 passes: the path of streamed tensors and scope="model") and
  ``c_merge_pass``.
* ``reference``: radix select and the merge pass on fastmerge.reference (the "torch"
  backend).
* ``incumbent``: TIES as mergekit runs it, written here from its description (no mergekit
  code): per model τ in the storage dtype, k = int(density * numel), a full argsort of
  |τ| keeping exactly the top k, sign election by the sum of kept τ in the storage dtype,
  disjoint mean in the storage dtype, added to the base. (Plain TIES: it has no slack.)

Each contender runs ``--repeats`` times after one warm-up; rows report the median and the
20th / 80th percentiles in milliseconds, the C backend's speedup against the other two
(ratio of medians) and its effective bandwidth (bytes of base + models read once and the
output written once, per merged tensor, over the total time) next to a measured copy
bandwidth. Machine, versions, date and the load average (other processes on a small
machine skew timings; compare rows of one run) go in the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastmerge import reference  # noqa: E402
from fastmerge.backends import c_backend  # noqa: E402
from fastmerge.methods import METHODS  # noqa: E402

TIES_SV = METHODS["ties_sv"]
from fastmerge import select  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "32000x4096": (32000, 4096)}
DENSITY, SLACK, N_MODELS, DTYPE = 0.2, 0.05, 2, torch.float16


# ---------------------------------------------------------------------------------------
# contenders

def thresholds(backend, base, models):
    """Exact (t, u) as the pipeline finds them: bracketing if the backend has it, else
    (or when a bracket misses) radix select."""
    n, N = models.shape
    return select.thresholds(backend, select.Targets.of([DENSITY] * n, [SLACK] * n, N),
                             lambda: [(base, models)], (base, models))


def fastmerge_ties_sv(backend, base, models, out):
    """Exact thresholds, then the fused merge pass."""
    n, N = models.shape
    t, u = thresholds(backend, base, models)
    cfg = TIES_SV.kernel_config((1.0,) * n, 1.0, True, "sum", t, u)
    return backend.merge(base, models, out, cfg)


def incumbent_ties(base, models):
    """TIES the way mergekit computes it, everything in the storage dtype (see module doc)."""
    kept = []
    for m in models:
        tau = m - base
        k = int(DENSITY * tau.numel())
        order = torch.argsort(tau.abs().reshape(-1), descending=True)
        mask = torch.zeros(tau.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        kept.append(tau * mask.view_as(tau))
    kept = torch.stack(kept)
    gamma = torch.where(kept.sum(0) >= 0, 1.0, -1.0).to(kept.dtype)
    sel = torch.sign(kept) == gamma
    total = (kept * sel).sum(0)
    count = sel.sum(0).clamp(min=1).to(kept.dtype)
    return base + total / count


# ---------------------------------------------------------------------------------------
# measurement

def timings(fn, repeats: int) -> list[float]:
    fn()   # warm-up (page faults, allocator, thread pools)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summary(ms: list[float]) -> dict:
    q = np.percentile(ms, [20, 50, 80])
    return {"median_ms": round(float(q[1]), 3), "p20_ms": round(float(q[0]), 3),
            "p80_ms": round(float(q[2]), 3), "repeats": len(ms),
            "all_ms": [round(x, 3) for x in ms]}


def copy_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    """Single large torch copy (read + write), best of 5, GB/s of bytes moved."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = min(timings(lambda: dst.copy_(src), 5))
    return round(2 * nbytes / (best * 1e-3) / 1e9, 2)


def make_tensors(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(rows, cols, generator=g)).to(DTYPE)
    taus = [0.002 * torch.randn(rows, cols, generator=g), 0.004 * torch.randn(rows, cols, generator=g)]
    models = torch.stack([(base.float() + t).to(DTYPE) for t in taus[:N_MODELS]])
    return base, models


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        gcc = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    ext = c_backend._module()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "gcc": gcc, "fastmerge_commit": commit,
            "c_openmp": bool(ext.OPENMP), "c_isa_clones": ext.ISA_CLONES,
            "c_threads": c_backend.get_num_threads(), "torch_threads": torch.get_num_threads()}


def bench_shape(name: str, repeats: int, skip: set[str]) -> dict:
    rows, cols = SHAPES[name] if name in SHAPES else map(int, name.split("x"))
    base, models = make_tensors(rows, cols)
    flat_base, flat_models = base.reshape(-1), models.reshape(N_MODELS, -1)
    out = torch.empty_like(flat_base)
    N = flat_base.numel()
    contenders = {
        "c": lambda: fastmerge_ties_sv(c_backend, flat_base, flat_models, out),
        "c_thresholds": lambda: thresholds(c_backend, flat_base, flat_models),
        "c_thresholds_radix": lambda: select.find_thresholds(
            c_backend.histogram, lambda: [(flat_base, flat_models)],
            select.Targets.of([DENSITY] * N_MODELS, [SLACK] * N_MODELS, N)),
        "c_merge_pass": None,   # filled below with the real thresholds
        "reference": lambda: fastmerge_ties_sv(reference, flat_base, flat_models, out),
        "incumbent": lambda: incumbent_ties(base, models),
    }
    t, u = contenders["c_thresholds"]()
    assert (t, u) == contenders["c_thresholds_radix"](), "bracketing and radix select disagree"
    cfg = TIES_SV.kernel_config((1.0,) * N_MODELS, 1.0, True, "sum", t, u)
    contenders["c_merge_pass"] = lambda: c_backend.merge(flat_base, flat_models, out, cfg)

    row = {"shape": [rows, cols], "numel": N, "dtype": "float16", "n_models": N_MODELS,
           "method": "ties_sv", "density": DENSITY, "slack": SLACK, "results": {}}
    for label, fn in contenders.items():
        if label in skip:
            continue
        print(f"  {name} {label} ...", end="", flush=True)
        row["results"][label] = summary(timings(fn, repeats))
        print(f" median {row['results'][label]['median_ms']:.1f} ms", flush=True)
    res = row["results"]
    c = res["c"]["median_ms"]
    row["speedup_c_vs_incumbent"] = round(res["incumbent"]["median_ms"] / c, 2) if "incumbent" in res else None
    row["speedup_c_vs_reference"] = round(res["reference"]["median_ms"] / c, 2) if "reference" in res else None
    moved = (N_MODELS + 2) * N * 2   # base + models read, output written (fp16)
    row["c_effective_gbs"] = round(moved / (c * 1e-3) / 1e9, 2)
    row["c_merge_pass_gbs"] = round(moved / (res["c_merge_pass"]["median_ms"] * 1e-3) / 1e9, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/cpu_kernels.json",
                    help="JSON file to write (default: bench/results/cpu_kernels.json)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma-separated ROWSxCOLS (default: all three Llama-2-7B shapes)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per contender (default 5)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for the C kernels and torch (default: all cores)")
    ap.add_argument("--skip", default="", help="comma-separated contenders to leave out "
                    "(c_thresholds, c_thresholds_radix, c_merge_pass, reference, incumbent)")
    args = ap.parse_args(argv)

    reason = c_backend.unavailable_reason()
    if reason:
        print(f"C backend unavailable: {reason}", file=sys.stderr)
        return 2
    if args.threads:
        c_backend.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    if "c" in skip:
        ap.error("the C backend itself cannot be skipped")

    report = {"benchmark": "cpu_kernels",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "machine": machine(), "copy_bandwidth_gbs": copy_bandwidth_gbs(), "rows": []}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
          f"copy {report['copy_bandwidth_gbs']} GB/s")
    for name in args.shapes.split(","):
        report["rows"].append(bench_shape(name.strip(), args.repeats, skip))
        r = report["rows"][-1]
        print(f"{name}: C {r['results']['c']['median_ms']:.1f} ms, "
              f"x{r['speedup_c_vs_incumbent']} vs incumbent, x{r['speedup_c_vs_reference']} vs reference")
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
