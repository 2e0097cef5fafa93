"""Per-tensor knobs: scalars, gradients and filters resolve as mergekit resolves them."""
import pytest
from hypothesis import given, settings, strategies as st

from fastmerge.errors import InputError, ParameterError
from fastmerge.knobs import (check_knob, count_layers, is_constant, layer_count, layer_index,
                             num_layers_from_config, position, resolve, resolve_first)


def L(i, rest="mlp.up_proj.weight"):
    return f"model.layers.{i}.{rest}"


EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


# ---------------------------------------------------------------- scalars

@pytest.mark.parametrize("name", [L(0), L(31), EMBED, NORM, HEAD])
def test_scalar_is_the_same_everywhere(name):
    assert resolve(0.3, name, 32) == 0.3
    assert resolve(2, name, 32) == 2.0 and isinstance(resolve(2, name, 32), float)


# ---------------------------------------------------------------- gradients

def test_three_anchor_gradient_first_last_and_between():
    g = [0, 0.5, 1]
    assert resolve(g, L(0), 32) == 0.0
    assert resolve(g, L(31), 32) == 1.0
    # t = 10/31, s = 20/31 -> between anchors 0 and 1: 0.5 * 20/31
    assert resolve(g, L(10), 32) == pytest.approx(10 / 31, abs=1e-15)


def test_gradient_is_piecewise_linear_not_a_fit():
    g = [0, 1, 0]  # over 5 layers t = i/4, s = i/2
    assert [resolve(g, L(i), 5) for i in range(5)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_two_anchors_over_32_layers():
    g = [0.2, 0.8]
    assert resolve(g, L(0), 32) == 0.2
    assert resolve(g, L(31), 32) == 0.8
    assert resolve(g, L(15), 32) == pytest.approx(0.2 + 0.6 * 15 / 31, abs=1e-15)


def test_five_anchors_over_32_layers():
    g = [0, 0.5, 0.3, 0.7, 1]
    assert resolve(g, L(0), 32) == 0.0
    # layer 8: s = 32/31 -> anchors 1..2 with f = 1/31
    assert resolve(g, L(8), 32) == pytest.approx((30 * 0.5 + 1 * 0.3) / 31, abs=1e-15)
    # layer 16: s = 64/31 -> anchors 2..3 with f = 2/31
    assert resolve(g, L(16), 32) == pytest.approx((29 * 0.3 + 2 * 0.7) / 31, abs=1e-15)
    # layer 24: s = 96/31 -> anchors 3..4 with f = 3/31
    assert resolve(g, L(24), 32) == pytest.approx((28 * 0.7 + 3 * 1.0) / 31, abs=1e-15)
    assert resolve(g, L(31), 32) == 1.0


def test_anchors_sit_evenly_on_the_layers():
    g = [0, 0.5, 0.3, 0.7, 1]  # 33 layers: anchor k sits on layer 8k
    assert [resolve(g, L(8 * k), 33) for k in range(5)] == g


def test_one_anchor_gradient_is_a_constant():
    assert resolve([0.4], L(7), 32) == 0.4 and resolve([0.4], HEAD, 32) == 0.4


def test_single_layer_model_takes_the_last_anchor():
    assert position(L(0), 1) == 1.0
    assert resolve([0.1, 0.9], L(0), 1) == 0.9
    assert resolve([0.1, 0.9], EMBED, 1) == 0.1  # outside the layers: t = 0


@pytest.mark.parametrize("name", [EMBED, NORM, HEAD, "gpt_neox.embed_in.weight",
                                  "gpt_neox.final_layer_norm.weight", "embed_out.weight",
                                  "transformer.wte.weight", "transformer.ln_f.bias"])
def test_tensors_outside_the_layers_take_the_first_anchor(name):
    assert position(name, 32) == 0.0
    assert resolve([0.25, 0.5, 1.0], name, 32) == 0.25


def test_layer_index_beyond_the_stack_counts_as_outside():
    # phi-1 keeps its head under layers.<num_layers>; mergekit plans it with t = 0
    assert position("layers.24.linear.weight", 24) == 0.0
    assert resolve([0.3, 0.6], "layers.24.linear.weight", 24) == 0.3
    assert resolve([0.3, 0.6], "layers.23.mlp.fc1.weight", 24) == 0.6


@settings(max_examples=200, deadline=None)
@given(anchors=st.lists(st.floats(-10, 10), min_size=1, max_size=8),
       n=st.integers(1, 100), data=st.data())
def test_gradient_ends_exact_and_values_between_neighbours(anchors, n, data):
    assert resolve(anchors, L(n - 1), n) == anchors[-1]
    if n > 1:
        assert resolve(anchors, L(0), n) == anchors[0]
    i = data.draw(st.integers(0, n - 1))
    v = resolve(anchors, L(i), n)
    s = position(L(i), n) * (len(anchors) - 1)
    lo, hi = int(s), min(int(s) + 1, len(anchors) - 1)
    near = (anchors[lo], anchors[hi])
    assert min(near) - 1e-12 <= v <= max(near) + 1e-12


# ---------------------------------------------------------------- filters

SPLIT = [{"filter": "mlp", "value": 0.5},
         {"filter": "self_attn", "value": [0, 1]},
         {"value": 0.2}]


def test_filters_with_default_and_gradient_value():
    assert resolve(SPLIT, L(3, "mlp.down_proj.weight"), 32) == 0.5
    assert resolve(SPLIT, L(0, "self_attn.q_proj.weight"), 32) == 0.0
    assert resolve(SPLIT, L(31, "self_attn.o_proj.weight"), 32) == 1.0
    assert resolve(SPLIT, L(31, "input_layernorm.weight"), 32) == 0.2
    assert resolve(SPLIT, HEAD, 32) == 0.2


def test_first_matching_filter_wins():
    knob = [{"filter": "mlp", "value": 1}, {"filter": "up_proj", "value": 2}, {"value": 3}]
    assert resolve(knob, L(0, "mlp.up_proj.weight"), 32) == 1.0
    knob = [{"filter": "up_proj", "value": 2}, {"filter": "mlp", "value": 1}]
    assert resolve(knob, L(0, "mlp.up_proj.weight"), 32) == 2.0
    assert resolve(knob, L(0, "mlp.gate_proj.weight"), 32) == 1.0


def test_filter_is_a_plain_substring_of_the_full_name():
    one = [{"filter": "layers.1.", "value": 1.0}, {"value": 0.0}]
    assert resolve(one, L(1), 32) == 1.0
    assert resolve(one, L(12), 32) == 0.0
    loose = [{"filter": "layers.1", "value": 1.0}, {"value": 0.0}]
    assert resolve(loose, L(12), 32) == 1.0  # substring, not a layer number
    assert resolve([{"filter": "MLP", "value": 1.0}], L(0), 32) is None  # case-sensitive
    assert resolve([{"filter": "mlp.*", "value": 1.0}], L(0), 32) is None  # no globbing
    assert resolve([{"filter": "model.", "value": 1.0}], EMBED, 32) == 1.0  # prefix counts


def test_star_filter_and_null_filter_are_catch_alls():
    assert resolve([{"filter": "mlp", "value": 1}, {"filter": "*", "value": 0.1}], HEAD, 32) == 0.1
    assert resolve([{"filter": None, "value": 0.1}], HEAD, 32) == 0.1


def test_nothing_matches_and_no_default_gives_none():
    knob = [{"filter": "mlp", "value": 0.5}]
    assert resolve(knob, L(0, "self_attn.k_proj.weight"), 32) is None
    assert resolve(knob, EMBED, 32) is None


def test_filter_with_gradient_on_non_layer_tensor():
    knob = [{"filter": "lm_head", "value": [0.3, 0.9]}, {"value": [0.0, 1.0]}]
    assert resolve(knob, HEAD, 32) == 0.3
    assert resolve(knob, L(31), 32) == 1.0


# ---------------------------------------------------------------- levels

def test_per_model_first_then_global_per_knob():
    per_model = [{"filter": "mlp", "value": 0.9}]
    glob = [0.1, 0.3]
    assert resolve_first([per_model, glob], L(0), 32) == 0.9
    # per-model filter does not match -> falls through to the global value
    assert resolve_first([per_model, glob], L(31, "self_attn.v_proj.weight"), 32) == 0.3
    assert resolve_first([None, glob], EMBED, 32) == 0.1  # per-model not set
    assert resolve_first([0.7, glob], EMBED, 32) == 0.7
    assert resolve_first([per_model, None], EMBED, 32) is None
    assert resolve_first([], EMBED, 32) is None


# ---------------------------------------------------------------- is_constant

@pytest.mark.parametrize("value, constant", [
    (0.5, True), (1, True),
    ([0.5], True), ([0.5, 0.5, 0.5], True), ([0.5, 0.6], False),
    ([{"value": 0.2}], True), ([{"filter": "*", "value": [0.2, 0.2]}], True),
    ([{"filter": "mlp", "value": 0.2}, {"value": 0.2}], True),
    ([{"filter": "mlp", "value": 0.3}, {"value": 0.2}], False),
    ([{"filter": "mlp", "value": [0.2, 0.3]}, {"value": 0.2}], False),
    ([{"filter": "mlp", "value": 0.2}], False),  # others get None
])
def test_is_constant(value, constant):
    assert is_constant(value) is constant


# ---------------------------------------------------------------- malformed values

W = "models[1].parameters.density"
NOT_A_KNOB = (f"{W} must be a number, a list of numbers (gradient) "
              f"or a list of {{filter, value}} entries")


@pytest.mark.parametrize("value, message", [
    (None, NOT_A_KNOB + ", got None"),
    ("0.5", NOT_A_KNOB + ", got '0.5'"),
    (True, NOT_A_KNOB + ", got True"),
    (float("nan"), f"{W} must be finite, got nan"),
    ([], f"{W} is an empty gradient; give at least one number"),
    ([0.1, "x"], f"{W}[1] must be a number, got 'x'"),
    ([0.1, False], f"{W}[1] must be a number, got False"),
    ([0.1, float("inf")], f"{W}[1] must be finite, got inf"),
    ([0.1, [0.2]], f"{W}[1] must be a number (a gradient is a list of numbers), got [0.2]"),
    ({"filter": "mlp", "value": 0.5}, f"{W}: a single {{filter, value}} mapping is not a knob"),
    ([0.1, {"value": 0.2}],
     f"{W}[0]: a list of filters must hold only {{filter, value}} entries, got 0.1"),
    ([{"fliter": "mlp", "value": 0.5}],
     f"{W}[0]: unknown key(s) 'fliter'; allowed: filter, value"),
    ([{"filter": "mlp"}], f"{W}[0]: 'value' is required"),
    ([{"filter": 3, "value": 0.5}], f"{W}[0].filter must be a string, got 3"),
    ([{"filter": "", "value": 0.5}], f"{W}[0].filter is empty (it would match every tensor)"),
    ([{"filter": "mlp", "value": "high"}], f"{W}[0].value must be a number, got 'high'"),
    ([{"filter": "mlp", "value": []}], f"{W}[0].value is an empty gradient"),
    ([{"filter": "mlp", "value": [{"value": 1}]}],
     f"{W}[0].value[0] must be a number (a gradient is a list of numbers)"),
    ([{"value": 0.2}, {"filter": "mlp", "value": 0.5}],
     f"{W}[0] matches every tensor (no filter or '*'), "
     f"so the entries after it could never apply; put it last"),
    ([{"filter": "*", "value": 0.2}, {"value": 0.5}], f"{W}[0] matches every tensor"),
])
def test_malformed_values_are_named(value, message):
    with pytest.raises(ParameterError) as info:
        check_knob(W, value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("value", [0.5, 0, -1, [0, 1], [2], SPLIT,
                                   [{"filter": "mlp", "value": [0.1, 0.2]}],
                                   [{"filter": None, "value": 1}]])
def test_well_formed_values_pass(value):
    check_knob(W, value)


def test_resolve_and_is_constant_refuse_malformed_values():
    with pytest.raises(ParameterError):
        resolve([], L(0), 32)
    with pytest.raises(ParameterError):
        is_constant({"value": 1})


# ---------------------------------------------------------------- layer index and count

@pytest.mark.parametrize("name, index", [
    ("model.layers.12.mlp.up_proj.weight", 12),                     # Llama / Mistral / Qwen2
    ("model.layers.0.self_attn.q_proj.bias", 0),
    ("gpt_neox.layers.5.attention.dense.weight", 5),                # GPT-NeoX
    ("transformer.h.7.attn.c_attn.weight", 7),                      # GPT-2 / Falcon / Qwen
    ("model.layers.3.block_sparse_moe.experts.6.w1.weight", 3),     # Mixtral: layer, not expert
    ("model.language_model.layers.9.input_layernorm.weight", 9),    # VL wrappers
    ("bert.encoder.layer.11.attention.self.query.weight", 11),      # BERT
    ("encoder.block.2.layer.0.layer_norm.weight", 2),               # T5
    ("backbone.layers.4.mixer.A_log", 4),                           # Mamba
    ("layers.3.mlp.fc1.weight", 3),                                 # phi-1 (no prefix)
    ("model.layers.123.mlp.up_proj.weight", 123),
    (EMBED, None), (NORM, None), (HEAD, None), ("transformer.wte.weight", None),
    ("model.layers.12", None),                                      # no dot after the index
    ("0.weight", None),
])
def test_layer_index(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize("config, n", [
    ({"num_hidden_layers": 32, "n_layer": 99}, 32),
    ({"n_layer": 12}, 12),              # GPT-2 style
    ({"n_layers": 24}, 24),             # MPT style
    ({"num_layers": 28}, 28),           # ChatGLM style
    ({"text_config": {"num_hidden_layers": 40}}, 40),
    ({"num_hidden_layers": 0}, 0),
    ({"hidden_size": 4096}, None),
    ({}, None),
])
def test_num_layers_from_config(config, n):
    assert num_layers_from_config(config) == n


@pytest.mark.parametrize("bad", [-1, 3.0, "32", True])
def test_num_layers_from_config_refuses_bad_values(bad):
    with pytest.raises(InputError, match="num_hidden_layers must be a non-negative integer"):
        num_layers_from_config({"num_hidden_layers": bad})


def test_layer_count_from_names_and_config():
    names = [EMBED, L(0), L(1), L(5, "self_attn.q_proj.weight"), NORM, HEAD]
    assert count_layers(names) == 6
    assert count_layers([EMBED, HEAD]) == 0
    assert layer_count(None, names) == 6
    assert layer_count({}, names) == 6
    assert layer_count({"num_hidden_layers": 32}, names) == 32  # the config wins


def test_negative_layer_count_is_refused():
    with pytest.raises(ParameterError, match="num_layers must be >= 0"):
        resolve(0.5, L(0), -1)
