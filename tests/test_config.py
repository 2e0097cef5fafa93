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
    ({"merge_method": "ties", "models": [{"model": "a"}], "tokenizer_source": "union",
      "tokenizer": {"source": "base"}}, "give tokenizer_source or tokenizer, not both"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "tokenizer": {"source": "base",
                                                                      "tokens": {}}},
     "tokenizer.tokens (per-token embedding sources) is a mergekit key fastmerge does not"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "tokenizer": {"sorce": "base"}},
     "tokenizer: unknown key(s) 'sorce'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "config_from": "b"}, "config_from must be 'base' or one of the models"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "tokenzer": 1},
     "unknown key(s) 'tokenzer'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1,
                                                                       "density": 1.5}}]},
     "models[0].parameters.density must be in [0, 1], got 1.5"),
    ({"merge_method": "ties", "models": [{"model": "a"}]}, "models[0]: 'weight' is required"),
    ({"merge_method": "sce", "models": [{"model": "a"}]},
     "'sce' is a mergekit method fastmerge does not have yet; fastmerge has: linear"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "parameters": {"int8_mask": "yes"}}, "parameters.int8_mask must be true or false"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "int8_mask": True}, "config: unknown key(s) 'int8_mask'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"densty": .2}}]},
     "models[0].parameters: unknown key(s) 'densty'"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "parameters": {"lamda": 1}},
     "parameters: unknown key(s) 'lamda'"),
    ({"merge_method": "dare", "models": [{"model": "a"}]}, "merge_method must be one of"),
    ({"models": [{"model": "a"}]}, "'merge_method' is required"),
    ({"merge_method": "ties", "models": []}, "'models' must be a non-empty list"),
    ({"merge_method": "ties", "base_model": "a", "models": [{"model": "a"}]},
     "no model to merge besides the base"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {
        "weight": 1, "density": [{"filter": "mlp", "value": "x"}]}}]},
     "models[0].parameters.density[0].value must be a number"),
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


def test_omitted_knobs_take_mergekit_defaults():
    """mergekit: density defaults to 1.0, lambda to 1.0, weight is required; the output
    dtype is out_dtype, else dtype; int8_mask is accepted and changes nothing."""
    doc = {"merge_method": "ties", "base_model": "b", "parameters": {"int8_mask": True},
           "dtype": "float32",
           "out_dtype": "bfloat16",
           "models": [{"model": "x", "parameters": {"weight": 1.0}},
                      {"model": "y", "parameters": {"weight": 0.5}}]}
    kw = config_to_kwargs(doc)
    assert kw["density"] == [1.0, 1.0] and kw["weights"] == [1.0, 0.5]
    assert kw["slack"] == [0.0, 0.0] and "scale" not in kw and kw["dtype"] == "bfloat16"
    doc["parameters"]["weight"] = 2.0
    del doc["models"][1]["parameters"]
    assert config_to_kwargs(doc)["weights"] == [1.0, 2.0]


def test_filters_and_gradients_resolve_per_tensor():
    """A model's own filter wins where it matches; elsewhere the global value applies,
    then mergekit's default; gradients interpolate over the layer index."""
    from fastmerge.params import make_params
    doc = {"merge_method": "ties", "base_model": "b",
           "parameters": {"density": [{"filter": "self_attn", "value": 0.3}], "weight": 1.0,
                          "lambda": [1.0, 0.5]},
           "models": [{"model": "x", "parameters": {"density": [{"filter": "mlp", "value": 0.5}]}},
                      {"model": "y", "parameters": {"weight": [0.0, 1.0]}}]}
    kw = config_to_kwargs(doc)
    params = make_params(kw["method"], 2, weights=kw["weights"], density=kw["density"],
                         slack=kw["slack"], scale=kw["scale"])
    mlp = params.for_tensor("model.layers.0.mlp.up_proj.weight", num_layers=3)
    attn = params.for_tensor("model.layers.2.self_attn.q_proj.weight", num_layers=3)
    norm = params.for_tensor("model.norm.weight", num_layers=3)
    assert mlp.density == (0.5, 1.0) and attn.density == (0.3, 0.3) and norm.density == (1.0, 1.0)
    assert mlp.weights == (1.0, 0.0) and attn.weights == (1.0, 1.0)
    assert mlp.scale == 1.0 and attn.scale == 0.5
    lay1 = params.for_tensor("model.layers.1.mlp.up_proj.weight", num_layers=3)
    assert lay1.weights == (1.0, 0.5) and lay1.scale == 0.75


def test_per_tensor_density_refused_with_model_scope():
    from fastmerge.params import make_params
    with pytest.raises(ParameterError, match="scope 'model' takes one density"):
        make_params("ties", 1, density=[[{"filter": "mlp", "value": 0.5}, {"value": 0.2}]],
                    scope="model")


def test_unset_filtered_weight_names_tensor_and_model():
    from fastmerge.params import make_params
    params = make_params("ties", 1, weights=[[{"filter": "mlp", "value": 0.5}]])
    assert params.for_tensor("model.layers.0.mlp.up_proj.weight", 2).weights == (0.5,)
    with pytest.raises(ParameterError, match="tensor 'model.norm.weight': weights of model 0 "
                                             "is not set"):
        params.for_tensor("model.norm.weight", 2)
