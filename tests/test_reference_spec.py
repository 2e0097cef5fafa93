"""The reference against hand-computed cases of docs/spec.md §1-§9 (independent re-derivations)."""
import pytest
import torch

from fastmerge.kernel_api import COUNTERS
from fastmerge.params import make_params
from fastmerge.reference import merge_one

C = {name: i for i, name in enumerate(COUNTERS)}


def run(base, models, method="ties", out_dtype=torch.float32, **kw):
    base = None if base is None else torch.tensor(base, dtype=torch.float32)
    models = torch.tensor(models, dtype=torch.float32)
    params = make_params(method, models.shape[0], **kw)
    out, counts, tu = merge_one(base, models, params, out_dtype=out_dtype)
    return out.tolist(), counts, tu


def test_ties_two_models_by_hand():
    # τ1 = [3,-2,1,0], τ2 = [-1,4,-2,.5]; K = 2 -> t1 = 2, t2 = 2
    # kept1 = [T,T,F,F], kept2 = [F,T,T,F]; G = [3,2,-2,0] -> γ = [+,+,-,+]
    out, counts, (t, u) = run([0, 0, 0, 0], [[3, -2, 1, 0], [-1, 4, -2, .5]], density=0.5)
    assert t == [2.0, 2.0] and u == [float("inf")] * 2
    assert out == [3.0, 4.0, -2.0, 0.0]
    assert counts[0, C["kept"]] == 2 and counts[0, C["selected"]] == 1
    assert counts[0, C["dropped_by_sign"]] == 1
    assert counts[1, C["kept"]] == 2 and counts[1, C["selected"]] == 2
    assert counts[1, C["dropped_by_sign"]] == 0
    assert counts[:, C["protected"]].tolist() == [0, 0]


SLACK_CASE = dict(base=[0, 0, 0, 0], models=[[-5, 6, .1, .2], [3, .5, .1, .3]], density=0.5)


def test_slack_flips_an_election_by_hand():
    # S = floor(.25 * 4) = 1: u1 = 6 (entry 1), u2 = 3 (entry 0).
    # Entry 0: plain TIES elects by -5 + 3 < 0 and drops model 2's top entry;
    # TIES-SV lets only the protected vote (+3) count, so model 2's entry survives.
    c = SLACK_CASE
    out_sv, counts, (t, u) = run(c["base"], c["models"], "ties_sv", density=c["density"],
                                 slack=0.25)
    out_ties, counts_ties, _ = run(c["base"], c["models"], "ties", density=c["density"])
    assert u == [6.0, 3.0]
    assert out_sv == [3.0, 3.25, 0.0, 0.0]
    assert out_ties == [-5.0, 3.25, 0.0, 0.0]
    assert counts[:, C["protected"]].tolist() == [1, 1]
    assert counts[:, C["important_dropped"]].tolist() == [0, 0]
    assert counts[:, C["ties_important_dropped"]].tolist() == [0, 1]
    assert counts[:, C["dropped_by_sign"]].tolist() == [1, 0]
    assert counts_ties[:, C["dropped_by_sign"]].tolist() == [0, 1]


def test_slack_never_protects_zeros():
    # model 2 changes one entry of four: S = floor(.5 * 4) = 2 would make u2 = 0 and
    # "protect" its three zeros, whose zero votes elect + there and drop model 1's
    # negative entries. u2 is at least fp32's smallest normal: only its nonzero entry
    # is protected, and the zeros leave the election to model 1 (docs/spec.md §4).
    out, counts, (t, u) = run([0, 0, 0, 0], [[-4, -3, 2, 1], [0, 0, 0, 5]], "ties_sv",
                              density=[0.5, 1.0], slack=[0.0, 0.5])
    assert u[1] == 2.0 ** -126 and u[0] == float("inf")
    assert counts[:, C["protected"]].tolist() == [0, 1]
    assert out == [-4.0, -3.0, 0.0, 5.0]
    # with u2 = 0 entries 0 and 1 would have been elected + and merged to 0.0


def test_slack_zero_is_exactly_ties():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(999, generator=g).half()
    models = (base + 0.05 * torch.randn(3, 999, generator=g)).half()
    for dt in (torch.float16, torch.float32):
        a = merge_one(base, models, make_params("ties", 3, density=0.3), out_dtype=dt)
        b = merge_one(base, models, make_params("ties_sv", 3, density=0.3, slack=0.0),
                      out_dtype=dt)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ties_at_threshold_keep_every_tied_entry():
    # K = floor(.4 * 5) = 2, but four entries equal t = 1: all four are kept
    out, counts, (t, _) = run([0] * 5, [[1, -1, 1, 1, .5]], density=0.4)
    assert t == [1.0]
    assert counts[0, C["kept"]] == 4
    assert out == [1.0, -1.0, 1.0, 1.0, 0.0]


def test_density_zero_keeps_nothing_and_one_keeps_all():
    out, counts, (t, _) = run([1, 2], [[5, -7]], density=0.0)
    assert t == [float("inf")] and out == [1.0, 2.0] and counts[0, C["kept"]] == 0
    out, counts, (t, _) = run([1, 2], [[5, -7]], density=1.0)
    assert t == [0.0] and out == [5.0, -7.0] and counts[0, C["kept"]] == 2


def test_small_density_rounds_k_down_to_zero():
    out, counts, (t, _) = run([0, 0, 0], [[1, 2, 3]], density=0.3)  # floor(0.9) = 0
    assert t == [float("inf")] and out == [0.0, 0.0, 0.0]


def test_zero_task_vector_never_selected_nor_dropped():
    # d = 1 keeps the zero (|τ| >= 0), but a zero never matches γ and is not "dropped"
    out, counts, _ = run([1, 1], [[1, 3], [2, 1]], density=1.0)
    assert out == [2.0, 3.0]
    assert counts[:, C["kept"]].tolist() == [2, 2]
    assert counts[:, C["selected"]].tolist() == [1, 1]
    assert counts[:, C["dropped_by_sign"]].tolist() == [0, 0]


def test_tie_in_election_goes_positive_and_disjoint_mean():
    out, _, _ = run([0], [[2], [-2]], density=1.0)  # G = 0 -> γ = +1
    assert out == [2.0]


def test_elect_count_versus_sum():
    models = [[10], [-1], [-1]]
    assert run([0], models, density=1.0)[0] == [10.0]             # Σ = 8 > 0
    assert run([0], models, density=1.0, elect="count")[0] == [-1.0]  # votes +1 -1 -1


def test_normalize_and_weights():
    assert run([0], [[2], [4]], density=1.0)[0] == [3.0]
    assert run([0], [[2], [4]], density=1.0, normalize=False)[0] == [6.0]
    # D = .5*2 + 1.5*4 = 7, W = 2
    assert run([0], [[2], [4]], density=1.0, weights=[0.5, 1.5])[0] == [3.5]


def test_scale_lambda():
    assert run([1], [[3]], density=1.0, scale=0.5)[0] == [2.0]


def test_task_arithmetic_by_hand():
    out, counts, _ = run([1, 2], [[2, 2], [1, 4]], "task_arithmetic", weights=[1, 0.5],
                         scale=2.0)
    assert out == [3.0, 4.0]
    assert counts[:, C["kept"]].tolist() == [0, 0]
    out, _, _ = run([1, 2], [[2, 2], [1, 4]], "task_arithmetic", weights=[1, 1],
                    normalize=True)
    assert out == [1.5, 3.0]


def test_linear_by_hand_needs_no_base():
    out, _, _ = run(None, [[1, 2], [3, 4]], "linear", weights=[1, 3])
    assert out == [2.5, 3.5]
    out, _, _ = run(None, [[1, 2], [3, 4]], "linear", weights=[1, 3], normalize=False)
    assert out == [10.0, 14.0]


def test_output_rounds_to_nearest_even():
    # 1 + 2**-11 lies halfway between fp16 1.0 and 1.0009765625: ties to even (1.0)
    out, _, _ = run([1.0], [[1.0 + 2 ** -11]], "task_arithmetic", out_dtype=torch.float16)
    assert out == [1.0]
    out, _, _ = run([1.0], [[1.0 + 3 * 2 ** -11]], "task_arithmetic",
                    out_dtype=torch.float16)
    assert out == [1.0 + 2 ** -9]


def test_task_vector_is_fp32_subtraction_of_stored_values():
    base = torch.tensor([1.0], dtype=torch.bfloat16)
    model = torch.tensor([[1.0078125]], dtype=torch.bfloat16)  # one bf16 ulp above 1
    out, counts, (t, _) = merge_one(base, model, make_params("ties", 1, density=1.0))
    assert out.dtype == torch.bfloat16 and out.item() == 1.0078125


def test_nonfinite_counted():
    out, counts, _ = run([0, 0], [[float("nan"), 1.0]], "task_arithmetic")
    assert counts[0, C["nonfinite"]] == 1
