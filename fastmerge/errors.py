"""Exceptions raised by fastmerge. Every message names the file, tensor and problem."""


class FastmergeError(Exception):
    """Base class of every error fastmerge raises on purpose."""


class ParameterError(FastmergeError, ValueError):
    """A merge parameter or configuration value is invalid (raised before any I/O)."""


class InputError(FastmergeError):
    """An input checkpoint is missing, malformed, unsafe or inconsistent with the others."""


class BackendUnavailable(FastmergeError, RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why."""


class OutputError(FastmergeError):
    """The output location cannot be used (exists, is locked, or lies inside an input)."""
