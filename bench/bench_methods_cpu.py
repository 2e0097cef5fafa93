"""Per-tensor cost of every method on the C backend, side by side with TIES.

    python bench/bench_methods_cpu.py --shapes 4096x4096,11008x4096 --repeats 5 \
        --out bench/results/methods_cpu.json

For each shape: an fp16 base and 2 fp16 models (SLERP: the base and 1 model) in memory.
Per method, the work its tensor takes once the inputs are read:

* ``pass``: what runs over the entries after any selection: the fused merge pass (TIES
  family, DARE, breadcrumbs; thresholds found beforehand; DELLA: with its rank stage,
  which the C pass runs itself, KernelConfig.rank_keep, plus the per-rank table on the
  host), or, for SLERP / NuSLERP / model stock, the combine pass;
* ``select``: what must run over the entries before it: the exact thresholds the trim
  needs (bracketing pass, as the pipeline does for a tensor in memory), for the methods
  that trim by magnitude; the statistics pass and the host coefficients for SLERP /
  NuSLERP / model stock (one read of the inputs each, as the selection of TIES);
* ``reads``: how many times the method's passes read the inputs (threshold selection
  included).

Methods alternate in every repeat (machine noise hits all alike); the medians and the
ratio of each method's ``pass`` to TIES's are reported, as JSON and a Markdown table.

``--other PATH``: another build of ``fastmerge._cmerge`` (e.g. the commit before a kernel
change, built in a worktree); every method it can run is then also timed on it, as
``method@other``, in the same alternation (an A/B in one run): ``nuslerp_columns`` with
the reference's statistics pass, DELLA only with ``--other-ranks`` (a build whose pass
ranks rows itself, ``rank_keep``: 2026-12-02 or later).
``--methods ...,nuslerp_columns@reference``: that method with the reference's statistics
pass (fastmerge.geometry.gram, torch) in place of the C one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmerge import della, geometry, methods, philox, select  # noqa: E402
from fastmerge.backends import c_backend as C  # noqa: E402
from fastmerge.params import TensorKnobs  # noqa: E402

METHODS = ["ties", "ties_sv", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
           "breadcrumbs_ties", "slerp", "nuslerp", "nuslerp_columns", "model_stock"]
DENSITY, SLACK, GAMMA = (0.2, 0.2), (0.0, 0.05), (0.01, 0.01)


def inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    base = (0.02 * torch.randn(n, generator=g)).half()
    models = torch.stack([(base.float() + s * torch.randn(n, generator=g)).half()
                          for s in (0.006, 0.002)])
    return base, models


def prepare(method: str, base, models, shape, gram=C.gram):
    """(select() -> None, run() -> None, reads) for one method on these inputs
    ("nuslerp_columns": NuSLERP with nuslerp_row_wise, one vector per column; ``gram``:
    the statistics pass to time, fastmerge.geometry.gram for "METHOD@reference")."""
    columns = method == "nuslerp_columns"
    spec = methods.get("nuslerp" if columns else method)
    out = torch.empty_like(base)
    n = models.shape[0]
    if spec.geometry:
        shape_rows = shape[1] if columns else base.numel()   # else the whole tensor: one vector
        if spec.geometry == "slerp":
            vecs, b, on_base = torch.stack([base, models[0]]), None, False
        else:
            vecs, b, on_base = models, base, True
        knobs = TensorKnobs((1.0, 2.0), (1.0,) * n, (0.0,) * n, 1.0, t=0.4)

        coef = {}

        def stats():       # the statistics pass and the host coefficients: "select"
            if columns:
                G = geometry.column_sums(gram(b, vecs, on_base, shape_rows, True).numpy())
            else:
                G = geometry.segment_sums(gram(b, vecs, on_base, shape_rows).numpy(), 1)
            coef["c"] = torch.from_numpy(geometry.coefficients(spec.geometry, G, knobs, n)[0])

        def run():         # the combine pass: the method's fused pass
            C.combine(b, vecs, out, coef["c"], shape_rows, columns, on_base)
        stats()
        return stats, run, 2
    state = {}
    if spec.thresholds:
        targets = (select.Targets.breadcrumbs(DENSITY, GAMMA, base.numel()) if spec.upper
                   else select.Targets.of(DENSITY, SLACK if "slack" in spec.knobs else (0, 0),
                                          base.numel()))

        def sel():
            state["tu"] = select.thresholds(C, targets, lambda: [(base, models)],
                                            (base, models), select.sample_keys(base, models))
        sel()
    else:
        def sel():
            return None
    drop = {}
    if spec.drop:
        drop = dict(density=(0.3, 0.3), key=philox.tensor_key(0, "w"))

    def run():
        t, u = state.get("tu", (None, None))
        knobs = dict(drop)
        if spec.upper:      # breadcrumbs: slot 1 of the selection is the upper bound h
            u, knobs["h"] = None, u
        if spec.ranked:     # DELLA: the per-rank table (host), ranked in the C pass
            knobs = dict(key=drop["key"], rank_keep=della.rank_table(
                shape[1], drop["density"], (0.15, 0.15)))
        cfg = spec.kernel_config((1.0, 1.0), 1.0, spec.normalize_default, "sum", t, u, **knobs)
        C.merge(base, models, out, cfg)
    return sel, run, (2 if spec.thresholds else 1)


def load_ext(path: str):
    spec = importlib.util.spec_from_file_location("fastmerge_other._cmerge", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def on_build(ext, fn):
    """fn with the C backend's calls going to the extension module ``ext``."""
    def run():
        saved = C._module
        C._module = lambda: ext
        try:
            fn()
        finally:
            C._module = saved
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--other", help="another build of fastmerge._cmerge (.so) to time too")
    ap.add_argument("--other-ranks", action="store_true",
                    help="the other build ranks DELLA's rows in its pass: time DELLA on it too")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    names = args.methods.split(",")
    other = load_ext(args.other) if args.other else None
    if other is not None:
        names += [f"{m}@other" for m in names
                  if "@" not in m and (args.other_ranks
                                       or not methods.get(m.replace("_columns", "")).ranked)]
    rows = []
    for shape_s in args.shapes.split(","):
        shape = tuple(int(x) for x in shape_s.split("x"))
        base, models = inputs(shape)
        prepared = {}
        for m in names:
            reference = m.endswith("@reference") or m == "nuslerp_columns@other"
            sel, run, reads = prepare(m.split("@")[0], base, models, shape,
                                      geometry.gram if reference else C.gram)
            if m.endswith("@other"):
                sel, run = on_build(other, sel), on_build(other, run)
            prepared[m] = (sel, run, reads)
        times = {m: {"pass": [], "select": []} for m in names}
        for r in range(args.repeats + 1):
            order = names if r % 2 else names[::-1]
            for m in order:
                sel, run, _ = prepared[m]
                t0 = time.perf_counter()
                sel()
                t1 = time.perf_counter()
                run()
                t2 = time.perf_counter()
                if r:                                   # round 0 warms up
                    times[m]["select"].append(t1 - t0)
                    times[m]["pass"].append(t2 - t1)
        ties = statistics.median(times["ties"]["pass"]) if "ties" in times else None
        for m in names:
            p = statistics.median(times[m]["pass"])
            rows.append({"shape": shape_s, "method": m, "pass_ms": round(1e3 * p, 2),
                         "select_ms": round(1e3 * statistics.median(times[m]["select"]), 2),
                         "reads": prepared[m][2],
                         "pass_vs_ties": round(p / ties, 3) if ties else None,
                         "pass_samples_ms": [round(1e3 * x, 2) for x in times[m]["pass"]]})
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": C.get_num_threads(), "torch": torch.__version__,
            "load_avg": os.getloadavg(), "other": args.other}
    print("| shape | method | pass ms | × TIES pass | select ms | reads |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['method']} | {r['pass_ms']} | {r['pass_vs_ties']} | "
              f"{r['select_ms'] or '–'} | {r['reads']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
