"""The PyTorch reference as a backend: exact, any device, the yardstick for the others."""
from ..kernel_api import Capabilities
from ..geometry import combine, gram  # noqa: F401  (the backend contract, §8c)
from ..reference import histogram, merge  # noqa: F401  (the backend contract)

CAPABILITIES = Capabilities()
NAME = "torch"


def DEVICES(device=None) -> tuple[str, ...]:
    return ("cpu", "cuda")


def unavailable_reason() -> str | None:
    return None

# The fp64 combine needs ~20 temporaries per entry and model: keep chunks small.
CHUNK_ELEMS = 1 << 21
