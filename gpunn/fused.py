"""The CUDA fast path: one SGD iteration in about a dozen launches instead of ~35 (``engine="fused"``),
and whole blocks of iterations replayed as one CUDA graph (``engine="graph"``).

At n_b = 100 a GPU is bound by kernel launches, not arithmetic: each CuPy operation costs ~10 µs of host
time, and the plain xp step issues ~35 of them. ``FusedStep`` computes exactly what ``train.TrainStep``
computes (Algorithm 6.1 plus the SGD update) with the kernels of ``kernels.cu``:

    gather_batch           the mini-batch gathered from the uint8 dataset and scaled, labels too
    Q W^T (cuBLAS)         then bias_activation: bias and h in one pass, per hidden layer
    Q W_L^T (cuBLAS)       then softmax_cross_entropy: bias, softmax, dZ^(L), cost and errors together
    activation_backward    dZ = dQ ⊙ h' and db in one pass, per layer; dW and dQ stay with cuBLAS
    sgd_update             the whole of θ in one pass (momentum and weight decay included)

With ``graphs=True``, ``run_block`` captures up to GRAPH_STEPS consecutive iterations of an epoch into
one CUDA graph (once per position in the epoch) and replays it: one launch for a hundred steps. What a
graph freezes is arranged for: the epoch's order is copied into one fixed buffer that the captured
gathers read at fixed offsets, each step's learning rate is read from a device buffer written before
the replay, each step's cost and errors go to their own slot, and the products call cuBLAS directly on
the capturing stream (CuPy refuses its matmul during capture).

Status: both engines ran on an NVIDIA H100 (CuPy 14.2, CUDA 13, 2026-11-26): their cuda-marked tests
pass there (the same updates and evaluations as the reference in float64 and float32), and the
benchmark measured them (README, Speed). Without a GPU, the tests compile the kernels with nvcc and run
them, compiled as C++, through a sequential CPU emulation against the reference, with an emulated
cuBLAS and a recorded-and-replayed "graph". They stay opt-in ("auto" is still "xp" on CUDA) until a GPU
session has run the whole cuda suite with them as the default: softmax_cross_entropy sums a step's
cost with atomicAdd, so the recorded J (not θ) may differ in its last bits between two identical runs.
"""

from __future__ import annotations

import ctypes
import re
import warnings
from pathlib import Path

import numpy

from .backend import cublas_library, import_cublas, import_cupy, to_numpy
from .errors import EngineFallbackWarning
from .model import MLP, param_views
from .optim import SGD

SOURCE = Path(__file__).with_name("kernels.cu")
ACT_CODES = {"identity": 0, "relu": 1, "sigmoid": 2, "tanh": 3}
BLOCK = 256
MAX_BLOCKS = 4096
GRAPH_STEPS = 100  # iterations per CUDA graph, at most
_SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')


def kernel_signatures(source: str | None = None) -> dict[str, list[str]]:
    """{kernel name: [parameter C type, …]} as declared in kernels.cu."""
    source = SOURCE.read_text() if source is None else source
    return {
        name: [" ".join(param.split()[:-1]) for param in params.split(",")]
        for name, params in _SIGNATURE.findall(source)
    }


def scalar_type(c_type: str, real):
    """The NumPy scalar type a kernel parameter of C type ``c_type`` must be passed as (None: pointer)."""
    if c_type.endswith("*"):
        return None
    return {"int": numpy.int32, "long long": numpy.int64, "REAL": real, "double": numpy.float64}[c_type]


class CudaKernels:
    """kernels.cu compiled by CuPy (NVRTC) for one float type; run one with ``launch(name, count, *args)``."""

    def __init__(self, dtype):
        cupy = import_cupy()
        real = "float" if numpy.dtype(dtype) == numpy.float32 else "double"
        self.real = numpy.dtype(dtype).type
        self.module = cupy.RawModule(code=SOURCE.read_text(), options=(f"-DREAL={real}", "--std=c++14"))
        self.signatures = kernel_signatures()
        self.functions = {name: self.module.get_function(name) for name in self.signatures}

    def launch(self, name: str, count: int, *args) -> None:
        grid = max(1, min(MAX_BLOCKS, -(-count // BLOCK)))
        self.functions[name]((grid,), (BLOCK,), convert_args(self.signatures[name], args, self.real))


def convert_args(c_types: list[str], args: tuple, real) -> tuple:
    """Scalars as the exact NumPy types the kernel declares (CuPy passes them by their type)."""
    if len(c_types) != len(args):
        raise TypeError(f"kernel takes {len(c_types)} arguments, got {len(args)}")
    out = []
    for c_type, arg in zip(c_types, args):
        kind = scalar_type(c_type, real)
        out.append(arg if kind is None else kind(arg))
    return tuple(out)


def fused_support(net: MLP) -> str | None:
    """Why the fused step cannot train this network, or None when it can."""
    if net.task != "classification":
        return f"the fused kernels train classification only, not {net.task}"
    if net.activation.name not in ACT_CODES:
        return f"no fused kernel for the activation {net.activation.name}"
    return None


class _Buffers:
    """Everything one step on n rows writes, allocated once: X, y, hidden Q (Z overwritten in place),
    dQ per hidden layer, the last layer's product and dZ^(L)."""

    def __init__(self, net: MLP, n: int):
        xp, dt, sizes = net.xp, net.dtype, net.sizes
        self.X = xp.empty((n, sizes[0]), dtype=dt)
        self.y = xp.empty(n, dtype=numpy.int32)
        self.H = [xp.empty((n, u), dtype=dt) for u in sizes[1:-1]]
        self.dQ = [xp.empty((n, u), dtype=dt) for u in sizes[1:-1]]
        self.ZL = xp.empty((n, sizes[-1]), dtype=dt)
        self.dZL = xp.empty((n, sizes[-1]), dtype=dt)


class _Evaluation:
    """One validation pass of a FusedStep over ``data`` in chunks: the row indices, a (cost, errors)
    slot per chunk, the chunk sizes, and the pass's CUDA graph once captured. Holds ``data``, so the
    id it is filed under stays its own."""

    def __init__(self, step, data, chunk: int):
        xp = step.net.xp
        self.step, self.data = step, data
        self.spans = [(s, min(data.n, s + chunk)) for s in range(0, data.n, chunk)]
        self.sizes = numpy.array([stop - start for start, stop in self.spans])
        self.rows = xp.arange(data.n, dtype=numpy.int64)
        self.out = xp.zeros((len(self.spans), 2), dtype=numpy.float64)  # (mean cost, errors) per chunk
        self.graph = None
        for size in self.sizes:
            step._buffers(int(size))  # before any capture

    def enqueue(self, gemm) -> None:
        for c, (start, stop) in enumerate(self.spans):
            self.step._forward(self.data, self.rows[start:stop], self.out[c], gemm)


def cublas_arguments(A, B, C, pointer) -> tuple:
    """The arguments of a column-major cuBLAS gemm that computes the row-major C = A·B.

    A (m, k), B (k, n), C (m, n) are 2-D arrays whose rows or columns are contiguous (transposed views
    included); ``pointer(array)`` gives an array's address. Returns (transa, transb, m', n', k,
    A', lda, B', ldb, C', ldc) for C' = op(A')·op(B') in cuBLAS's column-major terms: an array with
    contiguous columns is itself column-major; one with contiguous rows is its transpose's. When C has
    contiguous rows, Cᵀ = Bᵀ·Aᵀ is what cuBLAS computes.
    """

    def operand(x):  # (op, leading dimension) of x as a column-major matrix, or of xᵀ (then op = T)
        size = x.itemsize
        if x.strides[0] == size and x.strides[1] >= max(1, x.shape[0]) * size:
            return 0, x.strides[1] // size
        if x.strides[1] == size and x.strides[0] >= max(1, x.shape[1]) * size:
            return 1, x.strides[0] // size
        raise ValueError(f"an operand of strides {x.strides} has neither rows nor columns contiguous")

    if C.strides[0] != C.itemsize or C.strides[1] < C.shape[0] * C.itemsize:  # rows contiguous
        A, B, C = B.T, A.T, C.T
    (op_a, lda), (op_b, ldb), (op_c, ldc) = operand(A), operand(B), operand(C)
    if op_c != 0:
        raise ValueError("C must have contiguous rows or columns")
    m, k, n = A.shape[0], A.shape[1], B.shape[1]
    return op_a, op_b, m, n, k, pointer(A), lda, pointer(B), ldb, pointer(C), ldc


class CublasGemm:
    """C = A·B for CuPy arrays by cuBLAS's own C function (cublas<t>gemm_v2 through ctypes), on the
    handle CuPy uses, on whatever stream that handle is bound to: the one call that may run during
    stream capture, where CuPy's matmul and its cuBLAS binding refuse. α = 1 and β = 0 are read from
    the host (CudaGraphs.capture sets host pointer mode, and the capturing stream, before capture)."""

    def __init__(self, dtype):
        cupy = import_cupy()
        self.handle = cupy.cuda.device.get_cublas_handle()
        single = numpy.dtype(dtype) == numpy.float32
        self.function = getattr(cublas_library(), "cublasSgemm_v2" if single else "cublasDgemm_v2")
        # handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        operand = [pointer, integer]
        self.function.argtypes = [pointer] + [integer] * 5 + [pointer] + operand * 2 + [pointer] + operand
        self.function.restype = integer
        self.one, self.zero = numpy.ones(1, dtype=dtype), numpy.zeros(1, dtype=dtype)  # kept alive

    def __call__(self, A, B, C) -> None:
        ta, tb, m, n, k, a, lda, b, ldb, c, ldc = cublas_arguments(A, B, C, lambda x: x.data.ptr)
        one, zero = self.one.ctypes.data, self.zero.ctypes.data
        status = self.function(self.handle, ta, tb, m, n, k, one, a, lda, b, ldb, zero, c, ldc)
        if status != 0:
            raise RuntimeError(f"cuBLAS gemm returned status {status}")


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


class FusedStep:
    """``train.TrainStep`` for CUDA with fused kernels: the same call, the same update; with
    ``graphs=True`` also ``run_block``, blocks of steps as CUDA graphs.

    ``kernels``, ``gemm`` and ``graph_backend`` default to CudaKernels, CublasGemm and CudaGraphs; the
    tests pass CPU emulations of all three.
    """

    def __init__(
        self, net: MLP, opt: SGD, data, kernels=None, graphs: bool = False, gemm=None, graph_backend=None
    ):
        reason = fused_support(net)
        if reason:
            raise ValueError(reason)
        self.net, self.opt, self.data = net, opt, data
        self.kernels = kernels if kernels is not None else CudaKernels(net.dtype)
        xp = net.xp
        self.grad = xp.empty_like(net.theta)
        self.grads = param_views(self.grad, net.sizes)
        self.acc = xp.zeros(2, dtype=numpy.float64)  # cost and errors of the current step
        decay = numpy.zeros(net.num_params, dtype=numpy.uint8)
        for W, _ in param_views(decay, net.sizes):
            W[...] = 1
        self.decay = xp.asarray(decay)
        self.velocity = opt.velocity if opt.velocity is not None else self.grad  # unused without momentum
        self.act = ACT_CODES[net.activation.name]
        self.buffers: dict[int, _Buffers] = {}
        self.evaluations: dict[tuple[int, int], _Evaluation] = {}
        self.lr = xp.zeros(GRAPH_STEPS, dtype=net.dtype)  # γ of each step of a block (slot 0 when eager)
        self._eager_lr = None
        self.graphs = graphs
        self.block_steps = GRAPH_STEPS if graphs else 0  # what fit may hand run_block at once
        self.records = xp.zeros((GRAPH_STEPS, 2), dtype=numpy.float64)  # (cost, errors) per step
        self.order = xp.zeros(data.n, dtype=numpy.int64)  # the epoch's permutation, at a fixed address
        self._order_source = None
        self.captured: dict[tuple[int, int, int], object] = {}
        if graphs:
            self.gemm = gemm if gemm is not None else CublasGemm(net.dtype)
            self.graph_backend = graph_backend if graph_backend is not None else CudaGraphs()
            self._trial_capture()

    def __call__(self, rows, lr):
        """One step, eagerly: returns (J, misclassified rows) as device scalars."""
        if lr != self._eager_lr:  # γ lives on the device (see sgd_update); rewritten only when it changes
            self.lr[0] = lr
            self._eager_lr = lr
        self.acc.fill(0)
        self._enqueue(rows, self.lr[0:1], self.acc, self._matmul)
        return self.acc[0], self.acc[1]

    def _buffers(self, n: int) -> _Buffers:
        if n not in self.buffers:  # allocated before any capture: a graph must allocate nothing
            self.buffers[n] = _Buffers(self.net, n)
        return self.buffers[n]

    def _forward(self, data, rows, acc, gemm) -> _Buffers:
        """Queue the forward pass and the cost of the rows (n,) int64 of ``data``: Algorithm 6.1 lines
        1–13, (cost, errors) added into acc[0:2], dZ^(L) into the buffers."""
        net, k = self.net, self.kernels
        n, sizes = rows.shape[0], net.sizes
        b = self._buffers(n)
        k.launch("gather_batch", n * sizes[0], data.X, data.y, rows, n, sizes[0], b.X, b.y)
        Q = b.X
        for l in range(net.L - 1):
            W, bias = net.layers[l].W, net.layers[l].b
            gemm(Q, W.T, b.H[l])
            k.launch(
                "bias_activation", n * sizes[l + 1], b.H[l], bias, n * sizes[l + 1], sizes[l + 1], self.act
            )
            Q = b.H[l]
        gemm(Q, net.layers[-1].W.T, b.ZL)
        k.launch("softmax_cross_entropy", n, b.ZL, net.layers[-1].b, b.y, n, sizes[-1], 1.0, b.dZL, acc)
        return b

    def _enqueue(self, rows, lr, acc, gemm) -> None:
        """Queue one step's launches: rows (n,) int64, γ at lr[0], (cost, errors) added into acc[0:2]."""
        net, k = self.net, self.kernels
        n, sizes, L = rows.shape[0], net.sizes, net.L
        b = self._forward(self.data, rows, acc, gemm)
        dZ = b.dZL
        for l in reversed(range(L)):  # backward, lines 14–20: (6.27a–d)
            dW, db = self.grads[l]
            if l < L - 1:
                dZ = b.dQ[l]
            act = ACT_CODES["identity"] if l == L - 1 else self.act
            Q_out = b.H[l] if l < L - 1 else dZ
            k.launch("activation_backward", sizes[l + 1], dZ, Q_out, n, sizes[l + 1], act, db)
            gemm(dZ.T, b.H[l - 1] if l > 0 else b.X, dW)
            if l > 0:
                gemm(dZ, net.layers[l].W, b.dQ[l - 1])
        opt = self.opt
        k.launch(
            "sgd_update",
            net.num_params,
            net.theta,
            self.grad,
            self.velocity,
            self.decay,
            net.num_params,
            lr,
            opt.momentum,
            opt.weight_decay,
            int(bool(opt.momentum)),
            int(bool(opt.weight_decay)),
        )

    def evaluate(self, data, chunk: int) -> tuple[float, float]:
        """(mean cost, misclassification rate) on the whole of ``data`` (a DeviceDataset on this
        device), ``chunk`` rows at a time by the training step's own forward kernels: about five
        launches a chunk, or one graph replay with ``graphs``; one synchronisation at the end."""
        key = (id(data), chunk)
        if key not in self.evaluations:
            self.evaluations[key] = _Evaluation(self, data, chunk)
        ev = self.evaluations[key]
        ev.out.fill(0)
        if self.graphs and ev.graph is None:
            try:
                ev.graph = self.graph_backend.capture(lambda: ev.enqueue(self.gemm))
            except Exception as exc:
                self._give_up_graphs(exc)
        if self.graphs:
            self.graph_backend.launch(ev.graph)
        else:
            ev.enqueue(self._matmul)
        host = to_numpy(ev.out)
        return float(host[:, 0] @ ev.sizes) / data.n, float(host[:, 1].sum()) / data.n

    def _matmul(self, A, B, C) -> None:
        self.net.xp.matmul(A, B, out=C)

    # --- CUDA graphs ---------------------------------------------------------------------------

    def run_block(self, order, first: int, count: int, batch_size: int, lrs):
        """Steps ``first`` … ``first + count − 1`` of the epoch whose permutation is ``order`` (device
        int64, n entries), each on the ``batch_size`` rows order[i·n_b : (i+1)·n_b], with learning rates
        ``lrs``: one graph replay. Returns (costs, errors) as (count,) device arrays.

        The graph of (first, count, n_b) is captured on first use and replayed in every later epoch.
        If capture fails, the block runs step by step (with one EngineFallbackWarning).
        """
        xp = self.net.xp
        if not 1 <= count <= GRAPH_STEPS or (first + count) * batch_size > self.data.n:
            raise ValueError(
                f"a block is 1…{GRAPH_STEPS} full mini-batches of the epoch; got {count} from {first}"
            )
        if order is not self._order_source:  # a new epoch: its order into the fixed buffer
            xp.copyto(self.order, order)
            self._order_source = order
        if not self.graphs:
            return self._run_eagerly(first, count, batch_size, lrs)
        self.lr[:count] = xp.asarray(numpy.asarray(lrs, dtype=self.net.dtype))
        self._eager_lr = None  # slot 0 now holds this block's first γ
        key = (first, count, batch_size)
        if key not in self.captured:
            self._buffers(batch_size)
            try:
                self.captured[key] = self.graph_backend.capture(lambda: self._enqueue_block(*key))
            except Exception as exc:  # CUDA or CuPy refusing the capture: keep training, without graphs
                self._give_up_graphs(exc)
                return self._run_eagerly(first, count, batch_size, lrs)
        self.records[:count].fill(0)
        self.graph_backend.launch(self.captured[key])
        return self.records[:count, 0], self.records[:count, 1]

    def _enqueue_block(self, first: int, count: int, batch_size: int) -> None:
        for k in range(count):
            rows = self.order[(first + k) * batch_size : (first + k + 1) * batch_size]
            self._enqueue(rows, self.lr[k : k + 1], self.records[k], self.gemm)

    def _run_eagerly(self, first, count, batch_size, lrs):
        xp = self.net.xp
        out = xp.zeros((count, 2), dtype=numpy.float64)
        for k in range(count):
            rows = self.order[(first + k) * batch_size : (first + k + 1) * batch_size]
            J, errors = self(rows, lrs[k])
            out[k, 0], out[k, 1] = J, errors
        return out[:, 0], out[:, 1]

    def _trial_capture(self) -> None:
        """Capture (never launch) one step on the first rows, so that a CUDA or CuPy that cannot
        capture is found when the engine is made, not in the middle of a run."""
        self._buffers(1)
        try:
            self.graph_backend.capture(
                lambda: self._enqueue(self.order[:1], self.lr[0:1], self.records[0], self.gemm)
            )
        except Exception as exc:
            self._give_up_graphs(exc)

    def _give_up_graphs(self, exc: Exception) -> None:
        self.graphs = False
        self.block_steps = 0
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(
            f"CUDA graph capture failed ({message}); the fused steps run one launch at a time",
            EngineFallbackWarning,
            stacklevel=3,
        )
