"""Errors a user can cause and fix.

Each carries a message that stands on its own as one line; the command-line tools print it without a
traceback and exit non-zero. Anything else that escapes is a bug in gpunn.
"""


class GpunnError(Exception):
    """Base class: a problem with the user's input, data, files or machine, not with gpunn."""


class DeviceError(GpunnError):
    """The asked-for device cannot be used (CuPy missing, no GPU, index out of range, ...)."""


class DataError(GpunnError):
    """A dataset file is missing, malformed, inconsistent, or could not be fetched."""


class CheckpointError(GpunnError):
    """A checkpoint or run folder is missing, damaged, or does not fit the run."""


class DivergenceError(GpunnError):
    """The training cost became non-finite."""


class EngineFallbackWarning(UserWarning):
    """The asked-for training engine (or its CUDA graphs) cannot run here; a slower one runs instead."""
