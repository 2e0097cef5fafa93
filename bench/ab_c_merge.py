"""A/B of the C merge pass: this checkout's extension against another build, side by side.

    # build the other side, e.g. the commit before a kernel change, in a worktree:
    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace)
    python bench/ab_c_merge.py --other /tmp/old/fastmerge/_cmerge*.so \
        --out bench/results/ab_c_merge.json

Times the fused TIES-SV merge pass (thresholds fixed beforehand, 2 models, slack on)
of both builds on the same tensors, alternating A and B in every repeat so machine
noise hits both alike, for fp16, bf16 and fp32 inputs and outputs. Reports medians
and the ratio other / this. Either build may have the old call signature
(``mode`` strings, fp32 combine) or the current one (stage flags, fp64 combine).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
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
from fastmerge import select  # noqa: E402
from fastmerge.backends import c_backend  # noqa: E402


def load_ext(path: str):
    spec = importlib.util.spec_from_file_location("fastmerge_other._cmerge", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def call(ext, base, models, out, t, u, counts):
    """One merge pass through ``ext``, whichever signature it has."""
    code = {torch.float32: ext.F32, torch.float16: ext.F16, torch.bfloat16: ext.BF16}
    view = lambda x: (x.view(torch.int16) if x.dtype != torch.float32 else x).reshape(-1).numpy()
    n, N = models.shape
    args = (view(base), view(models), view(out), n, N, code[base.dtype], code[models.dtype],
            code[out.dtype])
    if hasattr(ext, "ELECT_SUM"):
        ext.merge(*args, True, ext.ELECT_SUM, True, (1.0,) * n, t, u, 1.0, counts)
    else:
        ext.merge(*args, "ties", (1.0,) * n, t, u, 1.0, True, False, counts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", required=True, help="path (or glob) of the other _cmerge build")
    ap.add_argument("--numel", type=int, default=11008 * 4096)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    other = load_ext(sorted(glob.glob(args.other))[0])
    this = c_backend._module()
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        base = (0.02 * torch.randn(args.numel, generator=g)).to(dtype)
        models = torch.stack([(base.float() + s * torch.randn(args.numel, generator=g)).to(dtype)
                              for s in (0.006, 0.002)])
        targets = select.Targets.of([0.2, 0.2], [0.0, 0.05], args.numel)
        t, u = select.thresholds(c_backend, targets, lambda: [(base, models)], (base, models))
        times = {"this": [], "other": []}
        outs = {k: torch.empty_like(base) for k in times}
        counts = {k: np.zeros((2, 7), np.int64) for k in times}
        for r in range(args.repeats + 1):
            for k, ext in (("this", this), ("other", other)) if r % 2 else (("other", other), ("this", this)):
                t0 = time.perf_counter()
                call(ext, base, models, outs[k], t, u, counts[k])
                if r:                                   # the first round warms up
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        same = torch.equal(outs["this"].view(-1), outs["other"].view(-1))
        row = {"dtype": str(dtype).replace("torch.", ""), "numel": args.numel,
               "this_ms": round(med["this"], 2), "other_ms": round(med["other"], 2),
               "this_over_other": round(med["this"] / med["other"], 3),
               "outputs_identical": bool(same),
               "counters_identical": bool((counts["this"] == counts["other"]).all())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "threads": c_backend.get_num_threads(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
