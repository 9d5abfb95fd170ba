"""The CUDA engine ``graph``: the fused engine's iterations replayed as CUDA graphs, up to 100 at a time.

``run`` captures iterations ``first … first + count − 1`` of an epoch into one CUDA graph the first time
that stretch comes round (the training loop never lets a stretch cross an evaluation or an epoch's
end, so the same stretches recur every epoch) and replays it: one launch for a hundred iterations,
the last, partial mini-batch of an epoch included. What a graph freezes is arranged for: the epoch's
order is copied into one fixed buffer that the captured gathers read at fixed offsets, each
iteration's learning rate (and Adam's corrections) is read from a device buffer written before the
replay, each iteration's cost and errors go to their own slot, and the products call cuBLAS directly
on the capturing stream (native.CublasGemm; CuPy refuses its matmul during capture). Evaluation is one
captured graph per data set too.

A capture that fails — at construction a trial capture finds out, or later — gives one
EngineFallbackWarning, and the engine runs the same launches without graphs.
"""

from __future__ import annotations

import warnings

import numpy

from ..backend import import_cublas, import_cupy
from ..distributed import NCCLCommunicator, SingleProcess
from ..errors import EngineFallbackWarning
from ..native import CublasGemm
from .base import EVAL_CHUNK
from .fused import FusedEngine


class CudaGraphs:
    """Stream capture into a cupy.cuda.Graph, and its replay on the current stream.

    CuPy's cuBLAS binding refuses every call while a stream captures, so the handle is bound to the
    capturing stream (and to host pointer mode) before capture begins and given back its old stream
    and mode after it ends; CublasGemm then calls cuBLAS itself inside.
    """

    def __init__(self):
        self.cupy, self.cublas = import_cupy(), import_cublas()

    def capture(self, enqueue):
        cupy, cublas = self.cupy, self.cublas
        handle = cupy.cuda.device.get_cublas_handle()
        stream = cupy.cuda.Stream(non_blocking=True)
        previous = cublas.getStream(handle), cublas.getPointerMode(handle)
        cublas.setStream(handle, stream.ptr)
        cublas.setPointerMode(handle, 0)  # CUBLAS_POINTER_MODE_HOST
        try:
            with stream:
                stream.begin_capture()
                try:
                    enqueue()
                finally:
                    graph = stream.end_capture()
        finally:
            cublas.setStream(handle, previous[0])
            cublas.setPointerMode(handle, previous[1])
        return graph

    def launch(self, graph) -> None:
        graph.launch()


class GraphEngine(FusedEngine):
    """FusedEngine with ``run`` and ``evaluate`` replayed as CUDA graphs (see the module). ``graphs``
    (capture and launch) and ``gemm`` default to CudaGraphs and CublasGemm; the tests pass a recorder
    that replays emulated launches."""

    name = "graph"

    @classmethod
    def supports(cls, net, optimizer, data, comm=None) -> str | None:
        if comm is not None and not isinstance(comm, (SingleProcess, NCCLCommunicator)):
            return "a CUDA graph cannot capture MPI's host transfers (NCCL can be captured: GPUNN_COMM=nccl)"
        return super().supports(net, optimizer, data, comm)

    def __init__(self, net, optimizer, data, comm=None, kernels=None, gemm=None, graphs=None):
        super().__init__(net, optimizer, data, comm, kernels=kernels, gemm=gemm or CublasGemm(net.dtype))
        self.eager_gemm = gemm or self._matmul
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.order = net.xp.zeros(data.n, dtype=numpy.int64)  # the epoch's permutation, at a fixed address
        self._order_source = None
        self.captured: dict[tuple[int, int, int], object] = {}
        self.capturing = True
        self._trial_capture()

    def run(self, order, first: int, count: int, batch_size: int, lrs):
        if order is not self._order_source:  # a new epoch: its order into the fixed buffer
            self.net.xp.copyto(self.order, order)
            self._order_source = order
        if not self.capturing:
            return self._run_eagerly(first, count, batch_size, lrs)
        key = (first, count, batch_size)
        if key not in self.captured:
            for k in range(count):  # every buffer exists before capture
                self._buffers(self._rows(first + k, batch_size).shape[0])
            try:
                self.captured[key] = self.graphs.capture(lambda: self._enqueue_block(*key))
            except Exception as exc:  # CUDA or CuPy refusing the capture: keep training, without graphs
                self._give_up(exc)
                return self._run_eagerly(first, count, batch_size, lrs)
        self.upload_step_params(lrs)
        self.graphs.launch(self.captured[key])
        return self.results(count)

    def _rows(self, i: int, batch_size: int):
        return self.order[i * batch_size : (i + 1) * batch_size]

    def _enqueue_block(self, first: int, count: int, batch_size: int) -> None:
        for k in range(count):
            self._enqueue_step(self._rows(first + k, batch_size), k, self.gemm)

    def _run_eagerly(self, first, count, batch_size, lrs):
        self.gemm = self.eager_gemm
        return FusedEngine.run(self, self.order, first, count, batch_size, lrs)

    def evaluate(self, data, chunk: int = EVAL_CHUNK):
        ev = self.evaluation(data, chunk)
        if self.capturing and ev.graph is None:
            try:
                ev.graph = self.graphs.capture(lambda: ev.enqueue(self.gemm))
            except Exception as exc:
                self._give_up(exc)
        if self.capturing:
            self.graphs.launch(ev.graph)
        else:
            ev.enqueue(self.eager_gemm)
        return self.finish_evaluation(ev.out.sum(axis=0), data.n)

    def _trial_capture(self) -> None:
        """Capture (never launch) one iteration on the first row, so that a CUDA or CuPy that cannot
        capture is found when the engine is made, not in the middle of a run."""
        self._buffers(1)
        try:
            self.graphs.capture(lambda: self._enqueue_step(self.order[:1], 0, self.gemm))
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        self.capturing = False
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(
            f"CUDA graph capture failed ({message}); the fused iterations run one launch at a time",
            EngineFallbackWarning,
            stacklevel=3,
        )
