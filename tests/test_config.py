"""YAML configs in mergekit's format map onto merge() arguments; unknown keys are errors."""
import pytest
from hypothesis import given, settings, strategies as st

from fastmerge.config import config_to_kwargs, load_config
from fastmerge.errors import ParameterError

GOOD = """
merge_method: ties_sv
base_model: ./base
models:
  - model: ./base
  - model: ./ct
    parameters: {weight: 1.0, density: 0.3, slack: 0.05}
  - model: ./sft
    parameters: {weight: 0.5}
parameters: {normalize: true, lambda: 0.8, density: 0.2, scope: model}
dtype: bfloat16
"""


def test_mergekit_style_config(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(GOOD)
    kw = load_config(path)
    assert kw["base"] == "./base" and kw["models"] == ["./ct", "./sft"]
    assert kw["method"] == "ties_sv" and kw["weights"] == [1.0, 0.5]
    assert kw["density"] == [0.3, 0.2] and kw["slack"] == [0.05, 0.0]
    assert kw["scale"] == 0.8 and kw["normalize"] is True and kw["scope"] == "model"
    assert kw["dtype"] == "bfloat16"


@pytest.mark.parametrize("doc, fragment", [
    ({"merge_method": "ties", "models": [{"model": "a"}], "tokenizer_source": "x"},
     "unknown key(s) 'tokenizer_source'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"densty": .2}}]},
     "models[0].parameters: unknown key(s) 'densty'"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "parameters": {"lamda": 1}},
     "parameters: unknown key(s) 'lamda'"),
    ({"merge_method": "dare", "models": [{"model": "a"}]}, "merge_method must be one of"),
    ({"models": [{"model": "a"}]}, "'merge_method' is required"),
    ({"merge_method": "ties", "models": []}, "'models' must be a non-empty list"),
    ({"merge_method": "ties", "base_model": "a", "models": [{"model": "a"}]},
     "no model to merge besides the base"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"density": [0.1, .2]}}]},
     "gradients and per-layer filters are not supported"),
    ([1, 2], "config must be a mapping"),
])
def test_bad_configs_name_the_problem(doc, fragment):
    with pytest.raises(ParameterError) as exc:
        config_to_kwargs(doc)
    assert fragment in str(exc.value)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("merge_method: [unclosed\n")
    with pytest.raises(ParameterError, match="bad.yml: invalid YAML"):
        load_config(path)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(
    st.sampled_from(["merge_method", "base_model", "models", "parameters", "dtype", "x"]),
    yaml_values, max_size=5))
def test_fuzzed_configs_raise_only_parameter_errors(doc):
    """Any document either maps to kwargs or raises ParameterError, never anything else."""
    try:
        kw = config_to_kwargs(doc)
    except ParameterError:
        return
    assert kw["method"] in ("linear", "task_arithmetic", "ties", "ties_sv")
    assert len(kw["models"]) == len(kw["weights"]) >= 1


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzzed_yaml_text_raises_only_parameter_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ParameterError:
        pass
