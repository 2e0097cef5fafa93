"""The merge report (docs/spec.md §9; docs/report.md): what it holds, and how to read it.

Per model i: ``population`` |P|, ``kept`` (|τ_i| >= t_i), ``protected`` (|τ_i| >= u_i),
``selected`` (kept and sign agrees with γ), ``dropped_by_sign`` (kept ∧ ¬sel ∧ τ≠0),
``important_dropped`` (prot ∧ ¬sel) and ``ties_important_dropped`` — what plain TIES
(no protected-first election) would have dropped of the same protected set. The gap
between the last two is what the slack saved. The report is deterministic (no times,
no host names), so a resumed or repeated merge writes the same file.

The file ``fastmerge_report.json`` is strict JSON (RFC 8259: no ``Infinity``/``NaN``).
A threshold of +inf — ``t_i``: this model keeps no entry, ``u_i``: it protects none —
is written as ``null``. Every per-model entry names its model (``"model"``: the absolute
path of a local folder or file, else the hub id or label as given).

Reading a report (format ``fastmerge-report/1`` or ``/2``)::

    from fastmerge import report
    r = report.load("merged")                  # an output folder or a report file
    print(report.summary(r))                   # header, totals, per-module table
    print(report.table(r, by="layer"))         # per layer
    print(report.compare(r, report.load("merged-ties")))
    report.plot([r, other], "report.png")      # needs matplotlib

    python -m fastmerge.report OUTPUT_DIR [--by module|layer] [--compare OTHER_DIR]
                               [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from . import __version__
from .kernel_api import COUNTERS

FORMAT = "fastmerge-report/2"
#: formats ``load`` and the functions below read (/1: positional model rows, Infinity)
FORMATS = ("fastmerge-report/1", FORMAT)
REPORT_NAME = "fastmerge_report.json"   # as fastmerge.output writes it


# -- writing -----------------------------------------------------------------------------

def _json_threshold(x):
    """+inf ("none kept" / "none protected") as null; a finite threshold as is."""
    return None if x == math.inf else x


def _resolve_label(label):
    """A label naming an existing local folder or file, as an absolute resolved path
    (so the report does not depend on the directory the merge ran in); any other label
    (hub id, an in-memory input's name, None) unchanged."""
    if not isinstance(label, str) or not label:
        return label
    path = Path(label).expanduser()
    try:
        return str(path.resolve()) if path.exists() else label
    except (OSError, RuntimeError):
        return label


def _input_label(x):
    """The report's name of an input: ``x`` is a label or an opened Checkpoint. A
    Checkpoint's label is resolved only when it was read from disk, so an in-memory
    input called "base" stays "base" even where a folder of that name exists."""
    if x is None or isinstance(x, str):
        return _resolve_label(x)
    label = x.label
    if getattr(x, "root", None) is None and not getattr(x, "_files", None):
        return label
    return _resolve_label(label)


def build_report(params, backend: str, base_label, model_labels, stats,
                 global_thresholds=None) -> dict:
    """The report of one merge (a dict that ``json.dumps(..., allow_nan=False)`` takes).
    ``base_label`` / ``model_labels``: the inputs' labels, or their opened Checkpoints."""
    base = _input_label(base_label)
    labels = [_input_label(x) for x in model_labels]
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
        "base": base,
        "models": labels,
        "merged_tensors": len(stats),
        "population": population,
    }
    if global_thresholds is not None:
        if isinstance(global_thresholds, (tuple, list)):    # (t, u)
            global_thresholds = dict(zip("tu", global_thresholds))
        report["model_thresholds"] = {k: [_json_threshold(x) for x in v]
                                      for k, v in global_thresholds.items()}
    if totals is not None:
        # "label" is the /1 name of "model", kept for readers of /1 reports
        report["totals"] = [dict(model=label, label=label, **dict(zip(COUNTERS, map(int, row))))
                            for label, row in zip(labels, totals.tolist())]
    tensors = []
    for s in stats:
        d = s.as_dict()
        if "models" in d:
            d["models"] = [dict(model=label, **row) for label, row in zip(labels, d["models"])]
        tensors.append(d)
    report["tensors"] = tensors
    return report


# -- reading -----------------------------------------------------------------------------

def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def load(path) -> dict:
    """The report of a merge output folder (its ``fastmerge_report.json``) or a report file.
    Reads both formats (/1 files may hold ``Infinity``); raises InputError otherwise."""
    from .errors import InputError

    p = Path(path).expanduser()
    f = p / REPORT_NAME if p.is_dir() else p
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError:
        what = "no fastmerge_report.json in the folder" if p.is_dir() else "no such file"
        raise InputError(f"{f}: {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{f}: cannot read the report: {exc}") from None
    try:
        # /1 reports wrote +inf thresholds as Infinity; read them as inf
        report = json.loads(text, parse_constant=lambda c: math.inf if c == "Infinity"
                            else _reject_constant(c))
    except ValueError as exc:
        raise InputError(f"{f}: not a fastmerge report (invalid JSON: {exc})") from None
    if not isinstance(report, dict) or report.get("format") not in FORMATS:
        got = report.get("format") if isinstance(report, dict) else type(report).__name__
        raise InputError(f"{f}: not a fastmerge report (format {got!r}; this version reads "
                         f"{', '.join(FORMATS)})")
    return report


# -- per-model counts, grouped -------------------------------------------------------------

_C = {c: i for i, c in enumerate(COUNTERS)}

#: module types, in table order, with their display names
MODULE_TYPES = (
    ("embed", "embedding"),
    ("attn.q", "attn q"), ("attn.k", "attn k"), ("attn.v", "attn v"),
    ("attn.qkv", "attn qkv (fused)"), ("attn.o", "attn o"),
    ("mlp.gate", "mlp gate"), ("mlp.up", "mlp up"), ("mlp.gate_up", "mlp gate+up (fused)"),
    ("mlp.down", "mlp down"), ("mlp.router", "moe router"),
    ("norm", "norm"), ("lm_head", "lm_head"), ("other", "other"),
)
_MODULE_NAMES = dict(MODULE_TYPES)
_MODULE_ORDER = {k: i for i, (k, _) in enumerate(MODULE_TYPES)}

_EMBED = {"embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "tok_embeddings",
          "embed_positions", "position_embeddings", "token_type_embeddings", "embeddings",
          "embedding", "emb"}
_LM_HEAD = {"lm_head", "embed_out", "output"}
_ATTN = {"self_attn", "attn", "attention", "self_attention", "cross_attn", "encoder_attn",
         "selfattention"}
_MLP = {"mlp", "feed_forward", "ffn", "ff", "block_sparse_moe", "moe", "experts",
        "intermediate", "densereludense"}
_Q = {"q_proj", "wq", "query", "q", "q_lin"}
_K = {"k_proj", "wk", "key", "k", "k_lin"}
_V = {"v_proj", "wv", "value", "v", "v_lin"}
_QKV = {"qkv_proj", "query_key_value", "c_attn", "wqkv", "w_pack", "qkv"}
_O = {"o_proj", "wo", "out_proj", "dense", "c_proj", "o", "out_lin", "proj"}
_GATE = {"gate_proj", "w1", "wi_0"}
_UP = {"up_proj", "w3", "dense_h_to_4h", "c_fc", "fc1", "fc_in", "wi", "wi_1", "lin1"}
_DOWN = {"down_proj", "w2", "dense_4h_to_h", "c_proj", "fc2", "fc_out", "wo", "lin2"}


def module_type(name: str) -> str:
    """The module type of a tensor, from the name patterns of Llama / Mistral / Qwen2 /
    Mixtral (``model.layers.N.self_attn.q_proj.weight``), GPT-NeoX
    (``gpt_neox.layers.N.attention.query_key_value``), GPT-2 (``transformer.h.N.attn.c_attn``)
    and the like: one of the keys of ``MODULE_TYPES``."""
    parts = [p for p in name.lower().split(".") if p not in ("weight", "bias")]
    last = parts[-1] if parts else ""
    if any("norm" in p or p.startswith("ln_") or p in ("ln", "ln1", "ln2") for p in parts):
        return "norm"
    if last in _LM_HEAD or "lm_head" in parts:
        return "lm_head"
    if any(p in _EMBED for p in parts):
        return "embed"
    in_attn = any(p in _ATTN for p in parts)
    in_mlp = any(p in _MLP for p in parts)
    if last == "gate_up_proj":
        return "mlp.gate_up"
    if in_mlp and last in ("gate", "router", "wg"):
        return "mlp.router"
    if not in_mlp:
        if last in _QKV:
            return "attn.qkv"
        for key, names in (("attn.q", _Q), ("attn.k", _K), ("attn.v", _V)):
            if last in names and (in_attn or len(last) > 1):
                return key
        # "output.dense" under an attention block (BERT) or "attention.dense" (GPT-NeoX)
        if in_attn and (last in _O or "output" in parts):
            return "attn.o"
    if last in _GATE:
        return "mlp.gate"
    if last in _UP:
        return "mlp.up"
    if last in _DOWN and not in_attn:
        return "mlp.down"
    if last == "dense" and "output" in parts:     # BERT's MLP output
        return "mlp.down"
    if last == "dense" and in_mlp:                # BERT's intermediate
        return "mlp.up"
    return "other"


def _layer(name: str):
    from .knobs import layer_index
    return layer_index(name)


def _counts(entry: dict) -> list[list[int]] | None:
    models = entry.get("models")
    if not models:
        return None
    return [[int(m.get(c, 0)) for c in COUNTERS] for m in models]


def _n_models(report: dict) -> int:
    return len(report.get("models") or []) or int(report.get("parameters", {}).get("n_models", 0))


def has_counters(report: dict) -> bool:
    """Whether the merge made per-entry decisions (a trim or an election) and counted them."""
    return any(_counts(t) is not None for t in report.get("tensors", []))


def _group(report: dict, key) -> list[tuple[object, dict]]:
    """[(group key, {"population", "tensors", "counts": [[counter per model]]})] in table
    order, over the tensors with counters; ``key(name)`` gives a tensor's group."""
    groups: dict = {}
    n = _n_models(report)
    for entry in report.get("tensors", []):
        counts = _counts(entry)
        if counts is None:
            continue
        g = groups.setdefault(key(entry["name"]), {
            "population": 0, "tensors": 0,
            "counts": [[0] * len(COUNTERS) for _ in range(max(n, len(counts)))]})
        g["population"] += int(entry["population"])
        g["tensors"] += 1
        for row, add in zip(g["counts"], counts):
            for j, v in enumerate(add):
                row[j] += v
    return list(groups.items())


def _by_module(report):
    return sorted(_group(report, module_type), key=lambda kv: _MODULE_ORDER[kv[0]])


def _by_layer(report):
    # tensors outside the layer stack (embeddings, final norm, lm_head) come last
    return sorted(_group(report, _layer),
                  key=lambda kv: (kv[0] is None, -1 if kv[0] is None else kv[0]))


def _total(report):
    return _group(report, lambda name: "all")


_GROUPINGS = {"module": _by_module, "layer": _by_layer, "total": _total}


def _group_name(by: str, key) -> str:
    if by == "module":
        return _MODULE_NAMES[key]
    if by == "layer":
        return "not in a layer" if key is None else f"layer {key}"
    return "all tensors"


# -- labels and knobs ----------------------------------------------------------------------

def _labels(report: dict) -> list[str]:
    labels = list(report.get("models") or [])
    n = _n_models(report)
    labels += [f"model {i}" for i in range(len(labels), n)]   # as fastmerge.merge names them
    return [str(x) for x in labels]


def short_labels(labels) -> list[str]:
    """Short, distinct names for table columns: the last path component of each label
    (more components when two would clash; ``model i``, from 0, for labels that stay
    equal)."""
    labels = [str(x) for x in labels]
    parts = [[p for p in re.split(r"[\\/]+", x) if p] or [x] for x in labels]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        short = ["/".join(p[-depth:]) for p in parts]
        if len(set(short)) == len(short):
            return short
    return [f"model {i}" for i in range(len(labels))]


def _spec_numbers(spec) -> list[float]:
    """Every number in a knob spec (number, gradient, filter list, first_of chain)."""
    if isinstance(spec, bool):
        return []
    if isinstance(spec, (int, float)):
        return [float(spec)]
    if isinstance(spec, list):
        return [x for v in spec for x in _spec_numbers(v)]
    if isinstance(spec, dict):
        return [x for k, v in spec.items() if k != "filter" for x in _spec_numbers(v)]
    return []


def _fmt_spec(spec) -> str:
    if spec is None:
        return "-"
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return f"{spec:g}"
    return json.dumps(spec, separators=(",", ":"))


def _model_has_slack(report: dict, i: int) -> bool:
    slack = report.get("parameters", {}).get("slack") or []
    if i < len(slack) and any(x > 0 for x in _spec_numbers(slack[i])):
        return True
    return any(t["protected"] > 0 for t in report.get("totals", [])[i:i + 1])


def has_slack(report: dict) -> bool:
    """Whether any model protects entries (a slack above 0 somewhere): only then do the
    ``protected`` / ``important dropped`` counters mean something."""
    return any(_model_has_slack(report, i) for i in range(_n_models(report)))


# -- formatting ----------------------------------------------------------------------------

DASH = "-"


def _pct(a: int, b: int) -> str:
    """a / b as a percentage (b = 0: "-"; tiny non-zero values are not shown as 0)."""
    if not b:
        return DASH
    v = 100.0 * a / b
    if v == 0:
        return "0%"
    if v < 0.1:
        return "<0.1%"
    return f"{v:.1f}%"


def _int(a: int) -> str:
    return f"{a:,}"


def _render(headers: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    """Columns separated by two spaces; the first ``left`` columns left-aligned, the rest
    right-aligned. A row ``None`` is a blank separator line."""
    real = [r for r in rows if r is not None]
    widths = [max(len(str(r[j])) for r in [headers, *real]) for j in range(len(headers))]

    def line(r):
        cells = [str(c).ljust(w) if j < left else str(c).rjust(w)
                 for j, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += ["" if r is None else line(r) for r in rows]
    return out


def _no_counters_line(report: dict) -> str:
    method = report.get("parameters", {}).get("method", "?")
    return (f"method {method} makes no per-entry decisions (no trim, no sign election): "
            "there are no kept / selected / dropped counters to show")


def _model_cells(report, i: int, group: dict, slack: bool) -> list[str]:
    row = group["counts"][i]
    pop = group["population"]
    cells = [_pct(row[_C["kept"]], pop), _pct(row[_C["selected"]], pop),
             _pct(row[_C["dropped_by_sign"]], pop)]
    if slack:
        prot = row[_C["protected"]]
        if prot == 0:
            cells += [DASH] * 4
        else:
            imp, ties = row[_C["important_dropped"]], row[_C["ties_important_dropped"]]
            cells += [_pct(prot, pop), f"{_int(imp)} ({_pct(imp, prot)})",
                      f"{_int(ties)} ({_pct(ties, prot)})", _int(ties - imp)]
    return cells


def _legend(slack: bool) -> list[str]:
    lines = [f"kept, selected, dropped by sign{', protected' if slack else ''}: % of the "
             "entries (population) of the row's tensors"]
    if slack:
        lines.append("important dropped: protected entries the election dropped, count "
                     "(% of protected); plain TIES: what plain TIES would drop of the same "
                     "protected entries; saved = plain TIES - important dropped")
    return lines


def _table_lines(report: dict, by: str, legend: bool = True) -> list[str]:
    if by not in _GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(_GROUPINGS)}, got {by!r}")
    if not has_counters(report):
        return [_no_counters_line(report)]
    slack = has_slack(report)
    names = short_labels(_labels(report))
    first = {"module": "module", "layer": "layer", "total": "tensors"}[by]
    headers = [first, "model", "entries", "kept", "selected", "dropped by sign"]
    if slack:
        headers += ["protected", "important dropped", "plain TIES", "saved"]
    rows = []
    groups = _GROUPINGS[by](report)
    for k, (key, g) in enumerate(groups):
        for i, name in enumerate(names):
            head = [_group_name(by, key), name, _int(g["population"])] if i == 0 else \
                ["", name, ""]
            rows.append(head + _model_cells(report, i, g, slack))
    return _render(headers, rows) + ([""] + _legend(slack) if legend else [])


def table(report: dict, by: str = "module") -> str:
    """A text table of the report's counters per model, grouped ``by="module"`` (module
    types: attention q/k/v/o, MLP gate/up/down, norms, embeddings, lm_head, other) or
    ``by="layer"`` (the layer index in the tensor name; tensors outside the layer stack
    last). Fractions are % of the group's entries; the protected / important-dropped
    columns appear only when some model has a slack above 0."""
    return "\n".join(_table_lines(report, by))


def _method_knobs(report: dict) -> tuple[list[str], bool, bool]:
    """(the per-model knobs the report's method reads, whether it has a sign election,
    whether it trims); every knob for a method this version does not know."""
    from . import methods
    p = report.get("parameters", {})
    try:
        m = methods.get(p.get("method"))
    except (KeyError, TypeError):
        return ["weights", "density", "slack"], True, True
    return ([k for k in m.knobs if methods.KNOBS[k].per_model], m.elect, m.thresholds)


def _header_lines(report: dict) -> list[str]:
    p = report.get("parameters", {})
    knob_names, elect, trims = _method_knobs(report)
    first = [f"method {p.get('method', '?')}"]
    if "scale" in p and p.get("method") != "linear":
        first.append(f"scale {_fmt_spec(p['scale'])}")
    if "normalize" in p:
        first.append(f"normalize {str(p['normalize']).lower()}")
    if elect and "elect" in p:
        first.append(f"elect {p['elect']}")
    if trims and "scope" in p:
        first.append(f"scope {p['scope']}")
    first.append(f"backend {report.get('backend', '?')}")
    lines = [f"fastmerge report ({report.get('format', '?')}): " + ", ".join(first)]
    labels = _labels(report)
    names = short_labels(labels)
    width = max([len("base")] + [len(x) for x in names])
    if report.get("base") is not None:
        lines.append(f"  {'base'.ljust(width)}  {report['base']}")
    knobs = [(k, p.get(k) or []) for k in knob_names]
    for i, (name, label) in enumerate(zip(names, labels)):
        spec = ", ".join(f"{'weight' if k == 'weights' else k} {_fmt_spec(v[i])}"
                         for k, v in knobs if i < len(v))
        lines.append(f"  {name.ljust(width)}  {label}" + (f"  ({spec})" if spec else ""))
    lines.append(f"  {report.get('merged_tensors', 0):,} merged tensors, "
                 f"{report.get('population', 0):,} entries per model")
    return lines


def _nonfinite_lines(report: dict) -> list[str]:
    names = short_labels(_labels(report))
    bad = [(names[i], t["nonfinite"]) for i, t in enumerate(report.get("totals", []))
           if t.get("nonfinite")]
    if not bad:
        return []
    return ["non-finite task-vector entries merged (allow_nonfinite): "
            + ", ".join(f"{n} {_int(c)}" for n, c in bad)]


def summary(report: dict, by: str = "module") -> str:
    """The end-of-merge summary: parameters and models, totals per model, and the table
    ``by`` module type (or layer)."""
    lines = _header_lines(report) + [""]
    if not has_counters(report):
        return "\n".join(lines + [_no_counters_line(report)] + _vocabulary_lines(report))
    lines += _table_lines(report, "total", legend=False)
    lines += _nonfinite_lines(report)
    lines += [""] + _table_lines(report, by)
    return "\n".join(lines + _vocabulary_lines(report))


def _vocabulary_lines(report: dict) -> list[str]:
    """The aligned vocabulary (docs/spec.md §13), when there is one: source and size,
    rows per vocabulary tensor by how they were made, where the new tokens came from."""
    v = report.get("vocabulary")
    if not v:
        return []
    new = ", ".join(f"{x['tokens']:,} from {x['model']}" for x in v.get("new_tokens", []))
    lines = ["", f"vocabulary: {v['source']}, {v['tokens']:,} tokens, {v['rows']:,} rows"
             + (f"; tokens the base lacks: {new}" if new else "")]
    for t in v.get("tensors", []):
        parts = [f"{t[k]:,} {k}" for k in ("merged", "averaged", "copied", "padding") if t[k]]
        lines.append(f"  {t['name']}: rows " + ", ".join(parts))
    for x in v.get("missing_tokens", []):
        lines.append(f"  {x['model']} lacks {x['tokens']:,} of the output's tokens (no vote "
                     "on those rows)")
    for x in v.get("not_in_output", []):
        lines.append(f"  {x['tokens']:,} tokens of {x['model']} are not in the output")
    for x in v.get("rows_without_token", []):
        lines.append(f"  {x['rows']:,} embedding rows of {x['model']} have no token (padding, "
                     "left out)")
    return lines


# -- two reports side by side -----------------------------------------------------------

def _describe(report: dict) -> str:
    """One line naming a merge: method and its per-model knobs (weights when not all 1)."""
    p = report.get("parameters", {})
    parts = [str(p.get("method", "?"))]
    knob_names, _, trims = _method_knobs(report)
    for k in knob_names:
        v = p.get(k) or []
        if k == "weights" and all(x == 1 for x in v):
            continue
        parts.append(f"{'weight' if k == 'weights' else k} [{', '.join(map(_fmt_spec, v))}]")
    if trims and p.get("scope", "tensor") != "tensor":
        parts.append(f"scope {p['scope']}")
    return ", ".join(parts)


def compare(report_a: dict, report_b: dict, by: str = "module") -> str:
    """Two reports side by side (e.g. slack 0 vs 0.05), per module type (or ``by="layer"``)
    and model: selected and dropped-by-sign fractions, and the important entries each
    merge dropped next to what plain TIES would drop of them."""
    if by not in _GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(_GROUPINGS)}, got {by!r}")
    lines = [f"A: {_describe(report_a)}", f"B: {_describe(report_b)}"]
    la, lb = _labels(report_a), _labels(report_b)
    if la != lb:
        lines.append("note: the reports name different models: A " + ", ".join(la)
                     + "; B " + ", ".join(lb))
    if report_a.get("population") != report_b.get("population") or \
            [t["name"] for t in report_a.get("tensors", [])] != \
            [t["name"] for t in report_b.get("tensors", [])]:
        lines.append("note: the reports merged different tensors; rows compare what each has")
    lines.append("")
    missing = [x for x, r in (("A", report_a), ("B", report_b)) if not has_counters(r)]
    if missing:
        for x, r in (("A", report_a), ("B", report_b)):
            if not has_counters(r):
                lines.append(f"{x}: {_no_counters_line(r)}")
        return "\n".join(lines)
    ga, gb = dict(_GROUPINGS[by](report_a)), dict(_GROUPINGS[by](report_b))
    keys = list(ga) + [k for k in gb if k not in ga]
    if by == "module":
        keys.sort(key=_MODULE_ORDER.__getitem__)
    elif by == "layer":
        keys.sort(key=lambda k: (k is None, -1 if k is None else k))
    protects = [x for x, r in (("A", report_a), ("B", report_b)) if has_slack(r)]
    names = short_labels(la if len(la) >= len(lb) else lb)
    headers = [by if by != "total" else "tensors", "model", "selected A", "selected B",
               "dropped by sign A", "dropped by sign B"]
    headers += [f"important dropped {x}" for x in protects]

    def imp(g, i):
        if g is None or i >= len(g["counts"]):
            return DASH
        row = g["counts"][i]
        prot = row[_C["protected"]]
        if prot == 0:
            return DASH
        return (f"{_int(row[_C['important_dropped']])} of {_int(prot)} "
                f"(plain TIES {_int(row[_C['ties_important_dropped']])})")

    def frac(g, i, counter):
        if g is None or i >= len(g["counts"]):
            return DASH
        return _pct(g["counts"][i][_C[counter]], g["population"])

    rows = []
    for key in keys:
        a, b = ga.get(key), gb.get(key)
        for i, name in enumerate(names):
            row = [_group_name(by, key) if i == 0 else "", name,
                   frac(a, i, "selected"), frac(b, i, "selected"),
                   frac(a, i, "dropped_by_sign"), frac(b, i, "dropped_by_sign")]
            row += [imp(g, i) for x, g in (("A", a), ("B", b)) if x in protects]
            rows.append(row)
    lines += _render(headers, rows)
    lines += ["", "selected, dropped by sign: % of the row's entries"]
    if protects:
        lines.append("important dropped: protected entries (top slack of |τ|) the merge "
                     "dropped, of all protected; plain TIES: what plain TIES would drop of "
                     "them. '-': that merge protects nothing there (slack 0)")
    if len(protects) == 1:
        other = "B" if protects == ["A"] else "A"
        lines.append(f"{other} protects nothing (slack 0), so it has no important-dropped "
                     f"column; if {other} is plain TIES with the same weights and densities, "
                     f"{protects[0]}'s 'plain TIES' counts are what {other} drops of "
                     f"{protects[0]}'s protected entries")
    return "\n".join(lines)


# -- plot ----------------------------------------------------------------------------------

def _per_layer(report: dict):
    """{layer: group} over the layer tensors."""
    return {k: g for k, g in _by_layer(report) if k is not None}


def plot(reports, path, labels=None, dpi: int = 120) -> Path:
    """Write a PNG of, per layer, (left) the important-dropped fraction — protected entries
    dropped, % of protected — of this merge (solid) and of plain TIES on the same entries
    (dashed), one pair of lines per model with a slack; (right) the dropped-by-sign
    fraction (% of the entries) per model. ``reports``: one report (dict, output folder or
    report file) or several, drawn together; ``labels``: one name per report. Needs
    matplotlib (``pip install matplotlib``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("fastmerge.report.plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'fastmerge[report]')") from exc
    if isinstance(reports, (dict, str, os.PathLike)):
        reports = [reports]
    reports = [r if isinstance(r, dict) else load(r) for r in reports]
    if not reports:
        raise ValueError("plot needs at least one report")
    if labels is None:
        descs = [_describe(r) for r in reports]
        labels = descs if len(set(descs)) == len(descs) else \
            [f"{chr(65 + k)}: {d}" for k, d in enumerate(descs)]
    labels = [str(x) for x in labels]
    if len(labels) != len(reports):
        raise ValueError(f"plot: {len(labels)} labels for {len(reports)} reports")
    several = len(reports) > 1

    fig = Figure(figsize=(13, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_imp, ax_sign = fig.subplots(1, 2)
    colors = [f"C{k}" for k in range(10)]
    n_line = 0
    any_imp = any_layer = False
    for r, rlabel in zip(reports, labels):
        layers = _per_layer(r)
        if not layers:
            continue
        any_layer = True
        xs = sorted(layers)
        names = short_labels(_labels(r))
        for i, name in enumerate(names):
            color = colors[n_line % len(colors)]
            n_line += 1
            who = f"{rlabel}: {name}" if several else name
            sign = [100.0 * layers[x]["counts"][i][_C["dropped_by_sign"]]
                    / max(1, layers[x]["population"]) for x in xs]
            ax_sign.plot(xs, sign, color=color, marker=".", label=who)
            prot = [layers[x]["counts"][i][_C["protected"]] for x in xs]
            if not any(prot):
                continue
            any_imp = True
            imp = [100.0 * layers[x]["counts"][i][_C["important_dropped"]] / p if p else math.nan
                   for x, p in zip(xs, prot)]
            ties = [100.0 * layers[x]["counts"][i][_C["ties_important_dropped"]] / p
                    if p else math.nan for x, p in zip(xs, prot)]
            ax_imp.plot(xs, ties, color=color, linestyle="--", marker=".",
                        label=f"{who}: plain TIES")
            ax_imp.plot(xs, imp, color=color, linestyle="-", marker="o", markersize=3,
                        label=f"{who}: this merge")
    if not any_layer:
        raise ValueError("plot: no report has per-entry counters on layer tensors "
                         "(methods without a trim or election have none)")
    ax_imp.set_title("important entries dropped (protected, top slack of |τ|)")
    ax_imp.set_xlabel("layer")
    ax_imp.set_ylabel("% of the protected entries")
    if any_imp:
        ax_imp.legend(fontsize=8)
    else:
        ax_imp.text(0.5, 0.5, "no protected entries (slack 0):\nnothing to show",
                    ha="center", va="center", transform=ax_imp.transAxes)
    ax_sign.set_title("dropped by the sign election")
    ax_sign.set_xlabel("layer")
    ax_sign.set_ylabel("% of the entries")
    ax_sign.legend(fontsize=8)
    for ax in (ax_imp, ax_sign):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path


# -- command line ------------------------------------------------------------------------

def main(argv=None) -> int:
    """``python -m fastmerge.report OUTPUT_DIR [--by module|layer] [--plot FILE.png]
    [--compare OTHER_DIR]`` (``fastmerge report``)."""
    from .errors import FastmergeError

    ap = argparse.ArgumentParser(
        prog="fastmerge report",
        description="Read a merge's fastmerge_report.json: totals and a table per module "
                    "type or layer, a comparison of two merges, a plot per layer.")
    ap.add_argument("output", help="merged output folder (or its fastmerge_report.json)")
    ap.add_argument("--by", choices=("module", "layer"), default="module",
                    help="group the table by module type (default) or by layer")
    ap.add_argument("--compare", metavar="OTHER", default=None,
                    help="a second output folder or report: show both side by side (A: "
                         "OUTPUT, B: OTHER)")
    ap.add_argument("--plot", metavar="FILE.png", default=None,
                    help="also write a PNG per layer (needs matplotlib)")
    args = ap.parse_args(argv)
    try:
        a = load(args.output)
        b = load(args.compare) if args.compare else None
        if b is None:
            print(summary(a, by=args.by))
        else:
            print(compare(a, b, by=args.by))
        if args.plot:
            names = None
            if b is not None:
                names = [f"A: {_describe(a)}", f"B: {_describe(b)}"]
            written = plot([a] if b is None else [a, b], args.plot, labels=names)
            print(f"wrote {written}")
    except BrokenPipeError:     # `... | head`: stop quietly (as the Python docs advise)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (FastmergeError, ImportError, ValueError, OSError) as exc:
        print(f"fastmerge report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
