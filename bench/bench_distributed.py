"""One merge on 1 and on N ranks (torchrun, gloo, CPU), side by side in one run.

    python bench/bench_distributed.py --preset 1b --workdir /tmp/fm-dist --ranks 1,2 \
        --shard-size 500MB --repeats 3 --out bench/results/distributed_1b.json

Builds (or reuses) the Llama-shaped fp16 base + 2 fine-tunes of ``--preset``
(fastmerge.testing), reads them once so every run starts from the same page cache, then
alternates, ``--repeats`` times: ``fastmerge merge`` in one process, and ``torchrun
--nproc-per-node N -m fastmerge merge`` for each N of ``--ranks`` (N > 1), each under
``/usr/bin/time -v`` (wall time; peak RSS of the largest process). Every output is
checked byte-identical to the first single-process one. Per rank it records what the CLI
prints (shards, bytes written, seconds of work), from which the scaling model of
bench/README.md is made. The I/O floor (reading the inputs once from the page cache,
writing and fsyncing the output's bytes) is measured in the same run.

torchrun gives each rank OMP_NUM_THREADS=1 unless it is set; the single process keeps
its default (every core). On a machine with C cores, N ranks therefore share the same
C cores as the single process: on 2 cores this measures overlap, not more compute.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_cpu import timed, warm, write_floor  # noqa: E402

RANK_LINE = re.compile(r"rank (\d+) \((.*?)\): (\d+) shards, ([\d.]+) GB in ([\d.]+) s")


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--workdir", default="/tmp/fastmerge-dist")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--method", default="ties_sv")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the inputs")
    args = ap.parse_args()

    work = Path(args.workdir)
    fam = work / "inputs"
    if not (fam / "sft").exists():
        subprocess.run([sys.executable, "-m", "fastmerge.testing", "--preset", args.preset,
                        "--out", str(fam), "--n-models", "2"], check=True)
    files = sorted(p for p in fam.rglob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in files)
    cfg = work / "config.yml"
    cfg.write_text(f"""merge_method: {args.method}
base_model: {fam / 'base'}
models:
  - model: {fam / 'ct'}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {fam / 'sft'}
    parameters: {{weight: 1.0, density: 0.2, slack: 0.05}}
dtype: float16
""")
    ranks = [int(r) for r in args.ranks.split(",")]
    warm(files)
    out_bytes = sum(p.stat().st_size for p in (fam / "base").glob("*.safetensors"))
    rows, reference = [], None
    floor = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        warm(files)
        read_s = time.perf_counter() - t0
        write_s = write_floor(work / "floor.bin", out_bytes, writeback=False)
        floor.append(read_s + write_s)
        for n in ranks:
            out = work / f"out-{n}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])
            merge = ["merge", str(cfg), str(out), "--shard-size", args.shard_size,
                     "--no-progress", "--overwrite"]
            if n == 1:
                cmd = [sys.executable, "-m", "fastmerge", *merge]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                       str(n), "--master-port", str(29400 + rep), "-m", "fastmerge", *merge]
            row = timed(cmd, stdout=True) | {"ranks": n, "repeat": rep}
            proc_out = row.pop("stdout", "")
            if row["rc"] == 0:
                row["rank_work"] = [
                    {"rank": int(m[0]), "shards": int(m[2]), "gb_written": float(m[3]),
                     "seconds": float(m[4])} for m in RANK_LINE.findall(proc_out)]
                d = digest(out)
                reference = reference or d
                row["identical_to_first"] = d == reference
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for n in ranks:
        walls = [r["wall_s"] for r in rows if r["ranks"] == n and r["rc"] == 0]
        rss = [r["peak_rss_mib"] for r in rows if r["ranks"] == n and r["rc"] == 0]
        summary[n] = {"median_wall_s": statistics.median(walls) if walls else None,
                      "all_wall_s": walls, "max_peak_rss_mib": max(rss) if rss else None}
    one = summary.get(1, {}).get("median_wall_s")
    for n, s in summary.items():
        if one and s["median_wall_s"]:
            s["speedup_vs_1"] = round(one / s["median_wall_s"], 3)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "preset": args.preset,
        "input_bytes": in_bytes, "output_bytes": out_bytes, "shard_size": args.shard_size,
        "io_floor_s": {"median": statistics.median(floor), "all": floor},
        "summary": summary, "rows": rows,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(fam, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
