"""The network of (6.11)/(6.16): L dense layers, and backpropagation, Algorithm 6.1, written by hand.

    net = MLP([784, 200, 10], activation="relu", task="classification", device=dev, seed=0)
    Z = net.forward(X)               # Z^(L) (n, M): logits, or ŷ for regression
    J, grads = backprop(net, X, y)   # the mini-batch cost and [(dW1, db1), ..., (dWL, dbL)]

Parameters live in one flat vector ``net.theta`` laid out as (6.17),
θ = [vec(W^(1))ᵀ b^(1)ᵀ … vec(W^(L))ᵀ b^(L)ᵀ]ᵀ, with vec stacking columns as in the book. Each W^(l) is a
view of shape (U_l, U_{l-1}) into it (column-major in memory, as vec() lays it out), so writing into
``net.params`` arrays changes the network, and an optimizer can update every parameter in one pass.
"""

from __future__ import annotations

import itertools

import numpy

from .backend import Device, get_array_module, get_device, to_numpy
from .layers import Dense, get_activation
from .losses import LOSSES, count_errors

TASKS = tuple(LOSSES)
DTYPES = ("float32", "float64")


def param_shapes(sizes) -> list[tuple[tuple[int, int], tuple[int]]]:
    """[((U_1, U_0), (U_1,)), …, ((U_L, U_{L-1}), (U_L,))] for sizes [U_0, …, U_L]."""
    return [((u, u_prev), (u,)) for u_prev, u in itertools.pairwise(sizes)]


def augmented_views(flat, sizes) -> list:
    """Split a θ-shaped flat vector into [[W^(1) b^(1)], …]: each layer's weights and offsets as one
    (U_l, U_{l-1} + 1) column-major view. (6.17) stores vec(W^(l)) and then b^(l), so b^(l) is the
    column after W^(l)'s last: the offset form of Chapter 3, where each input gains a constant 1."""
    views, at = [], 0
    for u_prev, u in itertools.pairwise(sizes):
        size = u * (u_prev + 1)
        views.append(flat[at : at + size].reshape(u_prev + 1, u).T)
        at += size
    return views


def param_views(flat, sizes) -> list[tuple]:
    """Split a θ-shaped flat vector into [(W1, b1), …] views, each W column-major as vec() in (6.17)."""
    return [(Wb[:, :-1], Wb[:, -1]) for Wb in augmented_views(flat, sizes)]


def flatten(pairs):
    """[(W1, b1), …] -> one vector laid out like θ (6.17), each W column by column."""
    xp = get_array_module(pairs[0][0])
    return xp.concatenate([a.ravel(order="F") for pair in pairs for a in pair])


def init_theta(sizes, activation: str, seed: int, dtype) -> numpy.ndarray:
    """θ drawn on the host from ``numpy.random.default_rng(seed)``, so every device starts the same.

    Scheme: b^(l) = 0 and W^(l)_ij ~ N(0, g / U_{l-1}) with gain g = 2 for layers followed by ReLU
    (He et al., 2015) and g = 1 otherwise (LeCun: sigmoid, tanh, and the linear last layer), which keeps
    the variance of Z^(l) near that of the layer's input.
    """
    rng = numpy.random.default_rng(seed)
    theta = numpy.zeros(sum(u * (p + 1) for p, u in itertools.pairwise(sizes)), dtype=numpy.float64)
    layers = param_views(theta, sizes)
    for l, (W, _b) in enumerate(layers):
        gain = 2.0 if activation == "relu" and l < len(layers) - 1 else 1.0
        W[...] = rng.standard_normal(W.shape) * numpy.sqrt(gain / W.shape[1])
    return theta.astype(dtype)


class MLP:
    """A fully connected network with L = len(sizes) − 1 layers, in the lecture's notation.

    sizes       [U_0 = p, U_1, …, U_L]; U_L = M classes (classification), outputs (regression), 1 (binary)
    activation  h of the hidden layers: "relu" (default), "sigmoid", "tanh" or "identity"
    task        "classification" (softmax cross-entropy, labels 0…M−1), "regression" (squared error),
                or "binary" (one logit, sigmoid cross-entropy, labels 0/1)
    device      a Device or its name ("cpu", "cuda", "cuda:N", "auto"); default "cpu"
    seed        seeds the initial θ (see init_theta): the same on every device
    dtype       "float32" (default) or "float64"
    """

    def __init__(
        self,
        sizes,
        activation: str = "relu",
        task: str = "classification",
        device: Device | str = "cpu",
        seed: int = 0,
        dtype: str = "float32",
    ):
        sizes = [int(u) for u in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least [U_0, U_L], all >= 1; got {sizes}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
        if task == "binary" and sizes[-1] != 1:
            raise ValueError(f"task 'binary' has one output logit; got U_L = {sizes[-1]}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
        self.sizes, self.task, self.seed = sizes, task, int(seed)
        self.activation = get_activation(activation)
        self.dtype = numpy.dtype(str(dtype))
        self.device = get_device(device)
        xp = self.device.xp
        self.theta = self.device.asarray(init_theta(sizes, self.activation.name, seed, self.dtype))
        identity = get_activation("identity")
        self.layers = [
            Dense(W, b, self.activation if l < self.L - 1 else identity, xp)
            for l, (W, b) in enumerate(param_views(self.theta, sizes))
        ]

    @property
    def L(self) -> int:
        return len(self.sizes) - 1

    @property
    def xp(self):
        return self.device.xp

    @property
    def params(self) -> list[tuple]:
        """[(W^(1), b^(1)), …, (W^(L), b^(L))]: the live arrays, W^(l) shaped (U_l, U_{l-1})."""
        return [(layer.W, layer.b) for layer in self.layers]

    @property
    def num_params(self) -> int:
        return int(self.theta.size)

    def __repr__(self) -> str:
        arch = "-".join(map(str, self.sizes))
        return (
            f"MLP({arch}, activation={self.activation.name}, task={self.task}, "
            f"device={self.device.name}, dtype={self.dtype.name})"
        )

    def inputs(self, X):
        """X as a (n, U_0) array of the network's dtype on its device."""
        X = self.device.asarray(X, dtype=self.dtype)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"X must have shape (n, {self.sizes[0]}); got {X.shape}")
        return X

    def targets(self, y, n: int):
        """y on the device: int labels for classification, floats shaped like Z^(L) otherwise."""
        if self.task == "classification":
            y = self.device.asarray(y)
            if y.shape != (n,) or y.dtype.kind not in "iu":
                raise ValueError(f"labels must be integers of shape ({n},); got {y.dtype} {y.shape}")
            return y
        y = self.device.asarray(y, dtype=self.dtype)
        if y.size != n * self.sizes[-1] or y.shape[0] != n:
            raise ValueError(f"targets must have {n} rows of {self.sizes[-1]}; got shape {y.shape}")
        return y.reshape(n, self.sizes[-1])

    def forward(self, X, ws: Workspace | None = None):
        """Z^(L) (n, U_L) for inputs X (n, U_0): forward propagation, Algorithm 6.1 lines 1–6.

        With a Workspace for n rows (and X already on the device in the network's dtype), every
        intermediate goes into its buffers and Z^(L) is ``ws.Z[-1]``.
        """
        Q = self.inputs(X) if ws is None else X
        for l, layer in enumerate(self.layers):
            Q = layer.forward(Q, *(ws.Z[l], ws.Q[l]) if ws else ())
        return Q

    def predict(self, X):
        """Class labels (n,) for classification and binary, ŷ for regression ((n,) if U_L = 1)."""
        Z = self.forward(X)
        if self.task == "classification":
            return Z.argmax(axis=1)
        if self.task == "binary":
            return (Z[:, 0] > 0).astype(numpy.int64)
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def loss(self, X, y):
        """(J, number of misclassified rows or None) on (X, y), as 0-d device arrays."""
        Z = self.forward(X)
        y = self.targets(y, Z.shape[0])
        J, _ = LOSSES[self.task](Z, y)
        return J, count_errors(Z, y, self.task)

    def state(self) -> dict[str, numpy.ndarray]:
        """Host copies of the parameters, named W1, b1, …, in the book's shapes."""
        out = {}
        for l, (W, b) in enumerate(self.params, start=1):
            out[f"W{l}"], out[f"b{l}"] = to_numpy(W).copy(), to_numpy(b).copy()
        return out

    def load_state(self, state: dict) -> None:
        """Copy W1, b1, … (host or device arrays) into the live parameters, checking every shape."""
        for l, (W, b) in enumerate(self.params, start=1):
            for name, live in ((f"W{l}", W), (f"b{l}", b)):
                if name not in state:
                    raise KeyError(f"missing {name}")
                value = self.device.asarray(state[name], dtype=self.dtype)
                if value.shape != live.shape:
                    raise ValueError(f"{name} has shape {value.shape}, the network needs {live.shape}")
                live[...] = value


class Workspace:
    """Every array Algorithm 6.1 needs for mini-batches of ``n`` rows, allocated once.

    X (n, U_0) and its uint8 staging copy (for device-resident data), Z[l] and Q[l] (n, U_{l+1}) for
    each layer (Q[L-1] is None: the last layer has no h), dQ[l] (n, U_l) for l ≥ 1 (dZ overwrites it
    in place), dZ^(L), y (n,), ``rows`` = arange(n), and the gradient as one θ-shaped vector ``grad``
    with the per-layer views ``grads``. Pass ``grad`` to share one gradient buffer between workspaces.

    ``forward_only=True`` (evaluation) allocates no gradients and lets h overwrite Z in place.
    """

    def __init__(self, net: MLP, n: int, grad=None, forward_only: bool = False):
        xp, dtype, sizes = net.xp, net.dtype, net.sizes
        self.n = n
        self.X = xp.empty((n, sizes[0]), dtype=dtype)
        self.staging = xp.empty((n, sizes[0]), dtype=numpy.uint8)
        self.y = xp.empty(n, dtype=numpy.int32)
        self.Z = [xp.empty((n, u), dtype=dtype) for u in sizes[1:]]
        self.dZL = xp.empty((n, sizes[-1]), dtype=dtype)
        self.rows = xp.arange(n)
        if forward_only:
            self.Q, self.dQ, self.grad, self.grads = [*self.Z[:-1], None], None, None, None
            return
        self.Q = [xp.empty((n, u), dtype=dtype) for u in sizes[1:-1]] + [None]
        self.dQ = [None] + [xp.empty((n, u), dtype=dtype) for u in sizes[1:-1]]
        self.grad = xp.empty_like(net.theta) if grad is None else grad
        self.grads = param_views(self.grad, sizes)


def backprop(net: MLP, X, y, ws: Workspace | None = None, scale=1.0):
    """Algorithm 6.1 on one mini-batch: returns (J, [(dW^(1), db^(1)), …, (dW^(L), db^(L))]).

    X (n_b, U_0) inputs, one data point per row; y (n_b,) labels or (n_b,)/(n_b, M) targets. J is the
    mean cost over the mini-batch (a 0-d array on the network's device) and each gradient has the
    shape of its parameter: dW^(l) (U_l, U_{l-1}), db^(l) (U_l,).

    Without ``ws`` every array is freshly allocated. With a Workspace for n_b rows (X and y already on
    the device) nothing is: the gradients are the workspace's ``grads``, overwritten by the next call,
    and ``ws.grad`` holds them as one θ-shaped vector for the optimizer. ``scale`` multiplies every
    gradient (it scales dZ^(L), on which all of (6.27) is linear).
    """
    Z = net.forward(X, ws)  # lines 1–6; every layer caches Q^(l-1), Z^(l), Q^(l)
    if ws is None:
        y = net.targets(y, Z.shape[0])
    J, dQ = LOSSES[net.task](Z, y, *(ws.dZL, ws.rows) if ws else (None, None), scale)  # lines 7–13
    grads = [None] * net.L
    for l in reversed(range(net.L)):  # lines 14–20, for l = L, …, 1
        out = (*ws.grads[l], ws.dQ[l]) if ws else ()
        dQ, dW, db = net.layers[l].backward(dQ, *out, need_dQ_prev=l > 0, inplace=ws is not None)
        grads[l] = (dW, db)
    return J, ws.grads if ws else grads
