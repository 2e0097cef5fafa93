"""bench/results/*.json -> the Markdown tables of bench/README.md (stdout) and PNG charts.

    python bench/make_tables.py                       # every bench/results/*.json
    python bench/make_tables.py bench/results/e2e_cpu_1b.json --no-charts
    python -m pytest bench/ --benchmark-only --benchmark-json bench/results/pytest_cpu.json
    python bench/make_tables.py bench/results/pytest_cpu.json

Knows the files the benchmarks write, by their contents:

* ``bench_cpu_kernels.py`` (``"benchmark": "cpu_kernels"``) and the pytest-benchmark suite
  (``--benchmark-json``): per-tensor medians per contender and the C backend's speedups;
  chart: median time per contender and shape (log scale, 20th-80th percentile bars);
* ``bench_e2e_cpu.py`` (``"benchmark": "e2e_cpu"``): wall time, peak RSS and the ratios to
  the I/O floors; chart: wall time and peak RSS per run;
* ``bench_triton.py`` (``meta`` / ``rows``): its own table (bench_triton.table); chart: GB/s
  per contender against the copy bandwidth;
* ``compare_mergekit.py`` (``"benchmark": "mergekit_compare"``): its own table
  (compare_mergekit.markdown), no chart.

Charts go next to their JSON as ``<name>.png`` (``--out-dir`` to change). The tables are
printed, not written into bench/README.md: the prose around them is edited by hand.
Charts need matplotlib (``pip install -e ".[bench]"``); tables need nothing beyond Python.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# contenders of bench_cpu_kernels.py / bench/test_cpu_kernels.py, in table order
KERNEL_COLUMNS = [("c", "C total"), ("c_thresholds", "C thresholds (bracketing)"),
                  ("c_thresholds_radix", "radix"), ("c_merge_pass", "C merge pass"),
                  ("reference", "reference"), ("incumbent", "incumbent")]
METHOD_NAMES = {"ties": "TIES", "ties_sv": "TIES-SV", "linear": "linear",
                "task_arithmetic": "task arithmetic"}


# ---------------------------------------------------------------------------------------
# formatting

def ms(x: float | None) -> str:
    """Milliseconds as bench/README.md writes them: 46.2, 109.2, 5360."""
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def sec(x: float) -> str:
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def gb(nbytes: float) -> str:
    x = nbytes / 1e9
    return f"{x:.2f} GB" if x < 10 else f"{x:.1f} GB"


def ratio(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def times(x: float, digits: int = 0) -> str:
    """A speedup: 72×, or with ``digits`` decimals (30.4×); 1× for exactly one."""
    return "1×" if x == 1 else f"{x:.1f}×" if x < 10 else f"{x:.{digits}f}×"


def mib(x: float | None) -> str:
    return "–" if x is None else f"{int(x + 0.5)} MiB"


def shape_name(shape) -> str:
    return "×".join(str(s) for s in shape)


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# per-tensor kernels: bench_cpu_kernels.py and the pytest-benchmark suite, one shape

def kernel_rows(data: dict) -> list[dict]:
    """[{shape, results: {contender: {median_ms, p20_ms, p80_ms}}}] from either format."""
    if data.get("benchmark") == "cpu_kernels":
        return [{"shape": r["shape"], "results": r["results"]} for r in data["rows"]]
    by_shape: dict[tuple, dict] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "contender" not in info:
            continue
        s = b["stats"]
        data_ms = sorted(1e3 * x for x in s.get("data", [])) or None
        q = statistics.quantiles(data_ms, n=5) if data_ms and len(data_ms) > 1 else None
        by_shape.setdefault(tuple(info["shape"]), {})[info["contender"]] = {
            "median_ms": 1e3 * s["median"],
            "p20_ms": q[0] if q else 1e3 * s["min"],
            "p80_ms": q[3] if q else 1e3 * s["max"]}
    return [{"shape": list(k), "results": v} for k, v in by_shape.items()]


def kernels_table(data: dict) -> str:
    rows = []
    for r in kernel_rows(data):
        res = r["results"]
        med = {k: v["median_ms"] for k, v in res.items()}
        c = med.get("c")
        rows.append([shape_name(r["shape"])] + [ms(med.get(k)) for k, _ in KERNEL_COLUMNS] +
                    [times(med[o] / c) if c and o in med else "–"
                     for o in ("incumbent", "reference")])
    head = ["shape"] + [h for _, h in KERNEL_COLUMNS] + ["C vs incumbent", "C vs reference"]
    return table(head, rows)


def kernels_caption(data: dict) -> str:
    if data.get("benchmark") == "cpu_kernels":
        m = data["machine"]
        return (f"{data['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
                f"{m.get('gcc') or 'compiler unknown'}, C threads {m.get('c_threads')}, "
                f"copy {data.get('copy_bandwidth_gbs')} GB/s; median ms\n\n"
                f"`python bench/{data['command']}`")
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {}).get("brand_raw") or m.get("processor") or m.get("machine", "")
    commit = (data.get("commit_info") or {}).get("id", "")[:7]
    return (f"{data.get('datetime', '')}, {cpu}, Python {m.get('python_version', '')}, "
            f"commit {commit or '?'}; pytest-benchmark {data.get('version', '')}; median ms")


def kernels_chart(data: dict, out: Path, plt) -> None:
    rows = kernel_rows(data)
    labels = [h for k, h in KERNEL_COLUMNS]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 1.6 * len(rows)))
    height = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        res = r["results"]
        ys, med, lo, hi = [], [], [], []
        for j, (k, _) in enumerate(KERNEL_COLUMNS):
            if k in res:
                ys.append(j + (i - (len(rows) - 1) / 2) * height)
                m = res[k]["median_ms"]
                med.append(m)
                lo.append(max(0.0, m - res[k]["p20_ms"]))
                hi.append(max(0.0, res[k]["p80_ms"] - m))
        bars = ax.barh(ys, med, height=height * 0.9, xerr=[lo, hi], capsize=2,
                       label=shape_name(r["shape"]))
        ax.bar_label(bars, labels=[ms(m) for m in med], padding=6, fontsize=7)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms per tensor (log scale; bars: 20th-80th percentile)")
    ax.set_title("TIES-SV per tensor, fp16, 2 models: C backend vs reference vs incumbent",
                 fontsize=10)
    ax.legend(title="shape", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    save(fig, out, plt)


# ---------------------------------------------------------------------------------------
# end to end: bench_e2e_cpu.py

def e2e_runs(data: dict) -> list[dict]:
    """Rows of the table and the chart: the two I/O floors, then every run in file order."""
    io = data["io"]
    out = [{"label": f"I/O floor, plain writes (read {gb(data['input_bytes'])} "
                     f"{sec(io['read_inputs_s'])} + write & fsync {gb(data['output_bytes'])} "
                     f"{sec(io['write_output_s'])})",
            "short": "I/O floor, plain writes", "wall": io["io_floor_s"], "rss": None,
            "x": 1.0, "xw": None, "vs": None, "kind": "floor"}]
    if "io_floor_writeback_s" in io:
        out.append({"label": f"I/O floor, writeback as fastmerge writes (read "
                             f"{sec(io['read_inputs_s'])} + write "
                             f"{sec(io['write_output_writeback_s'])})",
                    "short": "I/O floor, writeback", "wall": io["io_floor_writeback_s"],
                    "rss": None, "x": None, "xw": 1.0, "vs": None, "kind": "floor"})
    mergekit = next((r for r in data["results"] if r.get("tool") == "mergekit"
                     and not r.get("rc")), None)
    for r in data["results"]:
        method = METHOD_NAMES.get(r.get("method"), r.get("method", "?"))
        if r.get("tool") == "mergekit":
            short = f"mergekit-yaml {method}"
        else:
            short = f"fastmerge {method}, {r.get('backend', '?')} backend"
            short = short.replace(", c backend", ", C backend")
        label = short
        runs = r.get("runs_wall_s") or []
        if len(runs) > 1:
            label += f" (runs: {', '.join(f'{x:.2f}' for x in runs)} s)"
        if r.get("rc"):
            label += f" — failed (exit {r['rc']})"
        x = r.get("x_io_floor") or r["wall_s"] / io["io_floor_s"]
        xw = r.get("x_io_floor_writeback")
        if xw is None and r.get("tool") != "mergekit" and "io_floor_writeback_s" in io:
            xw = r["wall_s"] / io["io_floor_writeback_s"]
        vs = r.get("speedup_vs_mergekit")
        if r is mergekit:
            vs = 1.0
        out.append({"label": label, "short": short, "wall": r["wall_s"],
                    "rss": r.get("peak_rss_mib"), "x": x, "xw": xw, "vs": vs,
                    "kind": r.get("tool", "?"), "failed": bool(r.get("rc"))})
    order = {"floor": 0, "fastmerge": 1, "mergekit": 3}
    return sorted(out, key=lambda r: order.get(r["kind"], 2))   # stable: file order within


def e2e_table(data: dict) -> str:
    runs = e2e_runs(data)
    with_mk = any(r["kind"] == "mergekit" for r in runs)
    head = ["run", "wall", "peak RSS", "× plain I/O floor", "× writeback I/O floor"]
    head += ["vs mergekit"] if with_mk else []
    rows = []
    for r in runs:
        row = [r["label"], sec(r["wall"]), mib(r["rss"]),
               "–" if r["x"] is None else ratio(r["x"]),
               "–" if r["xw"] is None else ratio(r["xw"])]
        if with_mk:
            row.append("–" if r["vs"] is None else times(r["vs"], 1))
        rows.append(row)
    return table(head, rows)


def e2e_caption(data: dict) -> str:
    m = data["machine"]
    tools = f"mergekit {m['mergekit']}, " if m.get("mergekit") else ""
    return (f"{data['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
            f"{tools}preset {data['preset']}, {data['dtype']}, {data['n_models']} models, "
            f"density {data['density']}, slack {data['slack']}; {gb(data['input_bytes'])} in, "
            f"{gb(data['output_bytes'])} out\n\n`{data['command']}`")


def e2e_chart(data: dict, out: Path, plt) -> None:
    runs = e2e_runs(data)
    colors = {"floor": "0.65", "fastmerge": "C0", "mergekit": "C3"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.9 + 0.45 * len(runs)), sharey=True,
                                 gridspec_kw={"width_ratios": [3, 2]})
    ys = range(len(runs))
    col = [colors.get(r["kind"], "C1") for r in runs]
    bars = a1.barh(ys, [r["wall"] for r in runs], color=col)
    a1.bar_label(bars, labels=[sec(r["wall"]) for r in runs], padding=3, fontsize=8)
    a1.set_yticks(list(ys), [r["short"] + (" (failed)" if r.get("failed") else "")
                             for r in runs])
    a1.invert_yaxis()
    a1.set_xlabel("wall time, s (whole process)")
    a1.margins(x=0.18)
    rss = [(y, r["rss"], c) for y, r, c in zip(ys, runs, col) if r["rss"] is not None]
    if rss:
        bars = a2.barh([y for y, _, _ in rss], [v for _, v, _ in rss],
                       color=[c for _, _, c in rss])
        a2.bar_label(bars, labels=[mib(v) for _, v, _ in rss], padding=3, fontsize=8)
    a2.set_xlabel("peak RSS, MiB")
    a2.margins(x=0.25)
    for a in (a1, a2):
        a.grid(axis="x", alpha=0.3)
    fig.suptitle(f"End-to-end CPU merge, preset {data['preset']} ({gb(data['input_bytes'])} "
                 f"in, {gb(data['output_bytes'])} out), {data['machine']['cores']} cores",
                 fontsize=10)
    save(fig, out, plt)


# ---------------------------------------------------------------------------------------
# GPU: bench_triton.py

def triton_table(data: dict) -> str:
    import bench_triton
    return bench_triton.table(data)


def triton_chart(data: dict, out: Path, plt) -> None:
    rows = [r for r in data["rows"] if not r.get("sweep")]
    cases = list(dict.fromkeys((r["shape"], r["n_models"]) for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.25 * len(names) * len(cases)))
    height = 0.8 / max(1, len(cases))
    for i, case in enumerate(cases):
        got = {r["name"]: r for r in rows if (r["shape"], r["n_models"]) == case}
        ys = [j + (i - (len(cases) - 1) / 2) * height for j, n in enumerate(names) if n in got]
        vals = [got[n]["gbps"] for n in names if n in got]
        bars = ax.barh(ys, vals, height=height * 0.9, label=f"{case[0]}, n={case[1]}")
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in vals], padding=3, fontsize=7)
    copy = data["copy_bandwidth"]["gbps"]
    ax.axvline(copy, color="k", linestyle="--", linewidth=1)
    ax.text(copy, -0.6, f" copy {copy:.0f} GB/s", fontsize=8, va="bottom")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s of bytes each kernel must move")
    ax.set_title(f"{data['meta']['device']}: Triton vs reference vs incumbent", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, out, plt)


# ---------------------------------------------------------------------------------------
# fastmerge vs mergekit: compare_mergekit.py

def mergekit_table(data: dict) -> str:
    import compare_mergekit
    return compare_mergekit.markdown(data["results"])


# ---------------------------------------------------------------------------------------
# anything else with a list of flat rows (e.g. ab_c_merge.py): one column per scalar key

def _scalar(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def generic_table(data: dict) -> str:
    rows = [r for r in data["rows"] if isinstance(r, dict)]
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if _scalar(v)))

    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")
    return table(keys, [[cell(r.get(k)) for k in keys] for r in rows])


def generic_caption(data: dict) -> str:
    parts = [str(data[k]) for k in ("date", "cpu") if data.get(k)]
    cmd = f"\n\n`{data['command']}`" if data.get("command") else ""
    return ", ".join(parts) + cmd


# ---------------------------------------------------------------------------------------

def kind(data: dict) -> str | None:
    if data.get("benchmark") in ("cpu_kernels", "e2e_cpu", "mergekit_compare"):
        return data["benchmark"]
    if "benchmarks" in data and "machine_info" in data:
        return "pytest_benchmark"
    if {"meta", "rows", "copy_bandwidth"} <= data.keys():
        return "triton"
    if isinstance(data.get("rows"), list):
        return "rows"
    return None


HANDLERS = {   # kind: (table, caption, chart)
    "cpu_kernels": (kernels_table, kernels_caption, kernels_chart),
    "pytest_benchmark": (kernels_table, kernels_caption, kernels_chart),
    "e2e_cpu": (e2e_table, e2e_caption, e2e_chart),
    "triton": (triton_table, None, triton_chart),
    "mergekit_compare": (mergekit_table, generic_caption, None),
    "rows": (generic_table, generic_caption, None),
}


def save(fig, out: Path, plt) -> None:
    fig.tight_layout()
    # no timestamp in the file, so an unchanged chart is an unchanged file
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {out}", file=sys.stderr)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("charts need matplotlib: pip install -e '.[bench]' (or --no-charts)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path,
                    help="results JSON files (default: bench/results/*.json)")
    ap.add_argument("--no-charts", action="store_true", help="print the tables only")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the PNGs go (default: next to each JSON)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(BENCH))          # bench_triton / compare_mergekit for their tables
    files = args.files or sorted(RESULTS.glob("*.json"))
    plt = None if args.no_charts else pyplot()
    status = 0
    for path in files:
        data = json.loads(path.read_text())
        k = kind(data)
        print(f"### {path.name}\n")
        if k is None:
            print("(not a results file make_tables.py knows)\n")
            continue
        make_table, caption, chart = HANDLERS[k]
        try:
            if caption:
                print(caption(data) + "\n")
            print(make_table(data) + "\n")
        except Exception as exc:   # one odd file must not stop the others
            print(f"(no table: {type(exc).__name__}: {exc})\n")
            status = 1
        if plt is not None and chart is not None:
            out = (args.out_dir or path.parent) / f"{path.stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            chart(data, out, plt)
    return status


if __name__ == "__main__":
    sys.exit(main())
