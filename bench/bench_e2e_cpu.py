"""End-to-end CPU merge benchmark: fastmerge vs mergekit on the same files, one run.

    python bench/bench_e2e_cpu.py --preset 1b --workdir /tmp/fm-bench \
        --mergekit /tmp/mkvenv/bin/mergekit-yaml --out bench/results/e2e_cpu_1b.json

Builds (or reuses) a Llama-shaped fp16 base + 2 fine-tunes with fastmerge.testing, then
measures, each as a separate process under ``/usr/bin/time -v`` (wall time and peak RSS):
  * the I/O floor: reading every input file once from page cache + writing (and fsyncing)
    an output of the merged size, two ways: plain ``write`` calls, and with the writeback
    fastmerge itself uses (fastmerge.io.writeback: pages written back early and dropped);
  * ``fastmerge merge`` with each method of ``--methods`` (default TIES and TIES-SV) for
    each requested backend (``--repeats`` runs each, median reported);
  * ``mergekit-yaml`` with the same config, for the methods of ``--mergekit-methods``
    (default TIES; if --mergekit is given; one run each).
Inputs are read once beforehand so every contender starts from a warm page cache, and
dirty pages are synced between runs so one contender's writeback does not slow the next.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DENSITY, SLACK = 0.2, 0.05


def timed(cmd: list[str], env=None, stdout: bool = False) -> dict:
    """Run cmd under /usr/bin/time -v; return wall seconds, peak RSS (MiB), exit code
    (and with ``stdout``, what it printed, under "stdout")."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row = {"cmd": " ".join(cmd), "wall_s": round(wall, 3), "rc": proc.returncode,
           "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None}
    if proc.returncode:
        row["stderr_tail"] = proc.stderr[-2000:]
    if stdout:
        row["stdout"] = proc.stdout
    return row


def warm(paths) -> float:
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def write_floor(path: Path, nbytes: int, writeback: bool) -> float:
    """Seconds to write nbytes and fsync them: plain writes, or with fastmerge's Writeback."""
    from fastmerge.io.writeback import Writeback
    buf = memoryview(os.urandom(1 << 24))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    wb = Writeback(fd) if writeback else None
    done = 0
    while done < nbytes:
        done += os.write(fd, buf[:min(nbytes - done, len(buf))])
        if wb:
            wb.written(done)
    os.fsync(fd)
    if wb:
        wb.close()
    os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    settle()
    return dt


def settle() -> None:
    """Let the disk finish what earlier runs left (writeback, discards) before timing."""
    os.sync()
    time.sleep(2)


def median(xs):
    """The middle item (upper middle for an even count) of xs, sorted."""
    xs = sorted(xs, key=lambda x: x["wall_s"] if isinstance(x, dict) else x)
    return xs[len(xs) // 2]


def config_yaml(method, base, models, slack) -> str:
    """The YAML both tools run: TIES family at DENSITY (TIES-SV with ``slack``), DARE at
    DENSITY, breadcrumbs at DENSITY (gamma 0.01), SLERP t 0.5 from the base to the CT
    model, NuSLERP of CT and SFT's task vectors (weights 1/1; ``nuslerp_columns``: the same
    with ``nuslerp_row_wise``, one vector per column), model stock of both."""
    columns = method == "nuslerp_columns"
    method = "nuslerp" if columns else method
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    if method == "slerp":
        lines += [f"  - model: {base}", f"  - model: {models[0]}", "parameters: {t: 0.5}"]
    elif method == "model_stock":
        lines += [f"  - model: {m}" for m in models]
    elif method == "nuslerp":
        lines += [f"  - model: {m}\n    parameters: {{weight: 1.0}}" for m in models]
        if columns:
            lines.append("parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}")
    else:
        for m in models:
            params = f"{{weight: 1.0, density: {DENSITY}" + (f", slack: {slack}}}" if slack
                                                              else "}")
            lines.append(f"  - model: {m}\n    parameters: {params}")
        norm = "true" if method in ("ties", "ties_sv") else "false"
        lines.append(f"parameters: {{normalize: {norm}}}")
    lines.append("dtype: float16")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--workdir", default="/tmp/fastmerge-bench")
    ap.add_argument("--backends", default="c,torch")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml (optional)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--keep", action="store_true", help="keep inputs for a later run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per fastmerge contender")
    ap.add_argument("--methods", default="ties,ties_sv", help="fastmerge methods to run")
    ap.add_argument("--mergekit-methods", default="ties",
                    help="methods mergekit also runs (with --mergekit)")
    args = ap.parse_args()

    import torch

    import fastmerge
    from fastmerge.testing import PRESETS, write_llama_family

    work = Path(args.workdir)
    inputs = work / f"inputs-{args.preset}"
    if not (inputs / "sft" / "model.safetensors.index.json").exists():
        shutil.rmtree(inputs, ignore_errors=True)
        t0 = time.perf_counter()
        write_llama_family(inputs, config=PRESETS[args.preset], n_models=2,
                           dtype=torch.float16, shard_size=2 * 10**9,
                           names=("base", "ct", "sft"))
        print(f"built inputs in {time.perf_counter() - t0:.1f} s", flush=True)
    base, models = inputs / "base", [inputs / "ct", inputs / "sft"]
    files = sorted(p for d in (base, *models) for p in d.glob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in files)
    out_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))

    settle()
    warm(files)
    reads = [warm(files) for _ in range(3)]
    plain = [write_floor(work / "floor.bin", out_bytes, False) for _ in range(3)]
    wback = [write_floor(work / "floor.bin", out_bytes, True) for _ in range(3)]
    rows = {"read_inputs_s": round(median(reads), 3), "write_output_s": round(median(plain), 3),
            "write_output_writeback_s": round(median(wback), 3),
            "samples": {"read": reads, "write": plain, "write_writeback": wback}}
    rows["io_floor_s"] = round(rows["read_inputs_s"] + rows["write_output_s"], 3)
    rows["io_floor_writeback_s"] = round(rows["read_inputs_s"] + rows["write_output_writeback_s"], 3)
    print(f"I/O floor {rows['io_floor_s']} s with plain writes, {rows['io_floor_writeback_s']} s "
          f"with writeback ({in_bytes / 1e9:.2f} GB read, {out_bytes / 1e9:.2f} GB written)",
          flush=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def run(cmd, **tags):
        warm(files)
        row = timed(cmd, env)
        row.update(tags)
        print(json.dumps(row), flush=True)
        settle()
        return row

    results = []
    mk_methods = set(args.mergekit_methods.split(","))
    for method in args.methods.split(","):
        slack = SLACK if method == "ties_sv" else 0.0
        cfg = work / f"{method}.yml"
        cfg.write_text(config_yaml(method, base, models, slack))
        for backend in args.backends.split(","):
            out = work / f"out-{method}-{backend}"
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out),
                                 "--backend", backend, "--no-progress"]))
                shutil.rmtree(out, ignore_errors=True)
            row = dict(median([r for r in runs if not r["rc"]] or runs))   # the median run
            row.update(tool="fastmerge", method=method, backend=backend,
                       runs_wall_s=[r["wall_s"] for r in runs],
                       runs_peak_rss_mib=[r["peak_rss_mib"] for r in runs])
            results.append(row)
        if args.mergekit and method in mk_methods:
            out = work / "out-mergekit"
            shutil.rmtree(out, ignore_errors=True)
            results.append(run([args.mergekit, str(cfg), str(out)], tool="mergekit",
                               method=method, backend="mergekit"))
            shutil.rmtree(out, ignore_errors=True)

    mk = {r["method"]: r for r in results if r["tool"] == "mergekit" and not r["rc"]}
    for r in results:
        if r["tool"] == "fastmerge" and not r["rc"]:
            r["x_io_floor"] = round(r["wall_s"] / rows["io_floor_s"], 2)
            r["x_io_floor_writeback"] = round(r["wall_s"] / rows["io_floor_writeback_s"], 2)
            if r["method"] in mk:
                r["speedup_vs_mergekit"] = round(mk[r["method"]]["wall_s"] / r["wall_s"], 1)
    doc = {
        "benchmark": "e2e_cpu", "preset": args.preset, "dtype": "float16", "n_models": 2,
        "density": DENSITY, "slack": SLACK, "input_bytes": in_bytes, "output_bytes": out_bytes,
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "fastmerge": fastmerge.__version__,
                    "mergekit": _mergekit_version(args.mergekit)},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "io": rows, "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc["io"].items() if k != "samples"}), flush=True)
    for r in results:
        print(f"{r['tool']:9s} {r['method']:8s} {r['backend']:8s} wall {r['wall_s']:7.2f} s  "
              f"rss {r['peak_rss_mib']} MiB  x floor {r.get('x_io_floor', '-')} "
              f"(writeback floor {r.get('x_io_floor_writeback', '-')})  "
              f"vs mergekit {r.get('speedup_vs_mergekit', '-')}", flush=True)
    if not args.keep:
        shutil.rmtree(inputs, ignore_errors=True)
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mergekit_version(path) -> str | None:
    if not path:
        return None
    py = Path(path).parent / "python"
    proc = subprocess.run([str(py), "-c", "import importlib.metadata as m;"
                           "print(m.version('mergekit'))"], capture_output=True, text=True)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
