"""The CUDA engine ``fused``: one iteration in about ten launches instead of ~35 CuPy operations.

At n_b = 100 a GPU is bound by kernel launches, not arithmetic: each CuPy operation costs ~10 µs of host
time. This engine computes what the reference engine computes (Algorithm 6.1, the optimizer's update)
with the kernels of kernels.cu, the matrix products staying with cuBLAS:

    gather_batch           the mini-batch gathered from the stored inputs, converted and scaled, targets too
    Q Wᵀ, bias_activation  per hidden layer: the product, then the offset and h in one pass
    Q W_Lᵀ, loss_rows      the last product, then each row's cost, error and dZ^(L) (any task)
    sum_rows               the mini-batch's mean cost and error count, summed in row order
    activation_backward    per layer: dZ = dQ ⊙ h' and db in one pass; dW and dQ stay with cuBLAS
    sgd_update/adam_update the whole of θ in one pass, reading the optimizer's own state arrays

Nothing uses floating-point atomics: two runs of one seed give the same bits, costs included. Each
iteration's learning rate (and Adam's bias corrections) is read from a device buffer, so the same
launches serve CUDA graphs (engines/graph.py). Under data parallelism the gradient, cost and error
count are summed over ranks by one allreduce between backward and update.

Without a GPU, the tests compile kernels.cu as C++ and run it through a sequential emulation of the
grid (tests/cuda_emulation.py), against the reference, for every task, activation and optimizer.
"""

from __future__ import annotations

import math

import numpy

from ..backend import import_cupy
from ..model import param_views, weight_mask
from ..native import KERNELS, kernel_signatures
from ..optim import AdamHyper, SGDHyper, unsupported
from .base import EVAL_CHUNK, Engine

SOURCE = KERNELS
ACT_CODES = {"identity": 0, "relu": 1, "sigmoid": 2, "tanh": 3}
TASK_CODES = {"classification": 0, "regression": 1, "binary": 2}
INPUT_TYPES = {  # stored input dtype -> its C type in kernels.cu (INPUT)
    numpy.dtype(numpy.uint8): "unsigned char",
    numpy.dtype(numpy.int8): "signed char",
    numpy.dtype(numpy.uint16): "unsigned short",
    numpy.dtype(numpy.int16): "short",
    numpy.dtype(numpy.uint32): "unsigned int",
    numpy.dtype(numpy.int32): "int",
    numpy.dtype(numpy.int64): "long long",
    numpy.dtype(numpy.float32): "float",
    numpy.dtype(numpy.float64): "double",
}
IMPLEMENTS = {
    SGDHyper: {"lr", "momentum", "weight_decay"},
    AdamHyper: {"lr", "beta1", "beta2", "eps", "weight_decay"},
}
BLOCK = 256
MAX_BLOCKS = 4096
MAX_STEPS = 100  # iterations per ``run`` (and per CUDA graph)


def scalar_type(c_type: str, real):
    """The NumPy scalar type a kernel parameter of C type ``c_type`` must be passed as (None: pointer)."""
    if c_type.endswith("*"):
        return None
    return {"int": numpy.int32, "long long": numpy.int64, "REAL": real, "double": numpy.float64}[c_type]


def convert_args(c_types: list[str], args: tuple, real) -> tuple:
    """Scalars as the exact NumPy types the kernel declares (CuPy passes them by their type)."""
    if len(c_types) != len(args):
        raise TypeError(f"kernel takes {len(c_types)} arguments, got {len(args)}")
    return tuple(
        arg if scalar_type(c, real) is None else scalar_type(c, real)(arg) for c, arg in zip(c_types, args)
    )


def grid(count: int) -> int:
    """Blocks of BLOCK threads for ``count`` elements (the kernels loop over any excess)."""
    return max(1, min(MAX_BLOCKS, -(-count // BLOCK)))


class CudaKernels:
    """kernels.cu compiled by CuPy (NVRTC) for one float type and one stored input type; run one with
    ``launch(name, count, *args)`` (a None argument is a null pointer)."""

    def __init__(self, dtype, input_dtype):
        cupy = import_cupy()
        real = "float" if numpy.dtype(dtype) == numpy.float32 else "double"
        self.real = numpy.dtype(dtype).type
        options = (f"-DREAL={real}", f"-DINPUT={INPUT_TYPES[numpy.dtype(input_dtype)]}", "--std=c++14")
        self.module = cupy.RawModule(code=SOURCE.read_text(), options=options)
        self.signatures = kernel_signatures()
        self.functions = {name: self.module.get_function(name) for name in self.signatures}
        self.null = cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None), 0)

    def launch(self, name: str, count: int, *args) -> None:
        args = tuple(self.null if a is None else a for a in args)
        self.functions[name]((grid(count),), (BLOCK,), convert_args(self.signatures[name], args, self.real))


def make_cuda_kernels(dtype, input_dtype) -> CudaKernels:
    return CudaKernels(dtype, input_dtype)


class _Buffers:
    """Everything one iteration (or one evaluation chunk) on n rows writes, allocated once (before any
    graph capture: a graph must allocate nothing)."""

    def __init__(self, net, n: int, train: bool = True):
        xp, dt, sizes = net.xp, net.dtype, net.sizes
        self.n = n
        self.X = xp.empty((n, sizes[0]), dtype=dt)
        self.y = xp.empty(n, dtype=numpy.int32) if net.task == "classification" else None
        self.t = None if net.task == "classification" else xp.empty((n, sizes[-1]), dtype=dt)
        self.H = [xp.empty((n, u), dtype=dt) for u in sizes[1:-1]]
        self.dQ = [xp.empty((n, u), dtype=dt) for u in sizes[1:-1]] if train else None
        self.ZL = xp.empty((n, sizes[-1]), dtype=dt)
        self.dZL = xp.empty((n, sizes[-1]), dtype=dt)
        self.cost = xp.empty(max(n, 1), dtype=numpy.float64)
        self.wrong = xp.empty(max(n, 1), dtype=numpy.float64)


class FusedEngine(Engine):
    """Every task, activation, SGD (momentum, weight decay) and Adam, float32 and float64, any stored
    input type, on CUDA (see the module). ``kernels`` (a function (dtype, input dtype) -> kernels) and
    ``gemm`` default to CuPy's NVRTC and matmul; the tests pass CPU emulations, and the network may
    then live on the CPU."""

    name = "fused"
    max_steps = MAX_STEPS

    @classmethod
    def supports(cls, net, optimizer, data, comm=None) -> str | None:
        if not net.device.is_cuda:
            return f"the {cls.name} engine needs a CUDA device"
        return cls.kernel_refusal(net, optimizer, data)

    @classmethod
    def kernel_refusal(cls, net, optimizer, data) -> str | None:
        """What the kernels cannot compute, wherever they run."""
        if net.activation.name not in ACT_CODES:
            return f"no fused kernel for the activation {net.activation.name}"
        if data.X.dtype not in INPUT_TYPES:
            return f"no fused gather for inputs stored as {data.X.dtype}"
        reason = unsupported(optimizer.hyper, IMPLEMENTS)
        return None if reason is None else f"the fused kernels have {reason}"

    def refusal(self, net, optimizer, data, comm):
        if self.emulated:
            return self.kernel_refusal(net, optimizer, data)
        return self.supports(net, optimizer, data, comm)

    def __init__(self, net, optimizer, data, comm=None, kernels=None, gemm=None):
        self.emulated = kernels is not None
        super().__init__(net, optimizer, data, comm)
        xp = net.xp
        self.make_kernels = kernels if kernels is not None else make_cuda_kernels
        self.kernel_sets: dict = {}
        self.kernels = self.kernels_for(data)  # compiled now: a failure shows when the engine is made
        self.gemm = gemm if gemm is not None else self._matmul
        self.grads = param_views(self.grad, net.sizes)
        self.decay = xp.asarray(weight_mask(net.sizes, numpy.uint8))  # 1 at the weights: decay applies
        self.step_params = xp.zeros((self.max_steps, 2), dtype=net.dtype)  # per iteration (see kernels.cu)
        self.buffers: dict[int, _Buffers] = {}
        self.eval_buffers: dict = {}
        self.act, self.task = ACT_CODES[net.activation.name], TASK_CODES[net.task]
        self.no_errors = xp.full(self.max_steps, numpy.nan)  # what regression reports as its errors

    def kernels_for(self, data):
        key = (self.net.dtype, data.X.dtype)
        if key not in self.kernel_sets:
            self.kernel_sets[key] = self.make_kernels(*key)
        return self.kernel_sets[key]

    def _matmul(self, A, B, C) -> None:
        self.net.xp.matmul(A, B, out=C)

    def _buffers(self, n: int) -> _Buffers:
        if n not in self.buffers:
            self.buffers[n] = _Buffers(self.net, n)
        return self.buffers[n]

    # --- one iteration -------------------------------------------------------------------------

    def upload_step_params(self, lrs) -> None:
        """Each iteration's update parameters into ``step_params`` (one copy to the device): γ for SGD;
        γ / (1 − β₁ᵗ) and √(1 − β₂ᵗ) for Adam, whose step count t advances here."""
        rows = numpy.zeros((len(lrs), 2))
        hyper = self.optimizer.hyper
        for k, lr in enumerate(lrs):
            if isinstance(hyper, AdamHyper):
                self.optimizer.t += 1
                t = self.optimizer.t
                rows[k] = (lr / (1 - hyper.beta1**t), math.sqrt(1 - hyper.beta2**t))
            else:
                rows[k, 0] = lr
        self.step_params[: len(lrs)] = self.net.xp.asarray(rows.astype(self.net.dtype))

    def run(self, order, first: int, count: int, batch_size: int, lrs):
        self.upload_step_params(lrs)
        for k in range(count):
            start = (first + k) * batch_size
            self._enqueue_step(order[start : start + batch_size], k, self.gemm)
        return self.results(count)

    def results(self, count: int):
        """(costs, errors) of the last ``count`` iterations run, as ``run`` returns them."""
        errors = self.no_errors if self.net.task == "regression" else self.records[:, 1]
        return self.records[:count, 0], errors[:count]

    def _forward(self, data, rows, b: _Buffers, gemm, weight: float, out, scale: float = 1.0) -> None:
        """Queue Algorithm 6.1 lines 1–13 for ``rows`` (int64 indices on the device) of ``data`` into
        ``b``: dZ^(L)·scale into b.dZL, and out[0:2] = (Σ row costs · weight, Σ errors)."""
        net, k = self.net, self.kernels_for(data)
        n, sizes, M = rows.shape[0], net.sizes, net.sizes[-1]
        labels, targets = (data.y, None) if net.task == "classification" else (None, data.y)
        k.launch(
            "gather_batch",
            n * sizes[0],
            data.X,
            labels,
            targets,
            rows,
            n,
            sizes[0],
            M,
            data.scale,
            b.X,
            b.y,
            b.t,
        )
        Q = b.X
        for l in range(net.L - 1):
            W, bias = net.layers[l].W, net.layers[l].b
            gemm(Q, W.T, b.H[l])
            k.launch(
                "bias_activation", n * sizes[l + 1], b.H[l], bias, n * sizes[l + 1], sizes[l + 1], self.act
            )
            Q = b.H[l]
        gemm(Q, net.layers[-1].W.T, b.ZL)
        k.launch(
            "loss_rows", n, b.ZL, net.layers[-1].b, b.y, b.t, n, M, self.task, scale, b.dZL, b.cost, b.wrong
        )
        k.launch("sum_rows", 1, b.cost, b.wrong, n, weight, out)

    def _enqueue_step(self, rows, k: int, gemm) -> None:
        """Queue iteration k of a run: the rows (n,) int64 of the whole mini-batch; this rank's slice
        forward and backward, the ranks' sum, the update with step_params[k]; (J, errors) into
        records[k]."""
        net, xp, P = self.net, self.net.xp, self.net.num_params
        m = rows.shape[0]
        rows, share = self.local_rows(rows)
        n, sizes, L = rows.shape[0], net.sizes, net.L
        out = self.records[k] if self.comm.size == 1 else self.flat[P:]
        if n:
            b = self._buffers(n)
            self._forward(self.data, rows, b, gemm, 1.0 / m, out, scale=share)
            kernels = self.kernels
            dZ = b.dZL
            for l in reversed(range(L)):  # lines 14–20: (6.27a–d)
                dW, db = self.grads[l]
                if l < L - 1:
                    dZ = b.dQ[l]
                act = ACT_CODES["identity"] if l == L - 1 else self.act
                Q_out = b.H[l] if l < L - 1 else dZ
                kernels.launch("activation_backward", sizes[l + 1], dZ, Q_out, n, sizes[l + 1], act, db)
                gemm(dZ.T, b.H[l - 1] if l > 0 else b.X, dW)
                if l > 0:
                    gemm(dZ, net.layers[l].W, b.dQ[l - 1])
        else:  # this rank's slice is empty: it adds nothing to the sums
            self.flat.fill(0)
        if self.comm.size > 1:
            self.comm.allreduce(self.flat)
            xp.copyto(self.records[k], self.flat[P:])
        self._update(self.step_params[k])

    def _update(self, params) -> None:
        net, opt, hyper = self.net, self.optimizer, self.optimizer.hyper
        if isinstance(hyper, AdamHyper):
            m, v = opt.slots["adam_m"], opt.slots["adam_v"]
            self.kernels.launch(
                "adam_update", net.num_params, net.theta, self.grad, m, v, self.decay, net.num_params, params,
                hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
            )  # fmt: skip
        else:
            velocity = opt.slots.get("velocity", self.grad)  # not read without momentum
            self.kernels.launch(
                "sgd_update", net.num_params, net.theta, self.grad, velocity, self.decay, net.num_params,
                params, hyper.momentum, hyper.weight_decay,
            )  # fmt: skip

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(self, data, chunk: int = EVAL_CHUNK):
        """By the training step's own forward kernels, about five launches a chunk of this rank's
        chunks, summed over ranks; one synchronisation at the end."""
        ev = self.evaluation(data, chunk)
        ev.enqueue(self.gemm)
        return self.finish_evaluation(ev.out.sum(axis=0), data.n)

    def evaluation(self, data, chunk: int) -> _Evaluation:
        key = (id(data), chunk)
        if key not in self.eval_buffers:
            self.eval_buffers[key] = _Evaluation(self, data, chunk)
        return self.eval_buffers[key]


class _Evaluation:
    """One evaluation pass of an engine over ``data`` in chunks: row indices, buffers, a (cost sum,
    errors) slot per chunk, and (graph engine) the pass's captured graph. Holds ``data``, so the id it
    is filed under stays its own."""

    def __init__(self, engine: FusedEngine, data, chunk: int):
        xp = engine.net.xp
        self.engine, self.data = engine, data
        self.chunks = engine.my_chunks(data.n, chunk)
        self.rows = xp.arange(data.n, dtype=numpy.int64)
        self.out = xp.zeros((max(1, len(self.chunks)), 2), dtype=numpy.float64)
        self.buffers = {}
        for rows in self.chunks:  # before any capture
            m = rows.stop - rows.start
            self.buffers.setdefault(m, _Buffers(engine.net, m, train=False))
        engine.kernels_for(data)
        self.graph = None

    def enqueue(self, gemm) -> None:
        for c, rows in enumerate(self.chunks):
            b = self.buffers[rows.stop - rows.start]
            self.engine._forward(self.data, self.rows[rows], b, gemm, 1.0, self.out[c])
