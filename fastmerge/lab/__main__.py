"""``python -m fastmerge.lab [--smoke] [--out DIR] [--seeds 0 1 2 3 4] [--jobs 3]``:
the experiment of docs/lab.md, then its analysis (fastmerge.lab.why). Needs the ``lab``
extra (transformers, tokenizers, matplotlib)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

from . import why
from .run import Settings, main


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmerge.lab", description=__doc__)
    ap.add_argument("--smoke", action="store_true",
                    help="one seed, one budget, a few training steps (minutes; CI)")
    ap.add_argument("--out", default="lab-results", help="output folder (results.json, PNGs)")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2 3 4)")
    ap.add_argument("--jobs", type=int, default=3,
                    help="seeds run in parallel, one process and one thread each (default 3)")
    ap.add_argument("--models", help="keep each seed's base, SFT and CT models here "
                                     "(default: a temporary folder, removed at the end)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the plots and tables from OUT/results.json")
    args = ap.parse_args(argv)
    if args.replot:
        import json
        from pathlib import Path
        from .run import plot, tables
        path = Path(args.out, "results.json")
        results = json.loads(path.read_text())
        results["plots"] = [Path(p).name for p in plot(results, args.out)]
        path.write_text(json.dumps(results, indent=1))
        Path(args.out, "results.md").write_text(tables(results))
        return 0
    s = Settings.smoke_settings() if args.smoke else Settings()
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(args.seeds))
    with tempfile.TemporaryDirectory(prefix="fastmerge-lab-") as tmp:
        models = args.models or tmp
        main(s, args.out, log=lambda m: print(m, flush=True), jobs=args.jobs,
             models_dir=models)
        why.main(models, args.out, s, jobs=args.jobs)   # why.json / why.md
    print(f"wrote {args.out}/results.json, results.md, why.json, why.md and the plots",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
