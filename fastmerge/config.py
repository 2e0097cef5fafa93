"""Merge configs in the YAML format mergekit users already write.

    merge_method: ties_sv            # linear | task_arithmetic | ties | ties_sv
    base_model: path/or/hub-id
    models:
      - model: path/to/ct
        parameters: {weight: 1.0, density: 0.2, slack: 0.05}
      - model: path/to/sft
        parameters: {weight: 1.0, density: 0.2, slack: 0.05}
    parameters: {normalize: true, lambda: 1.0, elect: sum, scope: tensor}
    dtype: float16

Global ``parameters`` may also hold ``weight``/``density``/``slack`` as defaults for every
model. A model entry equal to ``base_model`` is skipped (mergekit lists it that way).
Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ParameterError

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype"}
GLOBAL_PARAMS = {"normalize", "lambda", "elect", "consensus_method", "scope",
                 "weight", "density", "slack"}
MODEL_KEYS = {"model", "parameters"}
MODEL_PARAMS = {"weight", "density", "slack"}
METHOD_ALIASES = {"ties-sv": "ties_sv", "ties_sv": "ties_sv", "ties": "ties",
                  "task_arithmetic": "task_arithmetic", "linear": "linear"}
KNOB_DEFAULTS = {"weight": 1.0, "density": 0.2, "slack": 0.0}


def _check_keys(where: str, mapping, allowed: set) -> None:
    if not isinstance(mapping, dict):
        raise ParameterError(f"{where} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(map(str, mapping)) - allowed)
    if unknown:
        raise ParameterError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(sorted(allowed))}")


def _scalar(where: str, value):
    if isinstance(value, (dict, list)):
        raise ParameterError(f"{where} must be a single number (gradients and per-layer "
                             f"filters are not supported), got {value!r}")
    return value


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


def config_to_kwargs(doc) -> dict:
    """Validate a parsed config and map it to ``merge()`` keyword arguments."""
    _check_keys("config", doc, TOP_KEYS)
    if "merge_method" not in doc:
        raise ParameterError("config: 'merge_method' is required")
    method = METHOD_ALIASES.get(str(doc["merge_method"]).lower())
    if method is None:
        raise ParameterError(f"merge_method must be one of {', '.join(sorted(METHOD_ALIASES))}, "
                             f"got {doc['merge_method']!r}")
    base = doc.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ParameterError(f"base_model must be a path or hub id, got {base!r}")
    glob = doc.get("parameters") or {}
    _check_keys("parameters", glob, GLOBAL_PARAMS)
    entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise ParameterError("config: 'models' must be a non-empty list of {model: ...} entries")

    models, knobs = [], {k: [] for k in MODEL_PARAMS}
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
        for k in MODEL_PARAMS:
            knobs[k].append(_scalar(f"models[{i}].parameters.{k}",
                                    mp.get(k, glob.get(k, KNOB_DEFAULTS[k]))))
    if not models:
        raise ParameterError("config: no model to merge besides the base model")

    kwargs = {"base": base, "models": models, "method": method,
              "weights": knobs["weight"], "density": knobs["density"], "slack": knobs["slack"]}
    if "lambda" in glob:
        kwargs["scale"] = _scalar("parameters.lambda", glob["lambda"])
    if "normalize" in glob:
        kwargs["normalize"] = glob["normalize"]
    if "elect" in glob and "consensus_method" in glob:
        raise ParameterError("parameters: give 'elect' or 'consensus_method', not both")
    if "elect" in glob or "consensus_method" in glob:
        kwargs["elect"] = glob.get("elect", glob.get("consensus_method"))
    if "scope" in glob:
        kwargs["scope"] = glob["scope"]
    if doc.get("dtype") is not None:
        kwargs["dtype"] = doc["dtype"]
    return kwargs
