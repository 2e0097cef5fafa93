"""Parameter validation happens before any work and names the bad value."""
import pytest

from fastmerge.errors import ParameterError
from fastmerge.params import make_params


def test_defaults_follow_spec():
    p = make_params("ties", 2)
    assert p.density == (0.2, 0.2) and p.weights == (1.0, 1.0) and p.slack == (0.0, 0.0)
    assert p.normalize and p.elect == "sum" and p.scope == "tensor" and p.scale == 1.0
    assert make_params("task_arithmetic", 1).normalize is False
    assert make_params("linear", 1).normalize is True


def test_per_model_values_broadcast_and_count():
    p = make_params("ties_sv", 3, weights=[1, 2, 3], density=0.5, slack=[0, .1, .2])
    assert p.weights == (1.0, 2.0, 3.0) and p.density == (0.5,) * 3


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="tie"), "method must be one of"),
    (dict(density=1.5), "density of model 0 must be in [0, 1], got 1.5"),
    (dict(density=[0.2]), "density has 1 values but there are 2 models"),
    (dict(slack=0.3), "slack of model 0 must be in [0, density=0.2], got 0.3"),
    (dict(weights="abc"), "weights must be a number or one value per model"),
    (dict(weights=float("nan")), "weights of model 0 must be finite"),
    (dict(elect="median"), "elect must be one of"),
    (dict(scope="layer"), "scope must be one of"),
    (dict(scale=float("inf")), "scale (lambda) must be finite"),
    (dict(normalize="yes"), "normalize must be true or false"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(method="ties", slack=0.1), "slack is only used by the methods that elect a sign"),
    (dict(method="linear", weights=[1, -1]), "weights that do not sum to 0"),
])
def test_bad_values_are_named(kwargs, fragment):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "ties_sv")
    with pytest.raises(ParameterError) as exc:
        make_params(method, 2, **kwargs)
    assert fragment in str(exc.value)
