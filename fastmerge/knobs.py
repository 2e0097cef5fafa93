"""Per-tensor knob values (scalars, gradients, filters) with mergekit's meaning.

A merge parameter in a mergekit YAML (``weight``, ``density``, ``lambda`` ...) may be

* a number:                      ``weight: 0.5``
* a gradient, a list of numbers: ``weight: [0, 0.5, 1]``
* a list of conditional entries: ``density: [{filter: mlp, value: 0.5}, {value: 0.2}]``
  where each ``value`` is a number or a gradient and the last entry may omit ``filter``.

What mergekit does (read from arcee-ai/mergekit at a6e4028; the rules have not changed
since the package was created, per ``git log -S`` on the lines involved):

Filters -- ``mergekit/config.py: evaluate_setting``
    The entries are tried in order and the FIRST one that matches decides; its value is
    evaluated (it may itself be a gradient). An entry matches when its filter is absent,
    or is exactly ``"*"``, or is a SUBSTRING of the tensor's full name as stored in the
    checkpoint (plain ``in``: case-sensitive, no globbing, no regex; so ``mlp`` matches
    every ``...mlp...`` tensor, and ``layers.1`` matches layers 1, 10-19, 100...).
    When no entry matches the result is None: "not set here", not an error.

Which name is matched -- ``mergekit/plan.py: MergePlanner.plan_tensor``
    The full tensor name (e.g. ``model.layers.3.mlp.up_proj.weight``) from mergekit's
    architecture templates, which are the checkpoint's names. Method-wide knobs are
    matched against the output tensor's name, per-model knobs against that model's input
    tensor name; with the ``models:`` syntax the two are the same name.

Levels -- ``mergekit/config.py: ConfigReader.parameter``
    Per knob, independently: a per-model knob (``models[i].parameters.<k>``, what
    mergekit calls a tensor parameter: ``weight``, ``density``) is looked up first in the
    model's own parameters, then in the global ``parameters:``; the first level whose
    value is not None wins. So a per-model filter list that does not match this tensor
    (and has no default entry) falls through to the global value. Method-wide knobs
    (``lambda``, ``normalize``) are read from the global ``parameters:`` only. When every
    level gives None, mergekit uses the method's default for the knob, or fails with
    "Missing required parameter" if the knob is required (``weight`` is; the base model
    is exempt). ``resolve_first`` does the lookup; the default is the caller's business.

Gradients -- ``evaluate_setting`` and ``MergePlanner.plan_slice`` / ``plan_module``
    Each tensor has a position t in [0, 1]. A gradient of n anchors spreads them evenly
    over [0, 1] (anchor k sits at k/(n-1)) and interpolates linearly between the two
    neighbours: s = t*(n-1), i = floor(s), j = min(i+1, n-1), f = s-i, value =
    (1-f)*a[i] + f*a[j]. One anchor means a constant. We compute exactly this, in this
    order, so the float64 values are bit-identical to mergekit's.
    For a layer tensor, t = layer / (num_layers - 1); with a single layer t = 1 (so a
    one-layer model takes the LAST anchor). Tensors outside the layer stack -- embeddings
    (``plan_module`` ``pre_weights``), final norm and lm_head (``post_weights``) -- are
    planned with t = 0, i.e. they take the FIRST anchor, lm_head included. (With
    ``slices:`` t runs over each slice separately; fastmerge only has ``models:``, where
    there is one slice covering all layers.)

Layer index and layer count -- ``mergekit/architecture``
    For known architectures mergekit does not parse names: its JSON definitions
    (``json_definitions.py``) list pre-layer, per-layer (``...${layer_index}...``) and
    post-layer weights, and the layer count is read from the model config under the
    definition's ``num_layers_config_key`` (``num_hidden_layers`` for Llama, Mistral,
    Qwen2, GPT-NeoX ...; ``n_layer`` for GPT-2, GPTBigCode, Jais; ``text_config.
    num_hidden_layers`` for VL wrappers; see ``ModuleArchitecture.num_layers`` and
    ``common.get_config_value``). For unknown architectures ``architecture/auto.py:
    infer_architecture_info`` works from names alone: the layer index is the first
    ``.<digits>.`` in the name (``RE_LAYER_INDEX``), the layer count is the largest such
    index + 1, and every name without one is a pre-layer weight (t = 0).

Where we must differ (we have names and config.json, not mergekit's JSON definitions):

* ``layer_index`` always uses the name rule of ``auto.py`` (first ``.<digits>.``). For
  every layer template in mergekit's JSON definitions that rule gives the template's
  layer index (checked over all of them), for Llama/Mistral/Qwen2 ``model.layers.N.``,
  GPT-NeoX ``gpt_neox.layers.N.``, GPT-2/Falcon/Qwen ``transformer.h.N.``, BERT
  ``encoder.layer.N.``, T5 ``block.N.``, Mamba ``backbone.layers.N.``; MoE expert
  indices come after the layer index and are ignored.
* A name whose index is not below ``num_layers`` is treated as outside the stack
  (t = 0); this matches phi-1's ``layers.<num_layers>.linear`` post weights.
* ``num_layers_from_config`` reads a plain config.json dict, which lacks
  transformers' ``attribute_map`` aliases, so it tries ``num_hidden_layers``,
  ``n_layer``, ``n_layers``, ``num_layers`` and then ``text_config.num_hidden_layers``.
* Models with several layer stacks (vision tower + text decoder, encoder + decoder)
  are several modules in mergekit, each with its own count; here there is one stack.
* Validation is stricter than mergekit's pydantic model: ``check_knob`` rejects booleans
  and numeric strings (pydantic turns ``true`` and ``"0.5"`` into floats), NaN/inf,
  unknown keys in an entry (pydantic silently drops ``fliter:``, turning the entry into
  a catch-all), an empty gradient and a bare ``{filter, value}`` mapping (both crash
  mergekit at merge time), an empty filter (it is a substring of every name, a
  catch-all in disguise) and entries after a catch-all (``filter`` absent or ``"*"``),
  which mergekit could never reach. A later filter that can never match because an
  earlier one is its substring (``mlp`` before ``mlp.up_proj``) is not detected.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Union

from .errors import InputError, ParameterError

KnobValue = Union[float, list[float], list[dict]]  # ints are accepted where floats are

ENTRY_KEYS = ("filter", "value")
CATCH_ALL = "*"
LAYER_INDEX = re.compile(r"\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers",
                    "text_config.num_hidden_layers")


# ---------------------------------------------------------------- validation

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(where: str, x) -> None:
    if not _is_number(x):
        raise ParameterError(f"{where} must be a number, got {x!r}")
    if not math.isfinite(x):
        raise ParameterError(f"{where} must be finite, got {x!r}")


def _check_scalar_or_gradient(where: str, value) -> None:
    if isinstance(value, list):
        if not value:
            raise ParameterError(f"{where} is an empty gradient; give at least one number")
        for k, x in enumerate(value):
            if isinstance(x, (dict, list)):
                raise ParameterError(f"{where}[{k}] must be a number (a gradient is a list "
                                     f"of numbers), got {x!r}")
            _check_number(f"{where}[{k}]", x)
    else:
        _check_number(where, value)


def _is_catch_all(entry: dict) -> bool:
    return entry.get("filter") is None or entry.get("filter") == CATCH_ALL


def check_knob(where: str, value) -> None:
    """Raise ParameterError, naming ``where``, unless ``value`` is a well-formed knob."""
    if isinstance(value, dict):
        raise ParameterError(f"{where}: a single {{filter, value}} mapping is not a knob; "
                             f"write a list of them: [{{filter: ..., value: ...}}, {{value: ...}}]")
    if not (isinstance(value, list) and any(isinstance(x, dict) for x in value)):
        if not (isinstance(value, list) or _is_number(value)):
            raise ParameterError(f"{where} must be a number, a list of numbers (gradient) "
                                 f"or a list of {{filter, value}} entries, got {value!r}")
        _check_scalar_or_gradient(where, value)
        return
    for k, entry in enumerate(value):
        here = f"{where}[{k}]"
        if not isinstance(entry, dict):
            raise ParameterError(f"{here}: a list of filters must hold only {{filter, value}} "
                                 f"entries, got {entry!r}")
        unknown = sorted(set(map(str, entry)) - set(ENTRY_KEYS))
        if unknown:
            raise ParameterError(f"{here}: unknown key(s) {', '.join(map(repr, unknown))}; "
                                 f"allowed: filter, value")
        if "value" not in entry:
            raise ParameterError(f"{here}: 'value' is required")
        filt = entry.get("filter")
        if filt is not None and not isinstance(filt, str):
            raise ParameterError(f"{here}.filter must be a string, got {filt!r}")
        if filt == "":
            raise ParameterError(f"{here}.filter is empty (it would match every tensor); "
                                 f"omit 'filter' for the default entry")
        _check_scalar_or_gradient(f"{here}.value", entry["value"])
        if _is_catch_all(entry) and k != len(value) - 1:
            raise ParameterError(f"{here} matches every tensor (no filter or '*'), so the "
                                 f"entries after it could never apply; put it last")


# ---------------------------------------------------------------- layers

def layer_index(tensor_name: str) -> Optional[int]:
    """The layer a tensor belongs to: the first ``.<digits>.`` in its name, else None."""
    m = LAYER_INDEX.search(tensor_name)
    return int(m.group(1)) if m else None


def num_layers_from_config(config: dict) -> Optional[int]:
    """Layer count from a config.json dict (first of LAYER_COUNT_KEYS present), else None."""
    for key in LAYER_COUNT_KEYS:
        obj = config
        for part in key.split("."):
            obj = obj.get(part) if isinstance(obj, dict) else None
        if obj is None:
            continue
        if not isinstance(obj, int) or isinstance(obj, bool) or obj < 0:
            raise InputError(f"config: {key} must be a non-negative integer, got {obj!r}")
        return obj
    return None


def count_layers(tensor_names: Iterable[str]) -> int:
    """Layer count from names alone: the largest layer index + 1 (0 when there is none)."""
    return max((i + 1 for i in map(layer_index, tensor_names) if i is not None), default=0)


def layer_count(config: Optional[dict] = None, tensor_names: Iterable[str] = ()) -> int:
    """Layer count from the config when it has one, else counted from the tensor names."""
    n = num_layers_from_config(config) if config else None
    return count_layers(tensor_names) if n is None else n


def position(tensor_name: str, num_layers: int) -> float:
    """A tensor's place t in [0, 1] along the layers; 0 for tensors outside them."""
    if num_layers < 0:
        raise ParameterError(f"num_layers must be >= 0, got {num_layers}")
    i = layer_index(tensor_name)
    if i is None or i >= num_layers:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


# ---------------------------------------------------------------- resolution

def _interpolate(anchors: list, t: float) -> float:
    s = t * (len(anchors) - 1)
    i = int(s)
    j = min(len(anchors) - 1, i + 1)
    f = s - i
    return float((1 - f) * anchors[i] + f * anchors[j])


def _evaluate(value, t: float) -> float:
    return _interpolate(value, t) if isinstance(value, list) else float(value)


def _matches(entry: dict, tensor_name: str) -> bool:
    return _is_catch_all(entry) or (bool(tensor_name) and entry["filter"] in tensor_name)


def resolve(value: KnobValue, tensor_name: str, num_layers: int) -> Optional[float]:
    """The knob's value for this tensor; None when no filter entry applies to it."""
    check_knob("knob", value)
    t = position(tensor_name, num_layers)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for entry in value:
            if _matches(entry, tensor_name):
                return _evaluate(entry["value"], t)
        return None
    return _evaluate(value, t)


def resolve_first(values: Iterable[Optional[KnobValue]], tensor_name: str,
                  num_layers: int) -> Optional[float]:
    """First non-None result over levels in precedence order, e.g. (per-model, global).

    A level that is not set at all is passed as None and skipped.
    """
    for value in values:
        if value is not None:
            got = resolve(value, tensor_name, num_layers)
            if got is not None:
                return got
    return None


def is_constant(value: KnobValue) -> bool:
    """True when every tensor gets the same value (and none gets None).

    A gradient whose anchors are all equal counts as constant, although mergekit's
    interpolation formula can wobble by one float64 ulp between them.
    """
    check_knob("knob", value)
    if not isinstance(value, list):
        return True
    if not isinstance(value[0], dict):
        return len(set(value)) == 1
    if not _is_catch_all(value[-1]):
        return False  # tensors that no filter matches get None
    anchors = {float(x) for entry in value
               for x in (entry["value"] if isinstance(entry["value"], list) else [entry["value"]])}
    return len(anchors) == 1
