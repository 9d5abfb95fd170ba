"""The CPU engine (``engine="blas"``, the CPU default): plain SGD as a fixed list of prepared BLAS calls.

    step = BlasStep(net, opt, train_set)      # what make_step(net, opt, train_set) gives on the CPU
    J, errors = step(rows, lr)                # one iteration of (6.23), as train.TrainStep
    val_cost, val_error = step.evaluate(val_set, chunk=1000)

The mathematics is Algorithm 6.1 and (6.23) as ``train.TrainStep`` runs them, which stays the
reference. At n_b = 100 on a CPU what costs besides the two large products is the number of passes
over memory and of Python-level calls, so this engine arranges the same arithmetic in fewer of both:

1. Every product is a ``blas.gemm`` prepared once per mini-batch size on fixed buffers: one ctypes call.
2. The offsets ride in the products. (6.17) stores b^(l) right after W^(l)'s last column, so [W b] is
   one view of θ (``model.augmented_views``), and each layer's input carries a constant column:
   Q̃ = [Q c] (n_b, U + 1). Then α Q̃ [W b]ᵀ = α Q Wᵀ + 1 bᵀ when c = 1/α: (6.14) in one call.
3. So does the pixels' 1/255: layer 1's input X stays the uint8 pixels converted to floats, 0…255,
   and its products take α = 1/255 (c = 255); every other layer has α = 1, c = 1.
4. The update is folded into the backward pass. γ rides in dZ^(L), on which all of (6.27) is linear,
   and each layer applies [W b] ← [W b] − α dZᵀ Q̃, (6.27c) and (6.27d) together, by one gemm with
   β = 1 that never writes the gradient out, right after (6.27b) has used the old W.
5. Z^(L) is kept transposed, (M, n_b), so the softmax's reductions over the M classes run along
   contiguous rows (NumPy reduces an (n_b, M) array along its short axis several times slower).

Classification with plain SGD only (momentum and weight decay need the gradient itself): ``support``
says why anything else runs on the xp engine. The prepared calls hold the addresses of θ's views, so
θ must be updated in place (as ``MLP.load_state`` does), never replaced.
"""

from __future__ import annotations

import numpy

from . import blas
from .data import PIXEL_SCALE, DeviceDataset
from .model import MLP, augmented_views
from .optim import SGD


def support(net: MLP, opt: SGD) -> str | None:
    """None where BlasStep can train ``net`` with ``opt``, else the reason it cannot."""
    if net.device.is_cuda:
        return "the blas engine runs on the CPU"
    if net.task != "classification":
        return f"the blas engine trains classification networks, not {net.task}"
    if opt.momentum or opt.weight_decay:
        return "the blas engine runs plain SGD (no momentum or weight decay)"
    if not blas.available():
        return "no BLAS library with cblas_gemm was found beside NumPy"
    return None


class _Plan:
    """Buffers and prepared products for mini-batches of ``n`` rows (``train=False``: forward only).

    Qc[l] (n, U_l + 1) is Q̃^(l) = [Q^(l) c] for l = 0 … L−1 (Q^(0) = X, the pixels 0…255); Z[l]
    (n, U_{l+1}) for the hidden layers; ZT = Z^(L)ᵀ (M, n), which the loss turns into γ dZ^(L)ᵀ in
    place; dQ[l] (n, U_{l+1}) for the hidden layers, which (6.27a) turns into dZ in place.
    """

    def __init__(self, net: MLP, n: int, train: bool):
        dtype, sizes, L = net.dtype, net.sizes, net.L
        self.n = n
        self.staging = numpy.empty((n, sizes[0]), dtype=numpy.uint8)
        self.Qc = []
        for l, u in enumerate(sizes[:-1]):
            self.Qc.append(numpy.empty((n, u + 1), dtype=dtype))
            self.Qc[l][:, u] = 1 / PIXEL_SCALE if l == 0 else 1.0  # c = 1/α
        self.X = self.Qc[0][:, :-1]
        self.y = numpy.empty(n, dtype=numpy.int32)
        self.Z = [numpy.empty((n, u), dtype=dtype) for u in sizes[1:-1]]
        self.ZT = numpy.empty((sizes[-1], n), dtype=dtype)
        self.dQ = [numpy.empty((n, u), dtype=dtype) for u in sizes[1:-1]] if train else []
        self.columns = numpy.arange(n)  # i, for the flat index y_i·n + i of (y_i, i) in ZT
        self.picked = numpy.empty(n, dtype=numpy.intp)
        self.colmax, self.total = numpy.empty(n, dtype=dtype), numpy.empty(n, dtype=dtype)
        self.argmax, self.wrong = numpy.empty(n, dtype=numpy.intp), numpy.empty(n, dtype=bool)
        self.forward, self.backward = [], []  # (product, h, Z, Q); (h, Z, Q, dZ, to_dQ_prev, descend)
        for l, (layer, Wb) in enumerate(zip(net.layers, augmented_views(net.theta, sizes))):
            alpha, Qc = (PIXEL_SCALE if l == 0 else 1.0), self.Qc[l]
            if l == L - 1:  # Z^(L)ᵀ = α [W b] Q̃ᵀ
                h = Z = Q = None
                dZ = self.ZT.T
                self.forward.append((blas.gemm(Wb, Qc.T, self.ZT, alpha), h, Z, Q))
            else:  # Z = α Q̃ [W b]ᵀ, then Q = h(Z) into the next Q̃
                h, Z, Q = layer.activation, self.Z[l], self.Qc[l + 1][:, :-1]
                dZ = self.dQ[l] if train else None
                self.forward.append((blas.gemm(Qc, Wb.T, Z, alpha), h, Z, Q))
            if train:
                to_dQ_prev = blas.gemm(dZ, layer.W, self.dQ[l - 1]) if l > 0 else None  # (6.27b)
                descend = blas.gemm(dZ.T, Qc, Wb, -alpha, 1.0)  # [W b] ← [W b] − α dZᵀ Q̃: (6.27c–d)
                self.backward.insert(0, (h, Z, Q, dZ, to_dQ_prev, descend))

    def run_forward(self) -> None:
        """ZT = Z^(L)ᵀ from the pixels in X: Algorithm 6.1 lines 1–6."""
        for product, h, Z, Q in self.forward:
            product()
            if h is not None:
                h.forward(numpy, Z, out=Q)

    def loss(self, y, scale: float, grad: bool):
        """(J, misclassified rows) of ZT against labels y (6.20); with ``grad``, ZT becomes
        scale·dZ^(L)ᵀ (6.26b) in place. A row is misclassified when its first largest logit is not
        y_i's (argmax, as count_errors)."""
        ZT, n = self.ZT, self.n
        numpy.argmax(ZT, axis=0, out=self.argmax)
        errors = numpy.count_nonzero(numpy.not_equal(self.argmax, y, out=self.wrong))
        numpy.max(ZT, axis=0, out=self.colmax)
        ZT -= self.colmax  # every entry <= 0
        numpy.multiply(y, n, out=self.picked)
        self.picked += self.columns
        flat = ZT.reshape(-1)
        picked = flat.take(self.picked).sum(dtype=numpy.float64)
        numpy.exp(ZT, out=ZT)
        total = numpy.sum(ZT, axis=0, out=self.total)  # in [1, M]: its log is safe
        J = (numpy.log(total).sum(dtype=numpy.float64) - picked) / n
        if grad:
            ZT *= numpy.divide(scale / n, total, out=total)  # softmax and the 1/n_b in one pass
            flat[self.picked] -= scale / n
        return J, errors

    def run_backward(self) -> None:
        """Lines 14–20 for l = L, …, 1, each layer's update folded in once (6.27b) has used W."""
        for h, Z, Q, dZ, to_dQ_prev, descend in self.backward:
            if h is not None:
                h.backward(numpy, dZ, Z, Q, out=dZ)  # (6.27a), dQ into dZ in place
            if to_dQ_prev is not None:
                to_dQ_prev()
            descend()


class BlasStep:
    """One plain-SGD iteration on rows of a CPU DeviceDataset; returns (J, misclassified rows)."""

    def __init__(self, net: MLP, opt: SGD, data: DeviceDataset):
        reason = support(net, opt)
        if reason is not None:
            raise ValueError(reason)
        self.net, self.opt, self.data = net, opt, data
        self.plans: dict[tuple[int, bool], _Plan] = {}

    def plan(self, n: int, train: bool = True) -> _Plan:
        key = (n, train)
        if key not in self.plans:
            self.plans[key] = _Plan(self.net, n, train)
        return self.plans[key]

    def __call__(self, rows, lr):
        p = self.plan(rows.shape[0])
        _, y = self.data.batch(rows, p.X, p.y, p.staging, raw=True)
        p.run_forward()
        J, errors = p.loss(y, lr, grad=True)
        p.run_backward()
        return J, errors

    def evaluate(self, data: DeviceDataset, chunk: int) -> tuple[float, float]:
        """(mean cost, misclassification rate) of the network on the whole of ``data``, ``chunk`` rows
        at a time, by the same forward products as training (train.evaluate, for this engine)."""
        cost, errors = 0.0, 0
        for start in range(0, data.n, chunk):
            rows = slice(start, min(data.n, start + chunk))
            p = self.plan(rows.stop - rows.start, train=False)
            _, y = data.batch(rows, p.X, p.y, raw=True)
            p.run_forward()
            J, e = p.loss(y, 1.0, grad=False)
            cost += J * p.n
            errors += e
        return cost / data.n, errors / data.n
