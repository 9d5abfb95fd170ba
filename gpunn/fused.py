"""The CUDA fast path: one SGD iteration in about a dozen launches instead of ~35 (``engine="fused"``).

At n_b = 100 a GPU is bound by kernel launches, not arithmetic: each CuPy operation costs ~10 µs of host
time, and the plain xp step issues ~35 of them. ``FusedStep`` computes exactly what ``train.TrainStep``
computes (Algorithm 6.1 plus the SGD update) with the kernels of ``kernels.cu``:

    gather_batch           the mini-batch gathered from the uint8 dataset and scaled, labels too
    Q W^T (cuBLAS)         then bias_activation: bias and h in one pass, per hidden layer
    Q W_L^T (cuBLAS)       then softmax_cross_entropy: bias, softmax, dZ^(L), cost and errors together
    activation_backward    dZ = dQ ⊙ h' and db in one pass, per layer; dW and dQ stay with cuBLAS
    sgd_update             the whole of θ in one pass (momentum and weight decay included)

Status: these kernels have not yet run on a GPU. The tests compile them with nvcc and run them, compiled
as C++, through a sequential CPU emulation against the reference path; until a GPU session has checked
them, the default engine stays "xp".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy

from .backend import import_cupy
from .model import MLP, param_views
from .optim import SGD

SOURCE = Path(__file__).with_name("kernels.cu")
ACT_CODES = {"identity": 0, "relu": 1, "sigmoid": 2, "tanh": 3}
BLOCK = 256
MAX_BLOCKS = 4096
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


class FusedStep:
    """``train.TrainStep`` for CUDA with fused kernels: the same call, the same update.

    ``kernels`` defaults to CudaKernels for the network's dtype; the tests pass a CPU emulation.
    """

    def __init__(self, net: MLP, opt: SGD, data, kernels=None):
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

    def __call__(self, rows, lr):
        net, k = self.net, self.kernels
        n, sizes = rows.shape[0], net.sizes
        b = self.buffers.get(n) or self.buffers.setdefault(n, _Buffers(net, n))
        xp, L = net.xp, net.L
        k.launch("gather_batch", n * sizes[0], self.data.X, self.data.y, rows, n, sizes[0], b.X, b.y)
        Q = b.X
        for l in range(L - 1):  # forward, Algorithm 6.1 lines 3–6
            W, bias = net.layers[l].W, net.layers[l].b
            xp.matmul(Q, W.T, out=b.H[l])
            k.launch(
                "bias_activation", n * sizes[l + 1], b.H[l], bias, n * sizes[l + 1], sizes[l + 1], self.act
            )
            Q = b.H[l]
        xp.matmul(Q, net.layers[-1].W.T, out=b.ZL)
        self.acc.fill(0)
        k.launch("softmax_cross_entropy", n, b.ZL, net.layers[-1].b, b.y, n, sizes[-1], 1.0, b.dZL, self.acc)
        dZ = b.dZL
        for l in reversed(range(L)):  # backward, lines 14–20: (6.27a–d)
            dW, db = self.grads[l]
            if l < L - 1:
                dZ = b.dQ[l]
            act = ACT_CODES["identity"] if l == L - 1 else self.act
            Q_out = b.H[l] if l < L - 1 else dZ
            k.launch("activation_backward", sizes[l + 1], dZ, Q_out, n, sizes[l + 1], act, db)
            xp.matmul(dZ.T, b.H[l - 1] if l > 0 else b.X, out=dW)
            if l > 0:
                xp.matmul(dZ, net.layers[l].W, out=b.dQ[l - 1])
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
        return self.acc[0], self.acc[1]
