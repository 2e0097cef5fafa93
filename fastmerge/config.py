"""Merge configs in the YAML format mergekit users already write, with mergekit's meaning.

    merge_method: ties_sv            # linear | task_arithmetic | ties | ties_sv | dare_* |
                                     # breadcrumbs* | slerp | nuslerp | model_stock
    base_model: path/or/hub-id
    models:
      - model: path/to/ct
        parameters: {weight: 1.0, density: 0.2, slack: 0.05}
      - model: path/to/sft
        parameters:
          weight: 1.0
          density: [{filter: mlp, value: 0.5}, {value: 0.2}]   # per-tensor filters
          slack: [0.0, 0.05]                                    # a gradient over layers
    parameters: {normalize: true, lambda: 1.0, elect: sum, scope: tensor}
    dtype: float16                   # mergekit's working dtype; out_dtype wins if given

What a key means here is what it means in mergekit (docs/spec.md §11):

* ``weight`` is required (per model, or once under the global ``parameters``);
  ``density`` defaults to 1.0 and ``lambda`` to 1.0 (mergekit's defaults; the Python
  API's own defaults differ, see methods.KNOBS). A model's own value wins over the
  global one, tensor by tensor (a model filter that does not match a tensor falls back
  to the global value). Numeric knobs take filters and gradients (fastmerge.knobs).
* ``dtype`` / ``out_dtype``: the output dtype is ``out_dtype``, else ``dtype`` (as in
  mergekit). mergekit also *computes* in ``dtype``; fastmerge always computes from the
  stored values in fp32 / fp64 (docs/spec.md §7), so ``dtype`` changes only the output.
* ``slices``: mergekit turns ``models:`` into one slice whose sources cover every layer
  ([0, L]); such a config (one slice, every source ``layer_range: [0, L]``, the model's
  L) is read as that ``models:`` list, the slice's ``parameters`` over the global ones.
  Several slices or partial ranges (layer stacking) are refused: fastmerge merges whole
  models tensor by tensor.
* ``int8_mask`` (under ``parameters``, where mergekit reads it) is accepted and changes
  nothing (fastmerge's masks are never materialised). ``consensus_method`` is not read by
  mergekit's ``ties`` (it always elects by sum); fastmerge reads it as ``elect``. ``tokenizer_source`` / ``tokenizer: {source,
  pad_to_multiple_of}`` align the vocabularies by token (docs/spec.md §13); ``config_from``
  (fastmerge's) names whose config and chat template the output gets. A model entry equal to ``base_model`` is skipped (mergekit lists it).

Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from . import knobs, methods
from .errors import ParameterError
from .params import FirstOf

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype",
            "out_dtype", "tokenizer_source", "tokenizer", "config_from"}
SLICE_KEYS = {"sources", "parameters", "base_model"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
TOKENIZER_KEYS = {"source", "pad_to_multiple_of"}
PER_MODEL = ("weights", "density", "slack", "gamma", "epsilon")  # methods.KNOBS names
METHOD_ONLY = {"gamma", "epsilon"}  # per-model knobs passed only to the methods that read them
GLOBAL_ONLY = {"normalize", "lambda", "elect", "consensus_method", "scope", "int8_mask",
               "rescale", "t", "nuslerp_flatten", "nuslerp_row_wise", "filter_wise"}
# global keys only some methods read (mergekit's names): which methods
METHOD_KEYS = {"t": ("slerp",), "nuslerp_flatten": ("nuslerp",),
               "nuslerp_row_wise": ("nuslerp",), "filter_wise": ("model_stock",)}
MODEL_KEYS = {"model", "parameters"}
MODEL_PARAMS = {methods.KNOBS[k].yaml for k in PER_MODEL}
GLOBAL_PARAMS = GLOBAL_ONLY | MODEL_PARAMS
# mergekit methods fastmerge does not have yet: named in the refusal
MERGEKIT_ONLY = ("passthrough", "sce", "karcher", "arcee_fusion", "nearswap", "multislerp")


def _check_keys(where: str, mapping, allowed: set) -> None:
    if not isinstance(mapping, dict):
        raise ParameterError(f"{where} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(map(str, mapping)) - allowed)
    if unknown:
        raise ParameterError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(sorted(allowed))}")


def load_config(path) -> dict:
    """Parse a YAML config file into keyword arguments for ``fastmerge.merge``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError(f"{path}: cannot read config: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path}: invalid YAML: {exc}") from exc
    try:
        return config_to_kwargs(doc)
    except ParameterError as exc:
        raise ParameterError(f"{path}: {exc}") from None


def _method(doc) -> methods.Method:
    name = str(doc["merge_method"]).lower()
    if name in methods.ALIASES:
        return methods.get(name)
    if name in MERGEKIT_ONLY:
        raise ParameterError(f"merge_method {name!r} is a mergekit method fastmerge does not "
                             f"have yet; fastmerge has: {methods.names()}")
    raise ParameterError(f"merge_method must be one of {methods.names()}, got "
                         f"{doc['merge_method']!r}")


def _knob(knob: str, i: int, model_value, global_value, method: methods.Method):
    """One model's spec of a per-model knob: a number when it is one for every tensor,
    else FirstOf(model level, global level, mergekit's default). A knob the method does
    not read is never required (model stock and SLERP take no weight)."""
    k = methods.KNOBS[knob]
    where = f"models[{i}].parameters.{k.yaml}"
    for w, v in ((where, model_value), (f"parameters.{k.yaml}", global_value)):
        if v is not None:
            knobs.check_knob(w, v)
    default = k.yaml_default
    if default is methods.REQUIRED:
        default = None if knob in method.knobs else k.default
    levels = (model_value, global_value, default)
    first = next((v for v in levels if v is not None), None)
    if first is None:
        raise ParameterError(f"models[{i}]: {k.yaml!r} is required (as in mergekit); give it "
                             f"in models[{i}].parameters or in the global parameters")
    if isinstance(first, (int, float)):
        v = float(first)
        if not k.low <= v <= k.high:
            raise ParameterError(f"{where if model_value is not None else 'parameters.' + k.yaml}"
                                 f" must be in [{k.low:g}, {k.high:g}], got {first!r}")
        return v
    return FirstOf(levels)


def _flag(glob: dict, key: str, default: bool) -> bool:
    v = glob.get(key, default)
    if not isinstance(v, bool):
        raise ParameterError(f"parameters.{key} must be true or false, got {v!r}")
    return v


def _geometry_keys(method: methods.Method, glob: dict) -> dict:
    """``t`` (SLERP, required as in mergekit) and what one vector is (docs/spec.md §8c):
    NuSLERP's ``nuslerp_flatten`` (default true: the whole tensor; false: each row, or each
    column with ``nuslerp_row_wise: true``) and model stock's ``filter_wise`` (rows)."""
    out = {}
    if method.name == "slerp":
        if "t" not in glob:
            raise ParameterError("slerp needs parameters.t (as in mergekit): 0 is the base "
                                 "model, 1 the other model")
        knobs.check_knob("parameters.t", glob["t"])
        out["t"] = glob["t"]
    elif method.name == "nuslerp":
        if not _flag(glob, "nuslerp_flatten", True):
            out["vectors"] = "columns" if _flag(glob, "nuslerp_row_wise", False) else "rows"
        else:
            _flag(glob, "nuslerp_row_wise", False)
    elif method.name == "model_stock" and _flag(glob, "filter_wise", False):
        out["vectors"] = "rows"
    return out


def _one_slice(doc: dict, base) -> tuple[list, dict, tuple[int, int]]:
    """(model entries, the slice's parameters, its layer range) of a ``slices:`` config
    that is a ``models:`` list in mergekit's other spelling (see the module doc)."""
    if "models" in doc:
        raise ParameterError("config: give 'models' or 'slices', not both (as in mergekit)")
    slices = doc["slices"]
    if not isinstance(slices, list) or not slices:
        raise ParameterError("config: 'slices' must be a non-empty list of {sources: ...}")
    if len(slices) > 1:
        raise ParameterError(f"config: {len(slices)} slices: fastmerge merges whole models, "
                             "so it takes one slice whose sources all cover every layer "
                             "(layer stacking / frankenmerges are not supported)")
    sl = slices[0]
    _check_keys("slices[0]", sl, SLICE_KEYS)
    if sl.get("base_model") not in (None, base):
        raise ParameterError("slices[0].base_model differs from base_model; give one base")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ParameterError("slices[0].sources must be a non-empty list of {model, "
                             "layer_range} entries")
    ranges = set()
    entries = []
    for j, src in enumerate(sources):
        _check_keys(f"slices[0].sources[{j}]", src, SOURCE_KEYS)
        r = src.get("layer_range")
        if not (isinstance(r, list) and len(r) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            raise ParameterError(f"slices[0].sources[{j}].layer_range must be [start, end], "
                                 f"got {r!r}")
        ranges.add(tuple(r))
        entries.append({k: v for k, v in src.items() if k != "layer_range"})
    if len(ranges) > 1 or next(iter(ranges))[0] != 0:
        raise ParameterError(f"slices[0]: layer ranges {sorted(map(list, ranges))}: fastmerge "
                             "merges whole models, so every source must cover [0, L], the "
                             "model's L layers")
    params = sl.get("parameters") or {}
    _check_keys("slices[0].parameters", params, GLOBAL_PARAMS)
    return entries, params, next(iter(ranges))


def _tokenizer_keys(doc) -> dict:
    """mergekit's ``tokenizer_source: union|base|MODEL`` or ``tokenizer: {source, 
    pad_to_multiple_of}`` (source defaults to union there, as in mergekit) as merge()
    keywords (docs/spec.md §13). The source is checked against the models by merge()."""
    if "tokenizer_source" in doc and "tokenizer" in doc:
        raise ParameterError("give tokenizer_source or tokenizer, not both (as in mergekit)")
    out = {}
    if doc.get("tokenizer_source") is not None:
        out["tokenizer_source"] = doc["tokenizer_source"]
    if "tokenizer" in doc:
        tok = doc["tokenizer"] or {}
        if isinstance(tok, dict) and "tokens" in tok:
            raise ParameterError("tokenizer.tokens (per-token embedding sources) is a mergekit "
                                 "key fastmerge does not have; every row is merged from the "
                                 "models that have its token (docs/spec.md §13)")
        _check_keys("tokenizer", tok, TOKENIZER_KEYS)
        out["tokenizer_source"] = tok.get("source", "union")
        if tok.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = tok["pad_to_multiple_of"]
    src = out.get("tokenizer_source")
    if src is not None and not isinstance(src, str):
        raise ParameterError(f"tokenizer source must be union, base or a model, got {src!r}")
    return out


def config_to_kwargs(doc) -> dict:
    """Validate a parsed config and map it to ``merge()`` keyword arguments."""
    _check_keys("config", doc, TOP_KEYS)
    if "merge_method" not in doc:
        raise ParameterError("config: 'merge_method' is required")
    method = _method(doc)
    tokenizer = _tokenizer_keys(doc)
    base = doc.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ParameterError(f"base_model must be a path or hub id, got {base!r}")
    glob = doc.get("parameters") or {}
    _check_keys("parameters", glob, GLOBAL_PARAMS)
    if not isinstance(glob.get("int8_mask", False), bool):
        raise ParameterError(f"parameters.int8_mask must be true or false, got "
                             f"{glob['int8_mask']!r}")
    layer_range = None
    if "slices" in doc:
        entries, slice_params, layer_range = _one_slice(doc, base)
        glob = {**glob, **slice_params}
        _check_keys("slices[0].parameters", glob, GLOBAL_PARAMS)
    else:
        entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise ParameterError("config: 'models' must be a non-empty list of {model: ...} entries")

    models, per_model = [], {k: [] for k in PER_MODEL}
    for i, entry in enumerate(entries):
        _check_keys(f"models[{i}]", entry, MODEL_KEYS)
        if not isinstance(entry.get("model"), str):
            raise ParameterError(f"models[{i}].model must be a path or hub id, "
                                 f"got {entry.get('model')!r}")
        if base is not None and entry["model"] == base:
            continue
        mp = entry.get("parameters") or {}
        _check_keys(f"models[{i}].parameters", mp, MODEL_PARAMS)
        models.append(entry["model"])
        for k in PER_MODEL:
            y = methods.KNOBS[k].yaml
            if k in METHOD_ONLY and k not in method.knobs:
                if y in mp or y in glob:
                    raise ParameterError(f"{y!r} is only used by the methods "
                                         f"{', '.join(m.name for m in methods.METHODS.values() if k in m.knobs)}"
                                         f", not {method.name!r}")
                continue
            per_model[k].append(_knob(k, i, mp.get(y), glob.get(y), method))
    if not models:
        raise ParameterError("config: no model to merge besides the base model")

    kwargs = {"base": base, "models": models, "method": method.name,
              **{k: v for k, v in per_model.items() if v}}
    for key, users in METHOD_KEYS.items():
        if key in glob and method.name not in users:
            raise ParameterError(f"parameters.{key} is only used by {', '.join(users)}, not "
                                 f"{method.name!r}")
    kwargs.update(_geometry_keys(method, glob))
    if "lambda" in glob:
        knobs.check_knob("parameters.lambda", glob["lambda"])
        kwargs["scale"] = glob["lambda"]
    if "normalize" in glob:
        kwargs["normalize"] = glob["normalize"]
    if "elect" in glob and "consensus_method" in glob:
        raise ParameterError("parameters: give 'elect' or 'consensus_method', not both")
    if "elect" in glob or "consensus_method" in glob:
        kwargs["elect"] = glob.get("elect", glob.get("consensus_method"))
    if "scope" in glob:
        kwargs["scope"] = glob["scope"]
    if "rescale" in glob:
        kwargs["rescale"] = glob["rescale"]
    if layer_range is not None:
        kwargs["layer_range"] = layer_range
    kwargs.update(tokenizer)
    if doc.get("config_from") is not None:
        c = doc["config_from"]
        if not isinstance(c, str) or (c != "base" and c not in models):
            raise ParameterError(f"config_from must be 'base' or one of the models, got {c!r}")
        if c != "base":
            kwargs["config_from"] = c
    out_dtype = doc.get("out_dtype") or doc.get("dtype")
    if out_dtype is not None:
        kwargs["dtype"] = out_dtype
    return kwargs
