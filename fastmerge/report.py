"""The merge report (docs/spec.md §9): per tensor and per model counts, totals, exact parameters.

Per model i: ``population`` |P|, ``kept`` (|τ_i| >= t_i), ``protected`` (|τ_i| >= u_i),
``selected`` (kept and sign agrees with γ), ``dropped_by_sign`` (kept ∧ ¬sel ∧ τ≠0),
``important_dropped`` (prot ∧ ¬sel) and ``ties_important_dropped`` — what plain TIES
(no protected-first election) would have dropped of the same protected set. The gap
between the last two is what the slack saved. The report is deterministic (no times,
no host names), so a resumed or repeated merge writes the same file.
"""
from __future__ import annotations


from . import __version__
from .kernel_api import COUNTERS

FORMAT = "fastmerge-report/1"


def build_report(params, backend: str, base_label, model_labels, stats,
                 global_thresholds=None) -> dict:
    totals = None
    population = 0
    for s in stats:
        population += s.population
        if s.counts is not None:
            totals = s.counts.clone() if totals is None else totals + s.counts
    report = {
        "format": FORMAT,
        "fastmerge_version": __version__,
        "backend": backend,
        "parameters": params.as_dict(),
        "base": base_label,
        "models": list(model_labels),
        "merged_tensors": len(stats),
        "population": population,
    }
    if global_thresholds is not None:
        report["model_thresholds"] = {"t": global_thresholds[0], "u": global_thresholds[1]}
    if totals is not None:
        report["totals"] = [dict(label=label, **dict(zip(COUNTERS, map(int, row))))
                            for label, row in zip(model_labels, totals.tolist())]
    report["tensors"] = [s.as_dict() for s in stats]
    return report


def summary(report: dict) -> str:
    """A short human-readable digest of a report (printed by the CLI and the demo)."""
    p = report["parameters"]
    lines = [f"method {p['method']}  scope {p['scope']}  backend {report['backend']}  "
             f"merged tensors {report['merged_tensors']}  entries {report['population']:,}"]
    for row in report.get("totals", []):
        pop = report["population"] or 1
        lines.append(
            f"  {row['label']}: kept {row['kept'] / pop:.1%}  selected {row['selected'] / pop:.1%}"
            f"  dropped by sign {row['dropped_by_sign']:,}  protected {row['protected']:,}"
            f"  important dropped {row['important_dropped']:,}"
            f" (plain TIES would drop {row['ties_important_dropped']:,})")
    return "\n".join(lines)
