"""The network of (6.11)/(6.16): L dense layers, and backpropagation, Algorithm 6.1, written by hand.

    net = MLP([784, 200, 10], activation="relu", task="classification", device=dev, seed=0)
    Z = net.forward(X)               # Z^(L) (n, M): logits, or ŷ for regression
    J, grads = backprop(net, X, y)   # the mini-batch cost and [(dW1, db1), ..., (dWL, dbL)]
    net.predict(X); net.predict_proba(X); net.save("model.npz")

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


def theta_size(sizes) -> int:
    """The number of parameters, Σ_l U_l (U_{l-1} + 1): the length of θ (6.17)."""
    return sum(u * (u_prev + 1) for u_prev, u in itertools.pairwise(sizes))


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


def weight_mask(sizes, dtype=numpy.float64) -> numpy.ndarray:
    """A θ-shaped host vector: 1 at the entries of every W^(l), 0 at the offsets b^(l) (weight decay
    applies to the weights only)."""
    mask = numpy.zeros(theta_size(sizes), dtype=dtype)
    for W, _ in param_views(mask, sizes):
        W[...] = 1
    return mask


def init_theta(sizes, activation: str, seed: int, dtype) -> numpy.ndarray:
    """θ drawn on the host from ``numpy.random.default_rng(seed)``, so every device starts the same.

    Scheme: b^(l) = 0 and W^(l)_ij ~ N(0, g / U_{l-1}) with gain g = 2 for layers followed by ReLU
    (He et al., 2015) and g = 1 otherwise (LeCun: sigmoid, tanh, and the linear last layer), which keeps
    the variance of Z^(l) near that of the layer's input.
    """
    rng = numpy.random.default_rng(seed)
    theta = numpy.zeros(theta_size(sizes), dtype=numpy.float64)
    layers = param_views(theta, sizes)
    for l, (W, _b) in enumerate(layers):
        gain = 2.0 if activation == "relu" and l < len(layers) - 1 else 1.0
        W[...] = rng.standard_normal(W.shape) * numpy.sqrt(gain / W.shape[1])
    return theta.astype(dtype)


def _first(mask) -> int | None:
    """Index of the first true entry of a 1-d mask (host or device), or None."""
    mask = to_numpy(mask)
    return int(numpy.argmax(mask)) if mask.any() else None


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
        if task == "classification" and sizes[-1] < 2:
            raise ValueError(f"task 'classification' needs U_L = M >= 2 classes; got {sizes[-1]}")
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

    def describe(self) -> dict:
        """What rebuilds this network (its parameters aside): sizes, activation, task, dtype, seed."""
        return {
            "sizes": list(self.sizes),
            "activation": self.activation.name,
            "task": self.task,
            "dtype": self.dtype.name,
            "seed": self.seed,
        }

    # --- checked inputs and targets --------------------------------------------------------------

    def inputs(self, X, input_scale=None):
        """X (n, U_0) of any real dtype, NumPy or CuPy, as the network's dtype on its device, times
        ``input_scale`` if given. ValueError for a wrong shape or, naming the first, a row that is not
        finite."""
        X = self.device.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"X must have shape (n, {self.sizes[0]}); got {X.shape}")
        if X.dtype.kind not in "biuf":
            raise ValueError(f"X must hold real numbers; got dtype {X.dtype}")
        if X.dtype.kind == "f":
            bad = _first(~self.xp.isfinite(X).all(axis=1))
            if bad is not None:
                raise ValueError(f"X row {bad} is not finite (inf or nan)")
        X = X.astype(self.dtype, copy=False)
        return X * self.dtype.type(input_scale) if input_scale is not None else X

    def targets(self, y, n: int):
        """y checked against the task, on the device: labels (n,) int32 in 0…M−1 (classification),
        (n,) of the network's dtype in {0, 1} (binary; (n, 1) taken too), or finite values (n, U_L)
        (regression; (n,) also when U_L = 1). ValueError naming the first bad row."""
        y = self.device.asarray(y)
        xp, M = self.xp, self.sizes[-1]
        if self.task == "regression":
            if y.shape not in ((n, M), (n,) if M == 1 else (n, M)) or y.dtype.kind not in "biuf":
                raise ValueError(f"targets must be real values of shape ({n}, {M}); got {y.dtype} {y.shape}")
            y = y.reshape(n, M).astype(self.dtype, copy=False)
            bad = _first(~xp.isfinite(y).all(axis=1))
            if bad is not None:
                raise ValueError(f"target row {bad} is not finite (inf or nan)")
            return y
        if self.task == "binary" and y.shape == (n, 1):
            y = y.reshape(n)
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},); got {y.shape}")
        if self.task == "binary":
            if y.dtype.kind not in "biuf":
                raise ValueError(f"binary labels must be 0 or 1; got dtype {y.dtype}")
            bad = _first((y != 0) & (y != 1))
            if bad is not None:
                raise ValueError(f"binary labels must be 0 or 1; row {bad} has {to_numpy(y[bad])}")
            return y.astype(self.dtype)
        if y.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers 0…{M - 1}; got dtype {y.dtype}")
        bad = _first((y < 0) | (y >= M))
        if bad is not None:
            raise ValueError(f"labels must lie in 0…{M - 1}; row {bad} has {int(to_numpy(y[bad]))}")
        return y.astype(numpy.int32)

    # --- the network's outputs -----------------------------------------------------------------

    def forward(self, X, ws: Workspace | None = None):
        """Z^(L) (n, U_L) for inputs X (n, U_0): forward propagation, Algorithm 6.1 lines 1–6.

        With a Workspace for n rows (and X already on the device in the network's dtype: no checks),
        every intermediate goes into its buffers and Z^(L) is ``ws.Z[-1]``.
        """
        return self._propagate(self.inputs(X) if ws is None else X, ws)

    def _propagate(self, Q, ws=None):
        for l, layer in enumerate(self.layers):
            Q = layer.forward(Q, *(ws.Z[l], ws.Q[l]) if ws else ())
        return Q

    def predict(self, X, input_scale=None):
        """Class labels (n,) for classification and binary, ŷ for regression ((n,) if U_L = 1)."""
        Z = self._propagate(self.inputs(X, input_scale))
        if self.task == "classification":
            return Z.argmax(axis=1)
        if self.task == "binary":
            return (Z[:, 0] > 0).astype(numpy.int64)
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def predict_proba(self, X, input_scale=None):
        """Class probabilities, one column per class, rows summing to 1: softmax(Z^(L)) (n, M) for
        classification (6.15), [1 − σ(z), σ(z)] (n, 2) for binary; ValueError for regression."""
        if self.task == "regression":
            raise ValueError("a regression network has no class probabilities; use predict")
        xp = self.xp
        Z = self._propagate(self.inputs(X, input_scale))
        if self.task == "binary":
            p = (xp.tanh(Z[:, 0] * 0.5) + 1) * 0.5  # σ(z), as losses.sigmoid_cross_entropy
            return xp.stack([1 - p, p], axis=1)
        P = xp.exp(Z - Z.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        return P

    def loss(self, X, y):
        """(J, number of misclassified rows or None) on (X, y), as 0-d device arrays."""
        Z = self.forward(X)
        y = self.targets(y, Z.shape[0])
        J, _ = LOSSES[self.task](Z, y, grad=False)
        return J, count_errors(Z, y, self.task)

    # --- parameters in and out -----------------------------------------------------------------

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

    def save(self, path) -> None:
        """Write the network to ``path`` (.npz: W1, b1, … and the architecture as JSON, no pickle),
        atomically; ``gpunn.load(path)`` rebuilds it."""
        from .checkpoint import save_model

        save_model(path, self)

    def export_onnx(self, path, opset=None):
        """Write the network as an ONNX model (needs the optional extra ``onnx``); see gpunn.export."""
        from .export import export_onnx

        return export_onnx(self, path, opset=opset)


class Workspace:
    """Every array Algorithm 6.1 writes for mini-batches of ``n`` rows, allocated once.

    Z[l] and Q[l] (n, U_{l+1}) for each layer (Q[L-1] is None: the last layer has no h), dQ[l] (n, U_l)
    for l ≥ 1 (dZ overwrites it in place), dZ^(L) (n, U_L), the loss's small buffers, and the gradient
    as one θ-shaped vector ``grad`` with the per-layer views ``grads``. Pass ``grad`` to share one
    gradient buffer between workspaces. ``forward_only=True`` (evaluation) allocates no gradients and
    lets h overwrite Z in place.
    """

    def __init__(self, net: MLP, n: int, grad=None, forward_only: bool = False):
        xp, dtype, sizes = net.xp, net.dtype, net.sizes
        self.n = n
        self.Z = [xp.empty((n, u), dtype=dtype) for u in sizes[1:]]
        self.dZL = xp.empty((n, sizes[-1]), dtype=dtype)
        self.loss_work: dict = {}
        if forward_only:
            self.Q, self.dQ, self.grad, self.grads = [*self.Z[:-1], None], None, None, None
            return
        self.Q = [xp.empty((n, u), dtype=dtype) for u in sizes[1:-1]] + [None]
        self.dQ = [None] + [xp.empty((n, u), dtype=dtype) for u in sizes[1:-1]]
        self.grad = xp.empty_like(net.theta) if grad is None else grad
        self.grads = param_views(self.grad, sizes)


def backprop(net: MLP, X, y, ws: Workspace | None = None, scale=1.0):
    """Algorithm 6.1 on one mini-batch: returns (J, [(dW^(1), db^(1)), …, (dW^(L), db^(L))]).

    X (n_b, U_0) inputs, one data point per row; y (n_b,) labels or (n_b,)/(n_b, M) targets, checked
    (ValueError naming the first bad row). J is the mean cost over the mini-batch (a 0-d array on the
    network's device) and each gradient has the shape of its parameter: dW^(l) (U_l, U_{l-1}),
    db^(l) (U_l,), views into one θ-shaped vector. ``scale`` multiplies every gradient (it scales
    dZ^(L), on which all of (6.27) is linear).

    It always runs on a Workspace: a temporary one by default. A training step passes its own for n_b
    rows, with X and y already on the device in the network's types (then nothing is checked, and the
    gradients are the workspace's, overwritten by the next call).
    """
    if ws is None:
        X = net.inputs(X)
        y = net.targets(y, X.shape[0])
        ws = Workspace(net, X.shape[0])
    Z = net.forward(X, ws)  # lines 1–6; every layer caches Q^(l-1), Z^(l), Q^(l)
    J, dQ = LOSSES[net.task](Z, y, dZ=ws.dZL, scale=scale, work=ws.loss_work)  # lines 7–13
    for l in reversed(range(net.L)):  # lines 14–20, for l = L, …, 1
        net.layers[l].backward(dQ, *ws.grads[l], dQ_prev=ws.dQ[l])
        dQ = ws.dQ[l]
    return J, ws.grads
