"""Command line: ``fastmerge merge CONFIG.yml OUTPUT_DIR``, ``fastmerge demo``, ``fastmerge verify DIR``."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .errors import FastmergeError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda[:i]")
    p.add_argument("--backend", default="auto", help="auto, triton, c or torch (reference)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastmerge", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge the checkpoints a YAML config names")
    m.add_argument("config", help="YAML config (mergekit format: merge_method, base_model, "
                                  "models, parameters, dtype)")
    m.add_argument("output", help="output folder (must not exist, unless --overwrite)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.add_argument("--shard-size", default="5GB", help="largest shard (default 5GB)")
    m.add_argument("--allow-pickle", action="store_true",
                   help="also read .bin/.pt checkpoints, with torch.load(weights_only=True)")
    m.add_argument("--allow-nonfinite", action="store_true",
                   help="merge tensors holding NaN/Inf instead of stopping")
    m.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge into OUTPUT_DIR from its verified "
                        "completed shards")
    _common(m)

    v = sub.add_parser("verify", help="check a finished output: index, shard headers, and "
                                      "each shard's sha256 against the report")
    v.add_argument("output", help="merged checkpoint folder")

    d = sub.add_parser("demo", help="build small Llama-shaped base/CT/SFT checkpoints in a "
                                    "temp folder, merge them with TIES-SV, print the report")
    d.add_argument("--preset", default="tiny", help="checkpoint size: tiny, small, 1b, 7b")
    d.add_argument("--workdir", default=None, help="keep the checkpoints here (default: temp)")
    d.add_argument("--density", type=float, default=0.2)
    d.add_argument("--slack", type=float, default=0.05)
    _common(d)
    return ap


def cmd_merge(args) -> int:
    from .api import merge
    from .config import load_config
    from .report import summary

    kwargs = load_config(args.config)
    gc.freeze()   # the import-time objects (PyTorch's) need no more garbage collection scans
    t0 = time.perf_counter()
    result = merge(**kwargs, output=args.output, overwrite=args.overwrite,
                   shard_size=args.shard_size, allow_pickle=args.allow_pickle,
                   allow_nonfinite=args.allow_nonfinite, resume=args.resume,
                   device=args.device,
                   backend=args.backend, progress=not args.no_progress)
    print(summary(result.report))
    print(f"wrote {result.path} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args) -> int:
    from .api import merge
    from .report import summary
    from .testing import PRESETS, write_llama_family

    if args.preset not in PRESETS:
        raise SystemExit(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    with tempfile.TemporaryDirectory(prefix="fastmerge-demo-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = write_llama_family(root / "inputs", config=PRESETS[args.preset], n_models=2,
                                   names=("base", "ct", "sft"))
        print(f"built base + CT + SFT checkpoints ({args.preset}) in "
              f"{time.perf_counter() - t0:.1f} s under {root / 'inputs'}")
        t0 = time.perf_counter()
        result = merge(paths["base"], paths["models"], method="ties_sv", density=args.density,
                       slack=args.slack, output=root / "merged", overwrite=True,
                       device=args.device, backend=args.backend,
                       progress=not args.no_progress)
        print(f"merged with TIES-SV (density {args.density}, slack {args.slack}) in "
              f"{time.perf_counter() - t0:.2f} s -> {result.path}")
        print(summary(result.report))
        totals = result.report.get("totals", [])
        print(json.dumps({"totals": totals}, indent=2))
    return 0


def cmd_verify(args) -> int:
    from .verify import verify_output

    s = verify_output(args.output)
    print(f"ok: {s['path']}: {s['shards']} shards, {s['tensors']} tensors, {s['bytes']:,} "
          "bytes; index, headers and sha256 match the report")
    return 0


def main(argv=None) -> int:
    # This process runs fastmerge's kernels and little else: OpenMP threads that spin after
    # every parallel region (libgomp's default) only take CPU from the reader and writer
    # threads. OpenMP reads this once, when PyTorch loads it (not yet: fastmerge and this
    # module import it lazily); a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = _parser().parse_args(argv)
    try:
        return {"merge": cmd_merge, "demo": cmd_demo, "verify": cmd_verify}[args.command](args)
    except FastmergeError as exc:
        print(f"fastmerge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
