"""The CPU engine ``blas``: each iteration as a fixed list of prepared calls, BLAS for the products and
the fused kernels of kernels.cu (compiled for the CPU) for everything between them, on every core.

The mathematics is Algorithm 6.1 and the optimizer's update, as the reference engine runs them. At
n_b = 100 on a CPU what costs besides the two large products is the number of passes over memory and
of Python-level calls, so this engine arranges the same arithmetic in fewer of both:

1. Every call is prepared once per mini-batch size on fixed buffers: a product is one ctypes call (into
   NumPy's own BLAS, ``native.gemm``, cut over the team of 5.), and so is each element-wise pass
   (``native.cpu_kernels``: the gather, h, h', and each row's cost, error and dZ^(L), from kernels.cu).
   Where the package was built without those kernels (no C++ compiler), NumPy does the same passes
   (layers.py, losses.py).
2. The offsets ride in the products. (6.17) stores b^(l) right after W^(l)'s last column, so [W b] is
   one view of θ (``model.augmented_views``), and each layer's input carries a constant column:
   Q̃ = [Q c] (n_b, U + 1). Then α Q̃ [W b]ᵀ = α Q Wᵀ + 1 bᵀ when c = 1/α: (6.14) in one call, written
   straight into the next layer's Q̃, where h then runs in place (h' is read through Q = h(Z)).
3. So does the input scale: integer inputs (uint8 pixels) are only converted to floats, never scaled,
   and layer 1's products take α = the data's input scale (c = 1/α); every other layer has α = c = 1.
4. Plain SGD on one process folds the update into the backward pass: γ rides in dZ^(L), on which all
   of (6.27) is linear, and each layer applies [W b] ← [W b] − α dZᵀ Q̃, (6.27c) and (6.27d) together,
   by one gemm with β = 1 that never writes the gradient out, right after (6.27b) has used the old W.
   Any other optimizer, or several ranks, take the gradient mode: the same gemm with β = 0 writes
   [dW b] into a θ-shaped gradient, the ranks sum it, and the optimizer's own ``step`` updates θ.
5. Every core works on every pass: with the kernels built, each product and large pass is cut over a
   team of threads (engines/cpu_team.h; a product into blocks of C's rows or columns, each a
   single-threaded BLAS call), as many as are fast now (``native.CpuThreads``: all cores on a quiet
   machine, one when another process takes a core and waiting for a descheduled thread would cost
   more than it gives). Without the kernels, BLAS's own threads, chosen the same way.
6. The next mini-batch is gathered while this one computes. Gathering 100 random rows of a data set
   larger than the cache waits on memory (~60 µs at n_b = 100), so training keeps two plans per
   mini-batch size and, right after layer 1's forward pass, a worker of the team gathers the next
   mini-batch into the other plan while this thread does the small products of the layers above
   (Example 6.2: the 10-unit output layer); the big update of layer 1 joins it.
7. No Python between iterations: plain SGD on one process runs whole stretches of up to 100 iterations
   (``run``; ``fit`` hands them over unless a callback needs single iterations) in one call of
   engines/cpu_train.h, which makes the same calls as the prepared ones, in the same order.
8. Zero inputs are skipped in layer 1 where they are most (MNIST: 81 % of the pixels; ``sparse_inputs``
   decides): the gather lists each row's nonzeros instead of converting the row, and layer 1's two
   products run from the lists (engines/cpu_sparse.h) on [W b]ᵀ, which is θ's own memory: the same
   sums without the terms that are exactly zero, at ~0.6 of the dense products' time on Example 6.2.
The prepared calls hold the addresses of θ's views, so θ must be updated in place (as
``MLP.load_state`` and every optimizer do), never replaced.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy

from .. import native
from ..losses import LOSSES, count_errors
from ..model import augmented_views
from ..optim import SGDHyper, unsupported
from .base import EVAL_CHUNK, Engine
from .fused import ACT_CODES, TASK_CODES

STRETCH = 100  # iterations per ``run`` where they run natively (cpu_train.h)
SPARSE_BELOW = 0.3  # layer 1 works on the nonzero inputs (cpu_sparse.h) where fewer than this share
SPARSE_UNITS = 64  # and it has this many units or more (784→10: 1.9 × slower that way; 784→200: 0.7 ×)
SPARSE_SAMPLE = 4096  # rows of the training data that measure the share
SPARSE_VARIABLE = "GPUNN_SPARSE_INPUTS"  # 1 or 0: the user's choice instead


def sparse_inputs(data, units: int, choice=None) -> bool:
    """Whether layer 1 (of ``units`` units) should skip the zero inputs (engines/cpu_sparse.h):
    ``choice`` where given, else $GPUNN_SPARSE_INPUTS (1 or 0) where set, else whether it has at least
    SPARSE_UNITS units and fewer than SPARSE_BELOW of the inputs in the first SPARSE_SAMPLE rows of
    ``data`` are nonzero (MNIST: 19 %)."""
    if choice is None and os.environ.get(SPARSE_VARIABLE) in ("0", "1"):
        choice = os.environ[SPARSE_VARIABLE] == "1"
    if choice is not None:
        return bool(choice)
    sample = data.X[:SPARSE_SAMPLE]
    return (
        units >= SPARSE_UNITS and 0 < sample.size and numpy.count_nonzero(sample) < SPARSE_BELOW * sample.size
    )


class _Plan:
    """Buffers and prepared calls for mini-batches of ``n`` rows of ``data`` (``train=False``: the
    forward pass only).

    Qc[l] (n, U_l + 1) is Q̃^(l) = [Q^(l) c] for l = 0 … L−1 (Q^(0) = X, integer inputs unconverted in
    scale): layer l's product writes Z^(l+1) into Qc[l+1]'s first U columns and h turns it into Q in
    place; ZL (n, M) is Z^(L); dZL (n, M) the loss's scale·dZ^(L); dQ[l] (n, U_{l+1}) for the hidden
    layers, which (6.27a) turns into dZ in place.
    """

    def __init__(self, engine: BlasEngine, data, n: int, train: bool):
        net = engine.net
        dtype, sizes, L = net.dtype, net.sizes, net.L
        self.n, self.task, self.data = n, net.task, data
        self.kernels = native.cpu_kernels(dtype, data.X.dtype) if engine.use_kernels else None
        self.Qc = []
        for l, u in enumerate(sizes[:-1]):
            self.Qc.append(numpy.empty((n, u + 1), dtype=dtype))
            self.Qc[l][:, u] = 1 / data.scale if l == 0 else 1.0  # c = 1/α
        self.X = self.Qc[0][:, :-1]
        _, self.y, self.staging = data.buffers(n)
        if self.staging is None:  # float inputs: gathered contiguously, then copied beside c
            self.staging = numpy.empty((n, sizes[0]), dtype=dtype)
        self.rows = numpy.empty(n, dtype=numpy.int64)
        self.ZL = numpy.empty((n, sizes[-1]), dtype=dtype)
        self.dZL = numpy.empty((n, sizes[-1]), dtype=dtype)
        self.dQ = [numpy.empty((n, u), dtype=dtype) for u in sizes[1:-1]] if train else []
        self.work: dict = {}  # the NumPy loss's small buffers
        self.forward, self.backward = [], []  # (product, activate); (slope, to_dQ_prev, descend)
        self.native, layers = None, []  # cpu_train.h's plan, and each layer's calls for it
        self.sparse = None  # its lists of the nonzero inputs, where layer 1 works on those
        targets = augmented_views(engine.grad, sizes) if engine.gradient_mode else None
        for l, (layer, Wb) in enumerate(zip(net.layers, augmented_views(net.theta, sizes))):
            alpha, Qc = (data.scale if l == 0 else 1.0), self.Qc[l]
            if l == L - 1:
                Z, dZ, activate, slope = self.ZL, self.dZL, None, None
            else:  # Z straight into the next layer's input, where h runs in place
                Z, dZ = self.Qc[l + 1][:, :-1], (self.dQ[l] if train else None)
                activate = self._activation(layer.activation, Z)
                slope = self._slope(layer.activation, dZ, Z) if train else None
            team = engine.team
            forward = native.gemm(Qc, Wb.T, Z, alpha, team=team)  # Z = α Q̃ [W b]ᵀ
            self.forward.append((forward, activate))
            if l == 0:  # for layer 1's sparse products: [W b]ᵀ ((p + 1, U) row-major) and Z
                self.WT, self.Z1 = Wb.T, Z
            if train:
                to_dQ_prev = native.gemm(dZ, layer.W, self.dQ[l - 1], team=team) if l > 0 else None  # (6.27b)
                if targets is None:  # [W b] ← [W b] − α dZᵀ Q̃: (6.27c–d) and the update
                    descend = native.gemm(dZ.T, Qc, Wb, -alpha, 1.0, team=team)
                else:  # [dW db] = α dZᵀ Q̃: (6.27c–d)
                    descend = native.gemm(dZ.T, Qc, targets[l], alpha, 0.0, team=team)
                self.backward.insert(0, (slope, to_dQ_prev, descend))
                act = -1 if l == L - 1 else ACT_CODES[layer.activation.name]
                layers.append(
                    (forward, to_dQ_prev, descend, (Z, dZ, Z.shape[1], Z.strides[0] // Z.itemsize, act))
                )
        self._prepare_loss(net)
        self._prepare_gather(data)
        if engine.sparse and self.kernel_gather is not None and self.WT.flags.c_contiguous:
            self._prepare_sparse(net, data, train)
        if train and engine.max_steps > 1 and self.kernel_gather is not None:  # stretches run natively
            self._prepare_native(net, data, layers)
        if train and self.native is None:  # only cpu_train.h trains from the lists
            self.sparse = None

    def _prepare_sparse(self, net, data, train: bool) -> None:
        """Layer 1 on the inputs' nonzeros (engines/cpu_sparse.h): their lists (``self.sparse``), which
        the gather makes instead of X; in an evaluation's plan, its gather and product as calls."""
        n, p = self.X.shape
        room = n * (p + 1)
        self.lists = (
            numpy.zeros(n, numpy.int64), numpy.empty(room, numpy.int32), numpy.empty(room, net.dtype),
            numpy.empty(native.TEAM_MOST * (p + 2), numpy.int64), numpy.empty(room, numpy.int32),
            numpy.empty(room, net.dtype),
        )  # fmt: skip
        Sparse = native.train_structures(net.dtype)[3]
        self.sparse = Sparse(*(a.ctypes.data for a in self.lists), 1 / data.scale, 1)
        if train:  # cpu_train.h runs them
            return
        k, lists = self.kernels, ctypes.addressof(self.sparse)
        labels = data.y if self.task == "classification" else None
        self.kernel_gather = native.prepare(
            k.team_sparse_gather, data.X, labels, self.rows, n, p, lists, self.y
        )
        Z = self.Z1
        U, ldz = Z.shape[1], Z.strides[0] // Z.itemsize
        product = native.prepare(k.team_sparse_forward, lists, n, p, self.WT, U, data.scale, Z, ldz, 0)
        self.forward[0] = (product, self.forward[0][1])

    def _prepare_native(self, net, data, layers) -> None:
        """cpu_train.h's form of this plan (``self.native``), where every call can be made natively:
        plain SGD (the update folded into the backward pass), targets of the network's float type.
        ``layers``: each layer's prepared products (forward, to_dQ_prev or None, descend), then
        (Z, dZ, U, ldz, h's code)."""
        targets = None if self.task == "classification" else data.y
        none = (0,) * 16  # team_gemm's arguments of no product: a null function
        products = [
            [none if call is None else call.team_arguments for call in layer[:3]] for layer in layers
        ]  # a product that is no team_gemm call (NumPy's matmul) has None
        if any(None in calls for calls in products) or (
            targets is not None and (targets.dtype != net.dtype or not targets.flags.c_contiguous)
        ):
            return
        Product, Layer, Plan, _ = native.train_structures(net.dtype)
        self.native_layers = (Layer * len(layers))()
        for spec, calls, (*_, (Z, dZ, U, ldz, act)) in zip(self.native_layers, products, layers):
            spec.forward, spec.to_dQ_prev, spec.descend = map(Product.of, calls)
            spec.Z, spec.dQ, spec.U, spec.ldz, spec.act = Z.ctypes.data, dZ.ctypes.data, U, ldz, act
        n, p = self.X.shape
        address = lambda a: None if a is None else a.ctypes.data  # noqa: E731
        labels = data.y if targets is None else None
        self.native = Plan(
            L=net.L, n=n, p=p, ldx=p + 1, task=TASK_CODES[net.task], tw=self.y[0].size, posted=0,
            X=address(data.X), labels=address(labels), targets=address(targets), rows=address(self.rows),
            Xb=address(self.X), yb=address(self.y), t=address(None if targets is None else self.y),
            layers=ctypes.addressof(self.native_layers),
            sparse=None if self.sparse is None else ctypes.addressof(self.sparse), WT=address(self.WT),
            ZL=address(self.ZL), zeros=address(self.zeros),
            dZL=address(self.dZL), cost=address(self.cost), wrong=address(self.wrong), out=address(self.out),
        )  # fmt: skip
        self.native_arrays = (data.X, data.y, targets)  # alive while the plan holds their addresses

    @property
    def posted(self) -> bool:
        """Whether ``rows`` were handed to a posted gather (done once the engine joins)."""
        return bool(self.native.posted) if self.native is not None and self.sparse is None else self._posted

    @posted.setter
    def posted(self, value: bool) -> None:
        if self.native is not None:  # a sparse plan's lists come from cpu_train.h's gathers only
            self.native.posted = int(value and self.sparse is None)
        self._posted = value

    # --- the element-wise passes: kernels.cu where built, else NumPy ------------------------------

    def _activation(self, h, Z):
        if self.kernels is not None:
            n, U = Z.shape
            return native.prepare(
                self.kernels.team_activation_rows, Z, n, U, Z.strides[0] // Z.itemsize, ACT_CODES[h.name]
            )
        return lambda: h.forward(numpy, Z, out=Z)

    def _slope(self, h, dQ, Q):
        if self.kernels is not None:
            n, U = dQ.shape
            ld = Q.strides[0] // Q.itemsize
            return native.prepare(self.kernels.team_activation_slope, dQ, Q, n, U, ld, ACT_CODES[h.name])
        return lambda: h.backward(numpy, dQ, Q, Q, out=dQ)  # h' read through Q = h(Z), Z's sign kept

    def _prepare_loss(self, net) -> None:
        if self.kernels is None:
            return
        n, M = self.ZL.shape
        self.scale = (ctypes.c_float if net.dtype == numpy.float32 else ctypes.c_double)(1.0)
        self.cost, self.wrong, self.out = numpy.empty(n), numpy.empty(n), numpy.zeros(2)
        self.zeros = numpy.zeros(M, dtype=net.dtype)  # the offsets are in ZL already
        labels, targets = (self.y, None) if net.task == "classification" else (None, self.y)
        self.kernel_loss = native.prepare(
            self.kernels.team_loss_rows, self.ZL, self.zeros, labels, targets, n, M, TASK_CODES[net.task],
            self.scale, self.dZL, self.cost, self.wrong,
        )  # fmt: skip
        self.kernel_sum = native.prepare(self.kernels.sum_rows, self.cost, self.wrong, n, 1.0 / n, self.out)

    def _prepare_gather(self, data) -> None:
        self.kernel_gather = self.kernel_post = None
        self._posted = False
        if self.kernels is not None and data.X.dtype == self.kernels.input_dtype:
            n, p = self.X.shape
            labels = data.y if self.task == "classification" else None
            args = (data.X, labels, self.rows, n, p, self.X, p + 1, self.y)
            self.kernel_gather = native.prepare(self.kernels.team_gather_rows, *args)
            self.kernel_post = native.prepare(self.kernels.team_gather_rows_post, *args)

    def gather(self, rows) -> None:
        """The rows' inputs (a slice, or indices) into X (beside the constant column, unscaled) and their
        targets into y."""
        self.posted = False
        if self.kernel_gather is None:
            self.data.batch(rows, self.X, self.y, self.staging, raw=True)
            return
        if isinstance(rows, slice):
            self.rows[:] = numpy.arange(rows.start, rows.stop)
        else:
            numpy.copyto(self.rows, rows)
        self.kernel_gather()
        self._gather_targets()

    def post_gather(self, rows) -> None:
        """Starts gathering ``rows`` (n indices) on a worker of the team, which goes on while the caller
        does (``holds`` tells a later iteration; the engine joins before it reads them)."""
        numpy.copyto(self.rows, rows)
        self.kernel_post()
        self._gather_targets()
        self.posted = True

    def holds(self, rows) -> bool:
        """Whether a posted gather fetched exactly these rows into X (valid once joined; a sparse plan's
        native gather makes lists instead)."""
        return self.posted and self.sparse is None and numpy.array_equal(self.rows, rows)

    def _gather_targets(self) -> None:
        if self.task != "classification":  # the kernel gathers labels only
            numpy.take(self.data.y, self.rows, axis=0, out=self.y, mode="clip")

    def run_forward(self, after_first_layer=None) -> None:
        """ZL = Z^(L) from the inputs in X: Algorithm 6.1 lines 1–6 (``after_first_layer()`` is called
        once layer 1 is done)."""
        for l, (product, activate) in enumerate(self.forward):
            product()
            if activate is not None:
                activate()
            if l == 0 and after_first_layer is not None:
                after_first_layer()

    def loss(self, scale: float, grad: bool):
        """(J, misclassified rows or None) of ZL against y (6.19–6.20); dZL = scale·dZ^(L) (6.26)."""
        if self.kernels is not None:
            self.scale.value = scale
            self.kernel_loss()
            self.kernel_sum()
            return float(self.out[0]), (None if self.task == "regression" else self.out[1])
        errors = count_errors(self.ZL, self.y, self.task, work=self.work)
        J, _ = LOSSES[self.task](self.ZL, self.y, dZ=self.dZL, scale=scale, grad=grad, work=self.work)
        return J, errors

    def run_backward(self) -> None:
        """Lines 14–20 for l = L, …, 1, each layer's gemm right after (6.27b) has used the old W."""
        for slope, to_dQ_prev, descend in self.backward:
            if slope is not None:
                slope()  # (6.27a), dQ into dZ in place
            if to_dQ_prev is not None:
                to_dQ_prev()
            descend()


class BlasEngine(Engine):
    """Any network, any optimizer, on the CPU, as prepared calls (see the module)."""

    name = "blas"
    use_kernels = True  # False: the element-wise passes in NumPy even where the kernels were built
    use_native = True  # False: the kernels called one by one from Python, never a native stretch
    use_sparse = None  # layer 1 on the inputs' nonzeros: None to decide by their density, or True/False

    @classmethod
    def supports(cls, net, optimizer, data, comm=None) -> str | None:
        if net.device.is_cuda:
            return "the blas engine runs on the CPU"
        if not native.available():
            return "no BLAS library with cblas_gemm was found beside NumPy"
        return None

    def __init__(self, net, optimizer, data, comm=None):
        folds = unsupported(optimizer.hyper, {SGDHyper: {"lr"}}) is None  # plain SGD
        self.gradient_mode = not folds or (comm is not None and comm.size > 1)
        self.team = native.cpu_kernels(net.dtype, net.dtype) if self.use_kernels else None
        if self.team is not None and self.use_native and not self.gradient_mode:
            self.max_steps = STRETCH  # run() hands whole stretches to cpu_train.h
        self.sparse = self.max_steps > 1 and sparse_inputs(data, net.sizes[1], self.use_sparse)
        super().__init__(net, optimizer, data, comm)
        self.plans: dict[tuple, _Plan] = {}
        self.threads = native.CpuThreads(self.team)
        self.buffer = 0  # which of two plans for the mini-batch size the next iteration uses
        self.lrs = numpy.zeros(self.max_steps)
        self.next_buffer = ctypes.c_int(0)
        self.pairs: dict = {}  # {n: both plans' native forms, for team_train}

    def finish(self) -> None:
        self.join()
        self.threads.release()

    def join(self) -> None:
        """Waits for a posted gather: nothing of the engine's runs once this returns."""
        if self.team is not None:
            self.team.team_join()

    def plan(self, data, n: int, train: bool = True, buffer: int = 0) -> _Plan:
        """The plan for n rows of ``data`` (each data set its own: the calls hold its addresses, and its
        input scale and stored type shape them); training has two of each size, ``buffer`` 0 and 1, so
        that one can gather while the other computes."""
        key = (id(data), n, train, buffer)
        if key not in self.plans:
            self.plans[key] = _Plan(self, data, n, train)
        return self.plans[key]

    def run(self, order, first: int, count: int, batch_size: int, lrs):
        """The contract's stretch: its whole mini-batches by cpu_train.h's ``team_train`` where this
        plan has a native form (plain SGD with the CPU kernels), the rest by ``step``. While the thread
        count is being chosen, in calls of ``CpuThreads.BLOCK`` iterations, each timed for it."""
        n, start = batch_size, first * batch_size
        whole = min(count, (order.shape[0] - start) // n) if self.max_steps > 1 else 0
        pair = self._native_pair(n) if whole else None
        if pair is None:
            return self.run_steps(order, first, count, batch_size, lrs)
        kernels, plans = pair
        rows = numpy.ascontiguousarray(order[start:], dtype=numpy.int64)
        self.lrs[:whole] = lrs[:whole]
        block = self.threads.BLOCK if self.threads.adaptive else whole
        for done in range(0, whole, block):
            iterations = min(block, whole - done)
            self.threads.engage()
            started = time.perf_counter()
            self.next_buffer.value = self.buffer
            kernels.team_train(
                plans, ctypes.byref(self.next_buffer), rows[done * n :].ctypes.data, iterations,
                rows.shape[0] - done * n, self.lrs[done:].ctypes.data, self.records[done:].ctypes.data,
            )  # fmt: skip
            self.buffer = self.next_buffer.value
            self.threads.record(time.perf_counter() - started, iterations)
        return self.run_steps(order, first, count, batch_size, lrs, done=whole)

    def _native_pair(self, n: int):
        """(the kernels module, both training plans' native forms) for mini-batches of n rows, or None
        where a plan has no native form."""
        if n not in self.pairs:
            plans = [self.plan(self.data, n, buffer=b) for b in (0, 1)]
            forms = [p.native for p in plans]
            pointers = None if None in forms else (ctypes.c_void_p * 2)(*map(ctypes.addressof, forms))
            self.pairs[n] = None if pointers is None else (plans[0].kernels, pointers)
        return self.pairs[n]

    def step(self, rows, lr, next_rows=None):
        rows, share = self.local_rows(rows)
        next_rows = None if next_rows is None else self.local_rows(next_rows)[0]
        J, errors = 0.0, None
        if rows.shape[0]:
            self.threads.engage()
            started = time.perf_counter()
            n = rows.shape[0]
            p = self.plan(self.data, n, buffer=self.buffer)
            self.join()
            if not p.holds(rows):
                p.gather(rows)
            p.posted = False
            upcoming = self._upcoming(n, next_rows)
            p.run_forward(None if upcoming is None else lambda: upcoming.post_gather(next_rows))
            J, errors = p.loss(share if self.gradient_mode else lr, grad=True)
            p.run_backward()
            if upcoming is not None:
                self.buffer = 1 - self.buffer
            self.threads.record(time.perf_counter() - started)
        elif self.gradient_mode:  # this rank's slice is empty: it adds nothing to the sum
            self.grad.fill(0)
        if self.comm.size > 1:
            J, errors = self.sum_over_ranks(J, errors, share)
        if self.gradient_mode:
            self.optimizer.step(self.grad, lr)
        return J, errors

    def _upcoming(self, n: int, next_rows) -> _Plan | None:
        """The other plan, where the next mini-batch (of n rows too) is to be gathered during this
        iteration: after layer 1's forward pass, by a worker, while this thread does the small products
        of the layers above (a network with a hidden layer; without one, nothing would overlap)."""
        if next_rows is None or next_rows.shape[0] != n or self.net.L < 2:
            return None
        upcoming = self.plan(self.data, n, buffer=1 - self.buffer)
        return upcoming if upcoming.kernel_post is not None else None

    def evaluate(self, data, chunk: int = EVAL_CHUNK):
        """By the same forward products as training, this rank's chunks, summed over ranks."""
        totals = numpy.zeros(2)
        engaged = self.threads.engage()
        try:
            for rows in self.my_chunks(data.n, chunk):
                p = self.plan(data, rows.stop - rows.start, train=False)
                p.gather(rows)
                p.run_forward()
                J, errors = p.loss(1.0, grad=False)
                totals += (J * p.n, errors or 0)
        finally:
            if engaged:  # called on its own, not between iterations of ``fit``
                self.threads.release()
        return self.finish_evaluation(totals, data.n)
