"""Backend registry: the one place where a merge backend is chosen.

A backend is a module exposing ``histogram`` and ``merge`` (the contract in
``fastmerge.kernel_api``), ``DEVICES`` (device types it runs on), ``CAPABILITIES``
(kernel_api.Capabilities: dtypes, model count, stages) and
``unavailable_reason() -> str | None``. Loading happens on first use, never at import
of fastmerge, so a missing native library or Triton only fails when asked for.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from ..errors import BackendUnavailable, ParameterError

BACKENDS = {
    "torch": "fastmerge.backends.torch_backend",
    "triton": "fastmerge.backends.triton_backend",
    "c": "fastmerge.backends.c_backend",
}
_warned: set[str] = set()


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU under TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load(name: str) -> ModuleType:
    """Import backend ``name`` or raise BackendUnavailable saying why it cannot run."""
    if name not in BACKENDS:
        raise ParameterError(f"unknown backend {name!r}; known backends: "
                             f"{', '.join(['auto', *BACKENDS])}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {exc}") from exc
    reason = module.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    return module


def resolve_device(device) -> torch.device:
    """'auto' is CUDA when present, else CPU; anything else is passed to torch.device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def resolve(backend: str = "auto", device="auto") -> tuple[ModuleType, torch.device]:
    """Pick (backend module, device). 'auto': Triton on CUDA, C on CPU, else the reference."""
    if backend == "triton" and device in (None, "auto") and triton_interpreted():
        device = "cpu"
    dev = resolve_device(device)
    if backend != "auto":
        module = load(backend)
        if dev.type not in module.DEVICES(dev):
            raise ParameterError(f"backend {backend!r} cannot run on device {dev}; "
                                 f"it runs on {', '.join(module.DEVICES(dev))}")
        return module, dev
    preferred = "triton" if dev.type == "cuda" else "c"
    try:
        return load(preferred), dev
    except BackendUnavailable as exc:
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(f"{exc}; falling back to the PyTorch reference backend (slower)",
                          RuntimeWarning, stacklevel=3)
        return load("torch"), dev


def check_supported(module: ModuleType, params, dtypes=()) -> None:
    """Refuse, before any tensor data is read, a merge the backend cannot run: too many
    models, a stage it lacks, or a stored / output dtype it does not take."""
    caps = module.CAPABILITIES
    name = module.NAME
    if caps.max_models is not None and params.n_models > caps.max_models:
        raise ParameterError(f"backend {name!r} merges at most {caps.max_models} models, got "
                             f"{params.n_models}; use backend='c' or 'torch'")
    spec = params.spec
    if spec.elect and params.elect not in caps.elects:
        raise ParameterError(f"backend {name!r} has no {params.elect!r} sign election")
    if not spec.needs_base and not caps.without_base:
        raise ParameterError(f"backend {name!r} cannot merge without a base ({spec.name!r})")
    for dt in dtypes:
        key = str(dt).replace("torch.", "")
        if key not in caps.dtypes:
            raise ParameterError(f"backend {name!r} takes {', '.join(caps.dtypes)}, not {key}")
