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
    """A checkpoint, saved model or run folder is missing, damaged, or does not fit the run."""


class RunFolderError(GpunnError):
    """A run folder cannot be used: another run holds it, or it cannot be created or written."""


class WriteError(GpunnError):
    """A file could not be written (disk full, no permission, ...); the message names the file."""


class DistributedError(GpunnError):
    """Running under MPI failed: mpi4py or NCCL missing, ranks disagreeing, a collective failing."""


class DivergenceError(GpunnError):
    """The training cost became non-finite, or exploded far above its starting value."""


class EngineFallbackWarning(UserWarning):
    """The asked-for training engine (or its CUDA graphs) cannot run here; a slower one runs instead."""
