"""The CPU engine ``blas``: each iteration as a fixed list of prepared BLAS calls.

The mathematics is Algorithm 6.1 and the optimizer's update, as the reference engine runs them. At
n_b = 100 on a CPU what costs besides the two large products is the number of passes over memory and
of Python-level calls, so this engine arranges the same arithmetic in fewer of both:

1. Every product is a ``native.gemm`` prepared once per mini-batch size on fixed buffers: one ctypes
   call (about 1 µs of Python, against ~7 µs for NumPy's matmul converting its arguments each time).
2. The offsets ride in the products. (6.17) stores b^(l) right after W^(l)'s last column, so [W b] is
   one view of θ (``model.augmented_views``), and each layer's input carries a constant column:
   Q̃ = [Q c] (n_b, U + 1). Then α Q̃ [W b]ᵀ = α Q Wᵀ + 1 bᵀ when c = 1/α: (6.14) in one call.
3. So does the input scale: integer inputs (uint8 pixels) are only converted to floats, never scaled,
   and layer 1's products take α = the data's input scale (c = 1/α); every other layer has α = c = 1.
4. Z^(L) is kept transposed, (M, n_b), so the loss's reductions over the M outputs run along
   contiguous rows (losses.py with ``axis=0``).
5. Plain SGD on one process folds the update into the backward pass: γ rides in dZ^(L), on which all
   of (6.27) is linear, and each layer applies [W b] ← [W b] − α dZᵀ Q̃, (6.27c) and (6.27d) together,
   by one gemm with β = 1 that never writes the gradient out, right after (6.27b) has used the old W.
   Any other optimizer, or several ranks, take the gradient mode: the same gemm with β = 0 writes
   [dW db] into a θ-shaped gradient, the ranks sum it, and the optimizer's own ``step`` updates θ.

The prepared calls hold the addresses of θ's views, so θ must be updated in place (as
``MLP.load_state`` and every optimizer do), never replaced.
"""

from __future__ import annotations

import numpy

from .. import native
from ..losses import LOSSES, count_errors
from ..model import augmented_views
from ..optim import SGDHyper, unsupported
from .base import EVAL_CHUNK, Engine


class _Plan:
    """Buffers and prepared products for mini-batches of ``n`` rows (``train=False``: forward only).

    Qc[l] (n, U_l + 1) is Q̃^(l) = [Q^(l) c] for l = 0 … L−1 (Q^(0) = X, integer inputs unscaled); Z[l]
    (n, U_{l+1}) for the hidden layers; ZT = Z^(L)ᵀ (M, n), which the loss turns into scale·dZ^(L)ᵀ in
    place; dQ[l] (n, U_{l+1}) for the hidden layers, which (6.27a) turns into dZ in place. ``descend``
    folds the update into θ (fold) or writes the gradient into ``grad`` (gradient mode).
    """

    def __init__(self, engine, data, n: int, train: bool):
        net = engine.net
        dtype, sizes, L = net.dtype, net.sizes, net.L
        self.n = n
        self.Qc = []
        for l, u in enumerate(sizes[:-1]):
            self.Qc.append(numpy.empty((n, u + 1), dtype=dtype))
            self.Qc[l][:, u] = 1 / data.scale if l == 0 else 1.0  # c = 1/α
        self.X = self.Qc[0][:, :-1]
        _, self.y, self.staging = data.buffers(n)
        if self.staging is None:  # float inputs: gathered contiguously, then copied beside c
            self.staging = numpy.empty((n, sizes[0]), dtype=dtype)
        self.Z = [numpy.empty((n, u), dtype=dtype) for u in sizes[1:-1]]
        self.ZT = numpy.empty((sizes[-1], n), dtype=dtype)
        self.dQ = [numpy.empty((n, u), dtype=dtype) for u in sizes[1:-1]] if train else []
        self.work: dict = {}  # the loss's small buffers
        self.forward, self.backward = [], []  # (product, h, Z, Q); (h, Z, Q, dZ, to_dQ_prev, descend)
        targets = augmented_views(engine.grad, sizes) if engine.gradient_mode else None
        for l, (layer, Wb) in enumerate(zip(net.layers, augmented_views(net.theta, sizes))):
            alpha, Qc = (data.scale if l == 0 else 1.0), self.Qc[l]
            if l == L - 1:  # Z^(L)ᵀ = α [W b] Q̃ᵀ
                h = Z = Q = None
                dZ = self.ZT.T
                self.forward.append((native.gemm(Wb, Qc.T, self.ZT, alpha), h, Z, Q))
            else:  # Z = α Q̃ [W b]ᵀ, then Q = h(Z) into the next Q̃
                h, Z, Q = layer.activation, self.Z[l], self.Qc[l + 1][:, :-1]
                dZ = self.dQ[l] if train else None
                self.forward.append((native.gemm(Qc, Wb.T, Z, alpha), h, Z, Q))
            if train:
                to_dQ_prev = native.gemm(dZ, layer.W, self.dQ[l - 1]) if l > 0 else None  # (6.27b)
                if targets is None:  # [W b] ← [W b] − α dZᵀ Q̃: (6.27c–d) and the update
                    descend = native.gemm(dZ.T, Qc, Wb, -alpha, 1.0)
                else:  # [dW db] = α dZᵀ Q̃: (6.27c–d)
                    descend = native.gemm(dZ.T, Qc, targets[l], alpha, 0.0)
                self.backward.insert(0, (h, Z, Q, dZ, to_dQ_prev, descend))

    def run_forward(self) -> None:
        """ZT = Z^(L)ᵀ from the inputs in X: Algorithm 6.1 lines 1–6."""
        for product, h, Z, Q in self.forward:
            product()
            if h is not None:
                h.forward(numpy, Z, out=Q)

    def loss(self, task: str, scale: float, grad: bool):
        """(J, misclassified rows or None) of ZT against y, counted before the loss (6.19–6.20) turns
        ZT into scale·dZ^(L)ᵀ (6.26) in place."""
        errors = count_errors(self.ZT, self.y, task, axis=0, work=self.work)
        J, _ = LOSSES[task](self.ZT, self.y, dZ=self.ZT, scale=scale, grad=grad, axis=0, work=self.work)
        return J, errors

    def run_backward(self) -> None:
        """Lines 14–20 for l = L, …, 1, each layer's gemm right after (6.27b) has used the old W."""
        for h, Z, Q, dZ, to_dQ_prev, descend in self.backward:
            if h is not None:
                h.backward(numpy, dZ, Z, Q, out=dZ)  # (6.27a), dQ into dZ in place
            if to_dQ_prev is not None:
                to_dQ_prev()
            descend()


class BlasEngine(Engine):
    """Any network, any optimizer, on the CPU, as prepared BLAS calls (see the module)."""

    name = "blas"

    @classmethod
    def supports(cls, net, optimizer, data, comm=None) -> str | None:
        if net.device.is_cuda:
            return "the blas engine runs on the CPU"
        if not native.available():
            return "no BLAS library with cblas_gemm was found beside NumPy"
        return None

    def __init__(self, net, optimizer, data, comm=None):
        super().__init__(net, optimizer, data, comm)
        folds = unsupported(optimizer.hyper, {SGDHyper: {"lr"}}) is None  # plain SGD
        self.gradient_mode = not folds or self.comm.size > 1
        P = net.num_params
        self.flat = numpy.empty(P + 2, dtype=net.dtype)  # [∇J, J, errors]: one allreduce
        self.grad = self.flat[:P]
        self.plans: dict[tuple, _Plan] = {}

    def plan(self, data, n: int, train: bool = True) -> _Plan:
        """The plan for n rows of ``data`` (its input scale and stored type shape the products)."""
        key = (n, train, data.scale, data.X.dtype)
        if key not in self.plans:
            self.plans[key] = _Plan(self, data, n, train)
        return self.plans[key]

    def step(self, rows, lr):
        rows, share = self.local_rows(rows)
        J, errors = 0.0, None
        if rows.shape[0]:
            p = self.plan(self.data, rows.shape[0])
            self._gather(p, self.data, rows)
            p.run_forward()
            J, errors = p.loss(self.net.task, share if self.gradient_mode else lr, grad=True)
            p.run_backward()
        elif self.gradient_mode:  # this rank's slice is empty: it adds nothing to the sum
            self.grad.fill(0)
        if self.comm.size > 1:
            P = self.net.num_params
            self.flat[P], self.flat[P + 1] = J * share, (0 if errors is None else errors)
            self.comm.allreduce(self.flat)
            J, errors = float(self.flat[P]), (None if self.net.task == "regression" else self.flat[P + 1])
        if self.gradient_mode:
            self.optimizer.step(self.grad, lr)
        return J, errors

    @staticmethod
    def _gather(p: _Plan, data, rows) -> None:
        """The rows' inputs into p.X (beside the constant column) and targets into p.y."""
        data.batch(rows, p.X, p.y, p.staging, raw=True)

    def evaluate(self, data, chunk: int = EVAL_CHUNK):
        """By the same forward products as training, this rank's chunks, summed over ranks."""
        totals = numpy.zeros(2)
        for rows in self.my_chunks(data.n, chunk):
            p = self.plan(data, rows.stop - rows.start, train=False)
            self._gather(p, data, rows)
            p.run_forward()
            J, errors = p.loss(self.net.task, 1.0, grad=False)
            totals += (J * p.n, errors or 0)
        return self.finish_evaluation(totals, data.n)
