"""Extended-vocabulary merge vs the same-vocabulary merge, end to end on the CPU.

    python bench/bench_vocab.py --preset 1b --workdir /tmp/fm-vocab \
        --out bench/results/e2e_vocab_1b.json

Builds (or reuses) two Llama-shaped fp16 trios with fastmerge.testing, with the same
weights outside the vocabulary rows: ``same/`` (base, CT, SFT of the base's vocabulary)
and ``ext/`` (the CT extends the base's vocabulary by ``--new-tokens`` tokens of a
second script, 24,724 by default: a 56,724-token CT, as Yak-Llama2's; the SFT adds two
chat tokens). Then merges each with ``fastmerge merge`` (TIES-SV, density 0.2, slack
0.05) under ``/usr/bin/time -v``: the same-vocabulary trio plainly, the extended one with
``tokenizer_source: union``. Wall time and peak RSS per run; inputs read once
beforehand (warm page cache), dirty pages synced between runs; runs alternate between
the two trios (same, ext, same, ...) so that a busy machine weighs on both alike.
``--only same|ext`` builds and runs one trio; ``--drop`` keeps one trio on disk at a
time (for disks that cannot hold both at 7B: then the runs of one trio follow each other)
and deletes it after its runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_cpu import timed, warm   # noqa: E402

DENSITY, SLACK = 0.2, 0.05


def config(root: Path, union: bool) -> str:
    lines = ["merge_method: ties_sv", f"base_model: {root / 'base'}", "models:"]
    for m in ("ct", "sft"):
        lines += [f"  - model: {root / m}",
                  f"    parameters: {{weight: 1.0, density: {DENSITY}, slack: {SLACK}}}"]
    if union:
        lines += ["tokenizer_source: union"]
    return "\n".join(lines) + "\n"


def build(kind: str, root: Path, preset: str, new_tokens: int) -> float:
    from fastmerge.testing import write_extended_vocab_family
    if (root / "sft" / "config.json").exists():
        return 0.0
    t0 = time.perf_counter()
    if kind == "ext":
        write_extended_vocab_family(root, preset, new_tokens=new_tokens, shard_size="5GB")
    else:
        write_extended_vocab_family(root, preset, new_tokens=0, chat_tokens=False,
                                    shard_size="5GB")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--new-tokens", type=int, default=24724)
    ap.add_argument("--backend", default="c")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", choices=("same", "ext"), default=None)
    ap.add_argument("--drop", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    rows = []
    kinds = [k for k in ("same", "ext") if not args.only or k == args.only]
    built = {}
    if not args.drop:           # both trios at once: runs alternate same, ext, same, ...
        built = {k: build(k, work / k, args.preset, args.new_tokens) for k in kinds}
        plan = [[(r, k) for r in range(args.repeats) for k in kinds]]
    else:                       # one trio on disk at a time
        plan = [[(r, k) for r in range(args.repeats)] for k in kinds]
    for runs in plan:
        for r, kind in runs:
            root = work / kind
            if kind not in built:
                built[kind] = build(kind, root, args.preset, args.new_tokens)
            cfg = work / f"{kind}.yml"
            cfg.write_text(config(root, kind == "ext"))
            files = [f for d in ("base", "ct", "sft") for f in (root / d).glob("*.safetensors")]
            out = work / f"out-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            warm(files)
            os.sync()
            row = timed([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out),
                         "--backend", args.backend, "--no-progress"])
            row.update(kind=kind, run=r, build_s=round(built[kind], 1), load_avg=os.getloadavg(),
                       input_bytes=sum(f.stat().st_size for f in files))
            if kind == "ext" and row["rc"] == 0:
                rep = json.loads((out / "fastmerge_report.json").read_text())
                row["vocabulary"] = {k: rep["vocabulary"][k] for k in ("tokens", "rows")}
                row["vocabulary"]["tensors"] = rep["vocabulary"]["tensors"]
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
            if args.drop and r == args.repeats - 1:
                shutil.rmtree(root, ignore_errors=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "preset": args.preset,
           "new_tokens": args.new_tokens, "command": " ".join(sys.argv),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(), "rows": rows}
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else None
        if old and args.only:       # a run of one trio adds to the other's
            doc["rows"] = [r for r in old["rows"] if r["kind"] != args.only] + rows
        path.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
