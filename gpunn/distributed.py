"""Communicators for data-parallel training: one process, MPI ranks (mpi4py), or NCCL on GPUs (CuPy).

Every rank holds the whole network, computes the gradient of its slice of each mini-batch, and one
sum-allreduce of the flat gradient vector makes the ranks agree again:

    comm = get_communicator()     # "auto": SingleProcess outside MPI, MPICommunicator under mpiexec
    comm.allreduce(grad)          # in place: the SUM over ranks, same bits on every rank
    comm.broadcast(theta)         # in place: rank 0's values everywhere
    with comm.guard():            # a failure on one rank reaches every rank instead of a hang
        data = load(...)

Whether this process runs under MPI is read from the launcher's environment variables (mpi_launch), so
outside mpiexec nothing changes and mpi4py is never imported. The environment variable GPUNN_COMM
("auto" | "none" | "mpi" | "nccl") chooses where ``get_communicator("auto")`` is asked.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Mapping
from typing import NamedTuple, NoReturn

import numpy

from . import backend
from .errors import DeviceError, DistributedError, GpunnError

KINDS = ("auto", "none", "mpi", "nccl")
_MPI_HINT = "pip install 'gpunn[mpi]'"

# (rank, size, node-local rank) as each launcher family exports them; the first family whose rank or
# size is present wins. Verified for the mpich wheel's Hydra mpiexec (PMI_* and MPI_LOCAL*); its
# gforker sets PMI_RANK and PMI_SIZE only. PMIx (Open MPI 5's prterun, srun --mpi=pmix) gives no size.
_LAUNCHERS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH/Hydra, Intel MPI, srun --mpi=pmi2
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH
    ("PMIX_RANK", None, None),  # PMIx
)


class MPILaunch(NamedTuple):
    """What an MPI launcher told this process: ``size`` or ``local_rank`` is None where it did not say;
    ``evidence`` names the variable that told, e.g. "PMI_SIZE=2", for messages."""

    rank: int
    size: int | None
    local_rank: int | None
    evidence: str


def _int(environ: Mapping[str, str], name: str | None) -> int | None:
    try:
        return int(environ[name]) if name else None
    except (KeyError, ValueError):
        return None


def mpi_launch(environ: Mapping[str, str] | None = None) -> MPILaunch | None:
    """The launch this process is part of, read from ``environ`` (default os.environ), or None when no
    MPI launcher started it. Reads variables only: never imports mpi4py."""
    environ = os.environ if environ is None else environ
    for rank_name, size_name, local_name in _LAUNCHERS:
        rank, size = _int(environ, rank_name), _int(environ, size_name)
        if rank is None and size is None:
            continue
        told = size_name if size is not None else rank_name
        return MPILaunch(rank or 0, size, _int(environ, local_name), f"{told}={environ[told]}")
    return None


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """True when an MPI launcher (mpiexec, mpirun, srun with PMI) started this process."""
    return mpi_launch(environ) is not None


class Communicator:
    """The collectives data-parallel training needs, the same on every implementation.

    Attributes: ``rank`` (0 … size−1), ``size`` (number of ranks), ``local_rank`` (rank among the ranks on
    this node: which GPU to use), ``name`` ("none", "mpi", "nccl", …).

    Every method but abort is a collective: every rank must call it, in the same order, with arrays of
    the same shape and dtype, or the ranks wait for each other forever. Arrays are NumPy or CuPy,
    C-contiguous, of any shape; they are changed in place and returned.
    """

    name = "base"
    rank = 0
    size = 1
    local_rank = 0
    local_size = 1  # ranks on this node, sharing its cores

    @property
    def is_root(self) -> bool:
        """True on rank 0: the rank that prints, writes files and broadcasts its values."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    def allreduce(self, array):
        """Replace ``array`` on every rank by the element-wise SUM of it over all ranks."""
        raise NotImplementedError

    def broadcast(self, array, root: int = 0):
        """Overwrite ``array`` on every rank with its values on ``root``."""
        raise NotImplementedError

    def broadcast_object(self, obj, root: int = 0):
        """``root``'s ``obj`` (small and picklable; the argument is ignored elsewhere), on every rank."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return only when every rank has called it."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> NoReturn:
        """End every rank now, with exit status ``code``: for a failure the other ranks cannot learn
        of through check_all (an unexpected exception), which would otherwise leave them waiting."""
        raise SystemExit(code)

    def failed_ranks(self, ok: bool) -> list[int]:
        """The ranks that passed ``ok=False``, ascending, the same list on every rank."""
        flags = numpy.zeros(self.size, dtype=numpy.int64)
        flags[self.rank] = not ok
        self.allreduce(flags)
        return [int(rank) for rank in numpy.flatnonzero(flags)]

    def all_agree(self, ok: bool) -> bool:
        """True on every rank when every rank passed ``ok=True``, False on every rank otherwise."""
        return not self.failed_ranks(ok)

    def check_all(self, error: BaseException | str | None = None) -> None:
        """Raise on every rank when any rank passes an ``error``; return on every rank when none does.

        A rank that passed an exception raises it again (a message becomes a DistributedError), so its
        own error keeps its type and traceback; every other rank raises a DistributedError that names
        the lowest failing rank and that rank's message, e.g. "rank 1 of 4 failed: no such file …".
        Every error but the lowest failing rank's own is marked ``relayed`` (that rank reports it).
        Call it where one rank may fail alone (reading files, checking flags) before the next
        collective; prefer ``guard()``, which cannot forget the call on the ranks that succeed.
        """
        failed = self.failed_ranks(error is None)
        if not failed:
            return
        message = self.broadcast_object(_one_line(error) if self.rank == failed[0] else None, failed[0])
        if error is not None:
            own = error if isinstance(error, BaseException) else DistributedError(_one_line(error))
        else:
            others = f" (ranks {', '.join(map(str, failed))} failed)" if len(failed) > 1 else ""
            own = DistributedError(f"rank {failed[0]} of {self.size} failed: {message}{others}")
        own.relayed = self.rank != failed[0]
        raise own

    @contextlib.contextmanager
    def guard(self):
        """Run a block that may fail on some ranks only, then check_all: an Exception raised inside on
        any rank ends the block on every rank, as check_all describes. KeyboardInterrupt and SystemExit
        (argparse's, the same on every rank) pass through without the agreement."""
        try:
            yield self
        except Exception as exc:
            self.check_all(exc)
            raise  # check_all always raises here; this line only keeps type checkers informed
        self.check_all(None)


def _one_line(error: BaseException | str) -> str:
    text = str(error) if isinstance(error, (str, GpunnError)) else f"{type(error).__name__}: {error}"
    return " ".join(text.split()) or type(error).__name__


class SingleProcess(Communicator):
    """One rank: every collective returns at once and leaves its argument untouched."""

    name = "none"

    def __init__(self, local_rank: int = 0):
        self.local_rank = local_rank

    def allreduce(self, array):
        return array

    def broadcast(self, array, root: int = 0):
        return array

    def broadcast_object(self, obj, root: int = 0):
        return obj

    def barrier(self) -> None:
        pass


def _import_mpi(why: str):
    """mpi4py's MPI module (importing it starts MPI); DistributedError saying ``why`` it was wanted."""
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as exc:
        if exc.name != "mpi4py":
            raise DistributedError(f"{why} but mpi4py cannot be imported ({exc}): {_MPI_HINT}") from exc
        raise DistributedError(f"{why} but mpi4py is not installed: {_MPI_HINT}") from exc
    except Exception as exc:  # mpi4py present but its MPI library missing or broken
        reason = _one_line(exc)
        raise DistributedError(f"{why} but mpi4py cannot be imported ({reason}): {_MPI_HINT}") from exc
    return MPI


def _contiguous(array) -> None:
    if not array.flags.c_contiguous:
        raise ValueError(f"collectives need a C-contiguous array; got a non-contiguous {array.shape} view")


class MPICommunicator(Communicator):
    """The ranks of an MPI communicator (default COMM_WORLD) through mpi4py's buffer methods.

    NumPy arrays go to MPI as they are (MPI.IN_PLACE, no copy). CuPy arrays are staged through a host
    buffer per dtype that grows to the largest array seen and is kept, so a training step allocates
    nothing; the mpich and Open MPI wheels are not CUDA-aware, and NCCLCommunicator avoids the copies.
    """

    name = "mpi"

    def __init__(self, comm=None):
        MPI = _import_mpi("communicator 'mpi' was asked for")
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # The launcher's variables describe COMM_WORLD only; asking MPI is right for any communicator.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._staging: dict[numpy.dtype, numpy.ndarray] = {}

    def _host(self, array) -> numpy.ndarray:
        """A kept host buffer viewed with ``array``'s shape and dtype."""
        buffer = self._staging.get(array.dtype)
        if buffer is None or buffer.size < array.size:
            buffer = self._staging[array.dtype] = numpy.empty(array.size, dtype=array.dtype)
        return buffer[: array.size].reshape(array.shape)

    def allreduce(self, array):
        _contiguous(array)
        if not backend.is_device_array(array):
            self.comm.Allreduce(self._mpi.IN_PLACE, array, op=self._mpi.SUM)
            return array
        host = self._host(array)
        array.get(out=host)
        self.comm.Allreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
        # From pageable memory, set() returns once CUDA holds its own copy: the buffer is free again.
        array.set(host)
        return array

    def broadcast(self, array, root: int = 0):
        _contiguous(array)
        if not backend.is_device_array(array):
            self.comm.Bcast(array, root=root)
            return array
        host = self._host(array)
        if self.rank == root:
            array.get(out=host)
        self.comm.Bcast(host, root=root)
        if self.rank != root:
            array.set(host)
        return array

    def broadcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> NoReturn:
        self.comm.Abort(code)
        raise SystemExit(code)  # not reached: Abort ends the process


def _import_nccl():
    """(cupy, cupy.cuda.nccl) through backend.import_cupy; DistributedError with the reason if absent."""
    try:
        cupy = backend.import_cupy()
    except DeviceError as exc:
        raise DistributedError(f"communicator 'nccl' needs CuPy: {exc}") from exc
    try:
        # cupy.cuda exposes its NCCL binding only once the submodule has been imported.
        nccl = importlib.import_module(f"{cupy.__name__}.cuda.nccl")
    except Exception as exc:
        reason = _one_line(exc)
        raise DistributedError(f"communicator 'nccl' cannot import CuPy's NCCL binding ({reason})") from exc
    if not getattr(nccl, "available", False):
        raise DistributedError(
            "communicator 'nccl' needs the NCCL library, which CuPy cannot load: "
            "pip install nvidia-nccl-cu12 (or nvidia-nccl-cu13 for CUDA 13)"
        )
    return cupy, nccl


class NCCLCommunicator(Communicator):
    """The ranks of ``bootstrap`` (an MPICommunicator: one process per GPU), reduced by NCCL on the GPU.

    Set up as ChainerMN's pure-NCCL communicator: rank 0 draws NCCL's unique id, ``bootstrap`` broadcasts
    it, and every rank joins ``NcclCommunicator(size, id, rank)`` on ``device`` (default: CuPy's current
    device), to which the communicator stays bound. CuPy arrays are reduced and broadcast in place on
    the current stream, queued behind the kernels that computed them, without waiting on the host.
    NumPy arrays, objects, agreement and barriers go over ``bootstrap``.
    """

    name = "nccl"

    def __init__(self, bootstrap: Communicator, device: backend.Device | None = None):
        self.bootstrap = bootstrap
        self.rank, self.size, self.local_rank = bootstrap.rank, bootstrap.size, bootstrap.local_rank
        self.local_size = bootstrap.local_size
        with bootstrap.guard():
            if device is not None and not device.is_cuda:
                raise DistributedError(f"communicator 'nccl' needs a CUDA device; got {device.name}")
            self.cupy, self.nccl = _import_nccl()
            unique_id = self.nccl.get_unique_id() if bootstrap.is_root else None
        unique_id = bootstrap.broadcast_object(unique_id)
        on_device = contextlib.nullcontext() if device is None else self.cupy.cuda.Device(device.index)
        with on_device:
            self.comm = self.nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._types = {
            numpy.dtype(numpy.float32): self.nccl.NCCL_FLOAT32,
            numpy.dtype(numpy.float64): self.nccl.NCCL_FLOAT64,
            numpy.dtype(numpy.int64): self.nccl.NCCL_INT64,
        }

    def _type(self, array) -> int:
        _contiguous(array)
        try:
            return self._types[numpy.dtype(array.dtype)]
        except KeyError:
            raise ValueError(f"NCCL collectives take float32, float64 or int64; got {array.dtype}") from None

    def allreduce(self, array):
        if not backend.is_device_array(array):
            return self.bootstrap.allreduce(array)
        stream = self.cupy.cuda.get_current_stream().ptr
        pointer = array.data.ptr
        self.comm.allReduce(pointer, pointer, array.size, self._type(array), self.nccl.NCCL_SUM, stream)
        return array

    def broadcast(self, array, root: int = 0):
        if not backend.is_device_array(array):
            return self.bootstrap.broadcast(array, root)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.bcast(array.data.ptr, array.size, self._type(array), root, stream)
        return array

    def broadcast_object(self, obj, root: int = 0):
        return self.bootstrap.broadcast_object(obj, root)

    def barrier(self) -> None:
        self.bootstrap.barrier()

    def abort(self, code: int = 1) -> NoReturn:
        self.bootstrap.abort(code)


def get_communicator(kind: str = "auto", device: backend.Device | None = None) -> Communicator:
    """The communicator named by ``kind``: "auto" | "none" | "mpi" | "nccl".

    "auto" reads GPUNN_COMM first (any other ``kind`` wins over it); left "auto", it is SingleProcess
    when no MPI launcher started this process or the launcher says size 1 (``mpiexec -n 1`` runs exactly
    like a plain run, without mpi4py), else MPICommunicator, or a DistributedError when mpi4py is
    missing. "none" is SingleProcess even under mpiexec (each rank then trains alone). "mpi" starts MPI
    in any case (a lone process is a size-1 COMM_WORLD). "nccl" needs CuPy with NCCL and one GPU per
    rank: ``device`` (default CuPy's current device), bootstrapped over MPI; it is never chosen by
    "auto". DistributedError for an unknown kind and for anything missing.
    """
    choices = "use 'auto', 'none', 'mpi' or 'nccl'"
    kind = str(kind).strip().lower()
    if kind == "auto":
        kind = os.environ.get("GPUNN_COMM", "").strip().lower() or "auto"
        if kind not in KINDS:
            raise DistributedError(f"GPUNN_COMM={kind!r} is not a communicator; {choices}")
    if kind not in KINDS:
        raise DistributedError(f"unknown communicator {kind!r}; {choices}")
    launch = mpi_launch()
    if kind == "none" or (kind == "auto" and (launch is None or launch.size == 1)):
        return SingleProcess(launch.local_rank or 0) if launch else SingleProcess()
    if kind == "auto":
        _import_mpi(f"running under MPI ({launch.evidence})")  # first, so that the message says why
        return MPICommunicator()
    if kind == "mpi":
        return MPICommunicator()
    # Where no rank has CuPy or NCCL, every rank fails here alone, before MPI starts.
    _import_nccl()
    _import_mpi("communicator 'nccl' bootstraps over MPI")
    return NCCLCommunicator(MPICommunicator(), device)


def share_cores(comm: Communicator) -> int | None:
    """Give each of the ``comm.local_size`` ranks on this node its share of the cores for BLAS and
    OpenMP (at least one thread each), unless the user chose with OMP_NUM_THREADS or
    OPENBLAS_NUM_THREADS: ranks whose thread pools each take every core spin against each other (on 2
    cores, 2 ranks ran an epoch 15 times slower). Returns the threads per rank set, or None."""
    if comm.local_size <= 1 or any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")):
        return None
    from threadpoolctl import threadpool_limits

    threads = max(1, (os.cpu_count() or 1) // comm.local_size)
    threadpool_limits(limits=threads)
    return threads
