"""More peers for bench_mnist.py: JAX and compiled PyTorch, on the same work as its ``TorchRun``.

    from peers import JaxJitRun, JaxScanRun, TorchCompiledRun, TorchRun
    run = JaxScanRun(device, train, val, hidden=[200], seed=0, epochs=15)
    run.epoch(0)          # the warm-up epoch also traces and compiles
    run.reset()           # gpunn's initial weights again; the compiled programs are kept
    run.epoch(0); run.sync(); run.records[-1]   # (val_loss, val_error)

Each class has TorchRun's interface (``name``, ``upload_s``, ``records``, ``reset``, ``epoch``, ``sync``,
``losses``, ``memory``) and does TorchRun's work: gpunn's initial θ (init_theta, param_views), the
per-epoch orders of gpunn.data.epoch_order, uint8 images resident on the device and scaled per
mini-batch inside the compiled step (X = pixels · 1/255, float32), the mean softmax cross-entropy,
SGD with γ = 0.5 and n_b = 100, each iteration's mini-batch cost and error count kept on the device,
and the whole validation set evaluated every 100 iterations (counted over the run) in chunks of
EVAL_CHUNK rows, evaluation compiled as well. Float32 throughout; no TF32 (JAX's matmuls ask for
Precision.HIGHEST, PyTorch's TF32 switches are off).

* ``JaxJitRun`` ("jax-jit"): one ``jax.jit`` call per SGD step — gather the rows, convert, forward,
  cost, ``jax.value_and_grad``, update, record — with θ and the records donated (updated in place).
* ``JaxScanRun`` ("jax-scan"): one ``jax.jit`` call per stretch between evaluations (100 steps), a
  ``jax.lax.scan`` of the same step; a stretch cut short by the epoch's end is scanned as it is.
* ``TorchCompiledRun`` ("pytorch-compiled"): one ``torch.compile(fullgraph=True)`` graph per step:
  gradients by ``torch.func.grad_and_value``, the SGD update and the records as in-place updates of
  the graph's inputs. (``loss.backward()`` with ``optimizer.step()`` breaks the graph on torch 2.13,
  and ``torch.autograd.grad`` needs the private ``torch._dynamo.config.trace_autograd_ops``.)

JAX and PyTorch are imported when a class is made, so importing this module costs nothing where they
are absent; a missing one is an ImportError of one line. JAX is told not to reserve most of a GPU's
memory up front (XLA_PYTHON_CLIENT_PREALLOCATE=false, unless set already), so that it shares the
device with CuPy and PyTorch.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np

from gpunn.data import epoch_order
from gpunn.engines import EVAL_CHUNK
from gpunn.model import init_theta, param_views

BATCH = 100  # n_b of Example 6.2
LR = 0.5  # γ
EVAL_EVERY = 100  # iterations between evaluations, counted over the whole run


def initial_params(hidden, seed) -> list[tuple[np.ndarray, np.ndarray]]:
    """gpunn's θ for sizes [784, *hidden, 10] as [(W (U_l, U_{l-1}), b (U_l,))], C-contiguous float32."""
    sizes = [784, *hidden, 10]
    theta = init_theta(sizes, "relu", seed, np.float32)
    return [(np.ascontiguousarray(W), b.copy()) for W, b in param_views(theta, sizes)]


def _require(module: str, name: str, hint: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{name} needs {module}, which is not installed: {hint}") from None


class _Counter:
    """The iteration count of a run, the evaluations it triggers, and the records' capacity."""

    def _setup(self, n, epochs):
        self.n = n
        self.steps_per_epoch = -(-n // BATCH)
        self.full_steps = n // BATCH  # the last mini-batch of an epoch is partial when n_b ∤ n
        self.iterations = max(1, epochs) * self.steps_per_epoch

    def _check_room(self, steps):
        if self.t + steps > self.iterations:
            raise RuntimeError(
                f"{self.name}: iteration {self.t + steps} is past the {self.iterations} this run was "
                "made for (its epochs argument)"
            )

    def _advance(self, steps):
        self.t += steps
        if self.t % EVAL_EVERY == 0:
            self.records.append(self.evaluate())


# --- JAX -----------------------------------------------------------------------------------------


def _jax_programs(jax):
    """The jitted programs of both JAX runs: (step, segment, evaluate)."""
    jnp, lax = jax.numpy, jax.lax

    def forward(params, X):
        """Z^(L) (n, M) of (6.16): Q^(l) = h(Q^(l-1) W^(l)ᵀ + b^(l)ᵀ), ReLU between, linear last."""
        Q = X
        for l, (W, b) in enumerate(params):
            Z = jnp.matmul(Q, W.T, precision=lax.Precision.HIGHEST) + b
            Q = jax.nn.relu(Z) if l < len(params) - 1 else Z
        return Z

    def cost(params, X, y):
        """The mean softmax cross-entropy of the mini-batch, and Z for the error count."""
        Z = forward(params, X)
        logp = jax.nn.log_softmax(Z)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), Z

    def scaled(pixels):
        return pixels.astype(jnp.float32) * (1 / 255)

    def sgd(params, X_all, y_all, rows):
        """One SGD step on the rows ``rows`` (n_b,) of the uint8 set: (θ', J, errors)."""
        X = scaled(X_all.at[rows].get(mode="promise_in_bounds"))  # rows: part of a permutation
        y = y_all.at[rows].get(mode="promise_in_bounds")
        (J, Z), grads = jax.value_and_grad(cost, has_aux=True)(params, X, y)
        params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
        return params, J, jnp.sum(jnp.argmax(Z, axis=1) != y)

    def step(params, loss_hist, error_hist, X_all, y_all, order, start, t, size):
        """Iteration t on the mini-batch order[start : start + size]."""
        rows = lax.dynamic_slice_in_dim(order, start, size)
        params, J, errors = sgd(params, X_all, y_all, rows)
        return params, loss_hist.at[t].set(J), error_hist.at[t].set(errors)

    def segment(params, loss_hist, error_hist, X_all, y_all, order, first, t, length):
        """Iterations t … t + length − 1 on the full mini-batches first … first + length − 1."""
        rows = lax.dynamic_slice_in_dim(order, first * BATCH, length * BATCH).reshape(length, BATCH)

        def body(params, batch_rows):
            params, J, errors = sgd(params, X_all, y_all, batch_rows)
            return params, (J, errors)

        params, (J, errors) = lax.scan(body, params, rows)
        loss_hist = lax.dynamic_update_slice(loss_hist, J, (t,))
        return params, loss_hist, lax.dynamic_update_slice(error_hist, errors, (t,))

    def evaluate(params, X, y):
        """Per chunk of EVAL_CHUNK rows: the summed cross-entropy and the error count."""

        def chunk(Xy):
            Z = forward(params, scaled(Xy[0]))
            J = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(Z), Xy[1][:, None], axis=1))
            return J, jnp.sum(jnp.argmax(Z, axis=1) != Xy[1])

        full = X.shape[0] // EVAL_CHUNK * EVAL_CHUNK
        blocks = (X[:full].reshape(-1, EVAL_CHUNK, X.shape[1]), y[:full].reshape(-1, EVAL_CHUNK))
        costs, errors = lax.map(chunk, blocks)  # one chunk after the other, as gpunn and TorchRun
        if full < X.shape[0]:
            J, e = chunk((X[full:], y[full:]))
            costs, errors = jnp.append(costs, J), jnp.append(errors, e)
        return costs, errors

    donate = (0, 1, 2)  # θ and the records are updated in place
    return (
        jax.jit(step, donate_argnums=donate, static_argnames="size"),
        jax.jit(segment, donate_argnums=donate, static_argnames="length"),
        jax.jit(evaluate),
    )


class _JaxRun(_Counter):
    name = "jax"

    def __init__(self, device, train, val, hidden, seed, epochs):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before any JAX backend starts
        jax = _require("jax", self.name, "pip install jax (jax[cuda12] for a GPU)")
        self.jax = jax
        try:
            self.dev = jax.devices("cuda")[device.index] if device.is_cuda else jax.devices("cpu")[0]
        except (RuntimeError, IndexError) as exc:
            raise ImportError(f"{self.name}: JAX cannot use {device.description()}: {exc}") from None
        self.device, self.hidden, self.seed = device, hidden, seed  # device: gpunn's
        self._setup(train.X.shape[0], epochs)
        host = [
            np.ascontiguousarray(a, dtype=t)
            for a, t in ((train.X, np.uint8), (train.y, np.int32), (val.X, np.uint8), (val.y, np.int32))
        ]
        t0 = time.perf_counter()
        self.Xtr, self.ytr, self.Xva, self.yva = (jax.device_put(a, self.dev) for a in host)
        jax.block_until_ready((self.Xtr, self.ytr, self.Xva, self.yva))
        self.upload_s = time.perf_counter() - t0
        self._step, self._segment, self._evaluate = _jax_programs(jax)
        self.reset()

    def reset(self):
        jax = self.jax
        params = initial_params(self.hidden, self.seed)
        hists = (np.zeros(self.iterations, np.float32), np.zeros(self.iterations, np.int32))
        self.state = jax.device_put((params, *hists), self.dev)  # (θ, costs, error counts)
        self.t = 0
        self.records = []

    def _order(self, e):
        return self.jax.device_put(epoch_order(self.seed, e, self.n, BATCH).astype(np.int32), self.dev)

    def _one_step(self, order, i):
        start = i * BATCH
        size = min(BATCH, self.n - start)
        self.state = self._step(*self.state, self.Xtr, self.ytr, order, start, self.t, size=size)

    def evaluate(self):
        costs, errors = self._evaluate(self.state[0], self.Xva, self.yva)
        n = self.Xva.shape[0]
        return float(np.sum(np.asarray(costs, np.float64))) / n, float(np.sum(np.asarray(errors))) / n

    def sync(self):
        self.jax.block_until_ready(self.state)

    def losses(self):
        return np.asarray(self.state[1])[: self.t].astype(np.float64)

    def memory(self):
        stats = self.dev.memory_stats() if self.dev.platform != "cpu" else None
        return int(stats.get("peak_bytes_in_use", 0)) if stats else 0


class JaxJitRun(_JaxRun):
    """JAX, the whole SGD step under one ``jax.jit``, called once per iteration."""

    name = "jax-jit"

    def epoch(self, e):
        order = self._order(e)
        self._check_room(self.steps_per_epoch)
        for i in range(self.steps_per_epoch):
            self._one_step(order, i)
            self._advance(1)


class JaxScanRun(_JaxRun):
    """JAX, one ``jax.jit`` of a ``jax.lax.scan`` over the steps between two evaluations."""

    name = "jax-scan"

    def epoch(self, e):
        order = self._order(e)
        self._check_room(self.steps_per_epoch)
        i = 0
        while i < self.steps_per_epoch:
            if i < self.full_steps:  # up to the next evaluation or the epoch's last full mini-batch
                length = min(self.full_steps - i, EVAL_EVERY - self.t % EVAL_EVERY)
                self.state = self._segment(*self.state, self.Xtr, self.ytr, order, i, self.t, length=length)
            else:  # a partial last mini-batch has a shape of its own: the jitted single step
                length = 1
                self._one_step(order, i)
            i += length
            self._advance(length)


# --- PyTorch, compiled ---------------------------------------------------------------------------


@functools.cache
def _torch_programs(torch):
    """The two functions that TorchCompiledRun compiles: (step, evaluate). Made once, so that every
    run's compiled graphs pass the guards on these functions' closures (no recompilation)."""
    F = torch.nn.functional

    def forward(params, X):
        Q = X
        for l in range(0, len(params), 2):
            Z = F.linear(Q, params[l], params[l + 1])
            Q = torch.relu(Z) if l + 2 < len(params) else Z
        return Z

    def cost(params, X, y):
        Z = forward(params, X)
        return F.cross_entropy(Z, y), Z

    def step(params, X_all, y_all, order, k, loss_hist, error_hist, t):
        """Iteration t (a 1-element index tensor) on mini-batch k of ``order`` (steps, n_b); θ, the
        records, k and t are updated in place."""
        rows = order.index_select(0, k).view(-1)
        X = X_all.index_select(0, rows).float() * (1 / 255)
        y = y_all.index_select(0, rows)
        grads, (J, Z) = torch.func.grad_and_value(cost, has_aux=True)(params, X, y)
        for p, g in zip(params, grads):
            p.sub_(g, alpha=LR)
        loss_hist.index_copy_(0, t, J.view(1))
        error_hist.index_copy_(0, t, (Z.argmax(1) != y).sum().view(1))
        k.add_(1)
        t.add_(1)

    def evaluate(params, X, y):
        """One chunk of the validation set: the summed cross-entropy and the error count."""
        Z = forward(params, X.float() * (1 / 255))
        return F.cross_entropy(Z, y, reduction="sum").double(), (Z.argmax(1) != y).sum()

    return step, evaluate


class _TorchRun(_Counter):
    """What both PyTorch contestants share: the device, TF32 off, the data uploaded, the records."""

    def __init__(self, device, train, val, hidden, seed, epochs):
        torch = _require("torch", self.name, "pip install torch")
        self.torch = torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        self.dev = torch.device("cpu" if not device.is_cuda else f"cuda:{device.index}")
        self.device, self.hidden, self.seed = device, hidden, seed  # device: gpunn's
        self._setup(train.X.shape[0], epochs)
        host = [  # torch.from_numpy wants writable arrays: copied here, untimed
            np.array(a, dtype=t)
            for a, t in ((train.X, np.uint8), (train.y, np.int64), (val.X, np.uint8), (val.y, np.int64))
        ]
        t0 = time.perf_counter()
        self.Xtr, self.ytr, self.Xva, self.yva = (torch.from_numpy(a).to(self.dev) for a in host)
        self.sync()
        self.upload_s = time.perf_counter() - t0

    def _fresh_records(self) -> None:
        torch = self.torch
        self.loss_hist = torch.zeros(self.iterations, device=self.dev)
        self.error_hist = torch.zeros(self.iterations, device=self.dev, dtype=torch.int64)
        self.t = 0
        self.records = []

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def losses(self):
        return self.loss_hist[: self.t].cpu().numpy().astype(np.float64)

    def memory(self):
        return int(self.torch.cuda.max_memory_allocated(self.dev)) if self.dev.type == "cuda" else 0


class TorchRun(_TorchRun):
    """PyTorch eager, written the way PyTorch users write it: data on the device, ``nn.Sequential``,
    ``optim.SGD``, ``loss.backward()``, no per-step ``.item()``."""

    name = "pytorch"

    def __init__(self, device, train, val, hidden, seed, epochs):
        super().__init__(device, train, val, hidden, seed, epochs)
        self.reset()

    def reset(self):
        torch, layers = self.torch, []
        params = initial_params(self.hidden, self.seed)
        for l, (W, b) in enumerate(params):
            lin = torch.nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W))
                lin.bias.copy_(torch.from_numpy(b))
            layers += [lin] + ([torch.nn.ReLU()] if l < len(params) - 1 else [])
        self.model = torch.nn.Sequential(*layers).to(self.dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self._fresh_records()

    def evaluate(self):
        torch = self.torch
        cost = torch.zeros((), device=self.dev, dtype=torch.float64)
        errors = torch.zeros((), device=self.dev, dtype=torch.int64)
        with torch.no_grad():
            for s in range(0, self.Xva.shape[0], EVAL_CHUNK):  # gpunn's chunks
                X = self.Xva[s : s + EVAL_CHUNK].float().mul_(1 / 255)
                y = self.yva[s : s + EVAL_CHUNK]
                Z = self.model(X)
                cost += torch.nn.functional.cross_entropy(Z, y, reduction="sum")
                errors += (Z.argmax(1) != y).sum()
        return float(cost) / self.Xva.shape[0], float(errors) / self.Xva.shape[0]

    def epoch(self, e):
        torch, F = self.torch, self.torch.nn.functional
        order = torch.from_numpy(epoch_order(self.seed, e, self.n, BATCH)).to(self.dev)
        self._check_room(self.steps_per_epoch)
        for i in range(0, order.shape[0], BATCH):
            rows = order[i : i + BATCH]
            X = self.Xtr.index_select(0, rows).float().mul_(1 / 255)
            y = self.ytr.index_select(0, rows)
            Z = self.model(X)
            loss = F.cross_entropy(Z, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.loss_hist[self.t] = loss.detach()  # the lecture's blue curves: cost and errors
            self.error_hist[self.t] = (Z.detach().argmax(1) != y).sum()
            self._advance(1)


class TorchCompiledRun(_TorchRun):
    """PyTorch with the whole step — forward, cost, gradients, update, records — as one
    ``torch.compile(fullgraph=True)`` graph (default mode, static shapes)."""

    name = "pytorch-compiled"

    def __init__(self, device, train, val, hidden, seed, epochs):
        super().__init__(device, train, val, hidden, seed, epochs)
        step, evaluate = _torch_programs(self.torch)
        self._step = self.torch.compile(step, fullgraph=True, dynamic=False)
        self._evaluate = self.torch.compile(evaluate, fullgraph=True, dynamic=False)
        self.reset()

    def reset(self):
        torch = self.torch
        self.params = [
            torch.from_numpy(a).to(self.dev) for pair in initial_params(self.hidden, self.seed) for a in pair
        ]
        self.t_dev = torch.zeros(1, device=self.dev, dtype=torch.int64)
        self._fresh_records()

    def evaluate(self):
        n, sums = self.Xva.shape[0], []
        for s in range(0, n, EVAL_CHUNK):  # one compiled chunk, not n / EVAL_CHUNK of them unrolled
            X, y = self.Xva[s : s + EVAL_CHUNK], self.yva[s : s + EVAL_CHUNK]
            sums.append(self._evaluate(self.params, X, y))
        cost_sum, errors = (sum(column) for column in zip(*sums))
        return float(cost_sum) / n, float(errors) / n

    def epoch(self, e):
        torch = self.torch
        order = torch.from_numpy(epoch_order(self.seed, e, self.n, BATCH)).to(self.dev)
        full = order[: self.full_steps * BATCH].view(-1, BATCH)
        tail = order[self.full_steps * BATCH :].view(1, -1)  # a partial last mini-batch: its own graph
        k = torch.zeros(1, device=self.dev, dtype=torch.int64)
        self._check_room(self.steps_per_epoch)
        for i in range(self.steps_per_epoch):
            if i == self.full_steps:
                k.zero_()
            block = full if i < self.full_steps else tail
            self._step(self.params, self.Xtr, self.ytr, block, k, self.loss_hist, self.error_hist, self.t_dev)
            self._advance(1)
