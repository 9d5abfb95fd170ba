"""Training: ``fit``, mini-batch SGD (or Adam) over any engine, on your own arrays or a stored data set.

    history = gpunn.fit(net, X, y, epochs=30, batch_size=32, optimizer="adam", lr=1e-3,
                        validation_data=(X_val, y_val), seed=0)
    history.records[-1]["val_error"]     # one record per evaluation, the keys of metrics.jsonl
    history.batch_loss                   # every iteration's mini-batch cost (Figures 6.7/6.8)

The data go to the network's device once and stay there. Each epoch visits the rows in an order that
is a function of the seed and the epoch alone (``data.epoch_order``), so every device and every
resumed run sees the same mini-batches. The loop talks to one engine (engines/) through its contract
and never knows which: it hands the engine stretches of iterations that never cross an evaluation or
an epoch's end, records every iteration's cost and error count on the device, and fetches them only at
evaluations, epoch ends and stops, so an iteration never waits for the device.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import ClassVar

import numpy

from .backend import to_numpy
from .data import DeviceDataset
from .distributed import get_communicator, share_cores
from .engines import Engine, make_engine
from .errors import DivergenceError
from .layers import ACTIVATIONS
from .losses import LOSSES
from .model import DTYPES, MLP, Workspace
from .optim import OPTIMIZERS, SCHEDULES, Optimizer, Schedule, make_optimizer

DIVERGENCE_FACTOR = 10.0  # default: stop when the mini-batch cost stays this far above its start
DIVERGENCE_WINDOW = 20  # "stays": the median of this many recent iterations
START_SAMPLE = 1000  # rows of the first epoch on which the starting cost is measured


@dataclasses.dataclass
class History:
    """Where a run stands and how it got there.

    iteration    iterations done;  train_time  seconds of training so far (evaluations excluded)
    batch_loss   every iteration's mini-batch cost J;  batch_error  its misclassification rate (NaN for
                 regression): the blue curves of Figures 6.7/6.8
    records      one dict per evaluation: iteration, epoch, train_loss/train_error (mini-batch means
                 since the previous evaluation), val_loss, val_error (None without validation data, or
                 for regression), lr, time_s: the keys of the CLI's metrics.jsonl
    start_cost   the cost of the initial network on a sample of the training rows (the divergence
                 rule's reference; None until fit measures it)
    """

    iteration: int = 0
    train_time: float = 0.0
    batch_loss: list = dataclasses.field(default_factory=list)
    batch_error: list = dataclasses.field(default_factory=list)
    records: list = dataclasses.field(default_factory=list)
    start_cost: float | None = None


class Callback:
    """Hooks into ``fit``; override what you need. ``fit`` calls ``on_step`` after every iteration,
    ``on_eval`` with each evaluation's record, ``on_checkpoint`` at every epoch's end and when the run
    stops early (a moment to save), asks ``should_stop`` after every stretch of iterations, and calls
    ``close`` when it returns or fails.

    A stretch is what the engine runs in one go: up to ``max_steps`` iterations (100 on the CPU engine
    and in CUDA graphs), never across an evaluation or an epoch's end; ``on_step`` is then called for
    each of its iterations in turn. While a callback that overrides ``on_step`` or ``should_stop`` has
    ``per_iteration`` True (the default), every stretch is one iteration: it sees θ as each iteration
    left it, and a stop comes after exactly the iteration it asked for. Set it False where neither
    matters (a progress bar, a stop on a signal) and the run keeps the engine's full speed."""

    per_iteration: ClassVar[bool] = True

    def on_step(self, iteration: int) -> None:
        pass

    def on_eval(self, record: dict) -> None:
        pass

    def on_checkpoint(self, history: History) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        pass


def iterations_per_epoch(n: int, batch_size: int) -> int:
    """⌈n / n_b⌉: the last, partial mini-batch of an epoch is kept."""
    return -(-n // batch_size)


def _whole(name: str, value, low: int = 1, high: int = 1 << 40) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in {low}…{high}; got {value!r}")
    return int(value)


@numpy.errstate(over="ignore", invalid="ignore", divide="ignore")  # divergence is reported, not warned
def fit(
    net: MLP,
    X,
    y=None,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    optimizer: str | Optimizer = "sgd",
    lr: float | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    lr_step_epochs: int = 5,
    lr_gamma: float = 0.1,
    validation_data=None,
    eval_every: int | None = None,
    seed: int = 0,
    engine: str | Engine = "auto",
    progress: bool | None = None,
    callbacks: Iterable[Callback] = (),
    on_eval: Callable[[dict], None] | None = None,
    input_scale: float | None = None,
    divergence_factor: float | None = DIVERGENCE_FACTOR,
    history: History | None = None,
    comm=None,
) -> History:
    """Train ``net`` on inputs X (n, U_0) and targets y by mini-batch gradient descent; return the
    History (pass it back as ``history`` to continue a run to more ``epochs``).

    X, y            NumPy or CuPy arrays (X any real dtype; y: integer labels 0…M−1, 0/1 for binary,
                    values (n, U_L) or (n,) for regression), checked and kept on the network's device:
                    float inputs as given, integer inputs (uint8 images) compact, converted per
                    mini-batch and multiplied by ``input_scale``. Or X a DeviceDataset (y None).
    epochs          passes over the training set (the total, counting those in ``history``)
    batch_size      n_b; an epoch's last mini-batch may be smaller
    optimizer       "sgd" (``lr`` default 0.5, ``momentum``, ``weight_decay``), "adam" (``lr`` default
                    1e-3, ``weight_decay``), or an Optimizer object for ``net`` (its own hyperparameters)
    lr_schedule     "constant", "step" (× ``lr_gamma`` every ``lr_step_epochs`` epochs) or "cosine"
    validation_data (X_val, y_val), or a DeviceDataset, evaluated every ``eval_every`` iterations
                    (default: once per epoch) and at the end
    seed            fixes every epoch's order (the network's initial θ comes from its own seed)
    engine          "auto" (the fastest that can run this here), a name from engines.REGISTRY, or an
                    Engine made for this network, optimizer and training data
    progress        tqdm bars on stderr (default: when stderr is a terminal)
    callbacks       Callback objects; ``on_eval`` a function called with each evaluation's record
    divergence_factor  stop with DivergenceError when the median mini-batch cost of the last
                    DIVERGENCE_WINDOW iterations exceeds this times the initial network's cost
                    (None: only a non-finite cost stops the run)
    comm            communicator for data-parallel training (default: MPI when launched by mpiexec)

    Raises ValueError for impossible arguments or bad data (naming the first bad row), and
    DivergenceError when the cost explodes or stops being finite.
    """
    epochs = _whole("epochs", epochs)
    batch_size = _whole("batch_size", batch_size)
    if divergence_factor is not None and not (math.isfinite(divergence_factor) and divergence_factor > 1):
        raise ValueError(f"divergence_factor must be a finite number > 1, or None; got {divergence_factor!r}")
    train = X if isinstance(X, DeviceDataset) else DeviceDataset(net, X, y, input_scale)
    if isinstance(X, DeviceDataset) and y is not None:
        raise ValueError("pass y inside the DeviceDataset, not beside it")
    val = validation_data
    if val is not None and not isinstance(val, DeviceDataset):
        if not (isinstance(val, (tuple, list)) and len(val) == 2):
            raise ValueError("validation_data must be (X_val, y_val) or a DeviceDataset")
        val = DeviceDataset(net, *val, input_scale=input_scale)
    per_epoch = iterations_per_epoch(train.n, batch_size)
    eval_every = per_epoch if eval_every is None else _whole("eval_every", eval_every)
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(SCHEDULES)}; got {lr_schedule!r}")
    _whole("lr_step_epochs", lr_step_epochs)
    if not (isinstance(lr_gamma, (int, float)) and 0 < lr_gamma <= 1):
        raise ValueError(f"lr_gamma must be in (0, 1]; got {lr_gamma!r}")
    if isinstance(optimizer, Optimizer):
        if optimizer.net is not net:
            raise ValueError("the optimizer was made for another network")
    else:
        hyper = {"lr": lr} if lr is not None else {}
        optimizer = make_optimizer(net, optimizer, momentum=momentum, weight_decay=weight_decay, **hyper)
    schedule = Schedule(
        optimizer.lr,
        lr_schedule,
        total=epochs * per_epoch,
        step_size=lr_step_epochs * per_epoch,
        gamma=lr_gamma,
    )
    comm = comm if comm is not None else get_communicator("auto", net.device)
    if comm.size > 1 and not net.device.is_cuda:
        share_cores(comm)
    if isinstance(engine, Engine):
        made_for = (engine.net, engine.optimizer, engine.data)
        if any(a is not b for a, b in zip(made_for, (net, optimizer, train))):
            raise ValueError("the engine was made for another network, optimizer or training set")
    else:
        engine = make_engine(engine, net, optimizer, train, comm)  # ValueError for an unknown name
    history = History() if history is None else history
    if comm.size > 1:  # every rank starts from rank 0's parameters
        comm.broadcast(net.theta)
        for array in optimizer.slots.values():
            comm.broadcast(array)
    callbacks = list(callbacks)
    if on_eval is not None:
        callbacks.append(_OnEval(on_eval))
    if progress is None:
        progress = _stderr_is_a_terminal()
    if progress and comm.is_root:
        from .progress import ProgressBars

        callbacks.append(ProgressBars(epochs * per_epoch, per_epoch, history.iteration))
    loop = _Loop(net, engine, train, val, schedule, batch_size, eval_every, seed, history, callbacks, comm)
    try:
        loop.run(epochs * per_epoch, divergence_factor)
    finally:
        engine.finish()
        for callback in callbacks:
            callback.close()
    return history


class _OnEval(Callback):
    def __init__(self, function):
        self.function = function

    def on_eval(self, record: dict) -> None:
        self.function(record)


def _stderr_is_a_terminal() -> bool:
    import sys

    return sys.stderr.isatty()


class _Loop:
    """The loop of ``fit`` (plain functions of its state; see the module docstring)."""

    def __init__(
        self, net, engine, train, val, schedule, batch_size, eval_every, seed, history, callbacks, comm
    ):
        self.net, self.engine, self.train, self.val = net, engine, train, val
        self.schedule, self.nb, self.eval_every, self.seed = schedule, batch_size, eval_every, seed
        self.history, self.callbacks, self.comm = history, callbacks, comm
        self.per_epoch = iterations_per_epoch(train.n, batch_size)
        exact = any(_per_iteration(callback) for callback in callbacks)
        if comm.size > 1:  # every rank stops at the same iterations, whatever its own callbacks
            exact = not comm.all_agree(not exact)
        self.stretch = 1 if exact else engine.max_steps  # the most iterations per engine.run
        capacity = eval_every + engine.max_steps
        self.costs = net.xp.zeros(capacity, dtype=numpy.float64)  # since the last fetch, on the device
        self.errors = net.xp.zeros(capacity, dtype=numpy.float64)
        self.sizes: list[int] = []

    def run(self, total: int, divergence_factor) -> None:
        h, engine, nb = self.history, self.engine, self.nb
        if h.start_cost is None:
            h.start_cost = self._start_cost()
        t = h.iteration
        last_eval = h.records[-1]["iteration"] if h.records else 0
        started = time.perf_counter()
        while t < total:
            epoch, i = divmod(t, self.per_epoch)
            order = self.train.order(self.seed, epoch, nb)
            while i < self.per_epoch:
                span = min(self.stretch, self.eval_every - t % self.eval_every, self.per_epoch - i)
                costs, errors = engine.run(order, i, span, nb, [self.schedule(t + k) for k in range(span)])
                self._add(costs, errors, [min(nb, self.train.n - (i + k) * nb) for k in range(span)])
                for _ in range(span):
                    t += 1
                    for callback in self.callbacks:
                        callback.on_step(t)
                i += span
                evaluate = t % self.eval_every == 0 or t == total
                stop = self._stop_requested()
                if evaluate or stop:
                    started = self._pause(t, started, divergence_factor)
                    if evaluate:
                        self._evaluate(t, last_eval)
                        last_eval = t
                    if stop:
                        self._checkpoint()
                        return
            started = self._pause(t, started, divergence_factor)
            self._checkpoint()

    def _stop_requested(self) -> bool:
        stop = any(callback.should_stop() for callback in self.callbacks)
        return stop if self.comm.size == 1 else not self.comm.all_agree(not stop)  # all ranks stop together

    def _start_cost(self) -> float:
        """The initial network's mean cost on the first START_SAMPLE rows of epoch 0's order."""
        net = self.net
        rows = self.train.order(self.seed, 0)[:START_SAMPLE]
        X, y = self.train.batch(rows)
        J, _ = LOSSES[net.task](
            net.forward(X, Workspace(net, rows.shape[0], forward_only=True)), y, grad=False
        )
        return float(J)

    def _add(self, costs, errors, sizes: list[int]) -> None:
        k, count = len(self.sizes), len(sizes)
        self.costs[k : k + count] = costs
        self.errors[k : k + count] = errors
        self.sizes.extend(sizes)

    def _pause(self, t: int, started: float, divergence_factor) -> float:
        """Wait for the device, stop the clock, move the recorded iterations into the history and
        check them for divergence; returns the new start time."""
        h = self.history
        self.net.device.synchronize()
        h.train_time += time.perf_counter() - started
        k = len(self.sizes)
        if k:
            loss = to_numpy(self.costs[:k])
            rate = to_numpy(self.errors[:k]) / numpy.asarray(self.sizes)
            self.sizes.clear()
            first = len(h.batch_loss)
            h.batch_loss.extend(loss.tolist())
            h.batch_error.extend(rate.tolist())
            _check_divergence(h, first, divergence_factor, self.schedule)
        h.iteration = t
        return time.perf_counter()

    def _evaluate(self, t: int, last_eval: int) -> None:
        h = self.history
        val_loss = val_error = None
        if self.val is not None:
            val_loss, val_error = self.engine.evaluate(self.val)
        since = slice(last_eval, t)
        train_error = None if self.net.task == "regression" else float(numpy.mean(h.batch_error[since]))
        record = {
            "iteration": t,
            "epoch": round(t / self.per_epoch, 4),
            "train_loss": float(numpy.mean(h.batch_loss[since])),
            "train_error": train_error,
            "val_loss": val_loss,
            "val_error": val_error,
            "lr": self.schedule(t - 1),
            "time_s": round(h.train_time, 4),
        }
        h.records.append(record)
        for callback in self.callbacks:
            callback.on_eval(record)

    def _checkpoint(self) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(self.history)


def _per_iteration(callback: Callback) -> bool:
    """Whether ``callback`` needs stretches of one iteration (see Callback)."""
    hooks = ("on_step", "should_stop")
    overrides = any(getattr(type(callback), hook, None) is not getattr(Callback, hook) for hook in hooks)
    return overrides and getattr(callback, "per_iteration", True)


def _check_divergence(h: History, first: int, factor, schedule) -> None:
    """DivergenceError at the first non-finite cost from index ``first`` on, or (with a factor) when
    the median of the last DIVERGENCE_WINDOW costs exceeds factor × the starting cost."""
    loss = numpy.asarray(h.batch_loss[first:])
    bad = numpy.flatnonzero(~numpy.isfinite(loss))
    if bad.size:
        t = first + int(bad[0])
        raise DivergenceError(
            f"training diverged: the mini-batch cost at iteration {t + 1} is {loss[bad[0]]} "
            f"with learning rate {schedule(t):g}; try a smaller learning rate"
        )
    if factor is None or len(h.batch_loss) < DIVERGENCE_WINDOW or not h.start_cost:
        return
    recent = float(numpy.median(h.batch_loss[-DIVERGENCE_WINDOW:]))
    if recent > factor * h.start_cost:
        t = len(h.batch_loss)
        raise DivergenceError(
            f"training diverged: the median mini-batch cost of iterations {t - DIVERGENCE_WINDOW + 1}…{t} "
            f"is {recent:.4g}, over {factor:g} × the starting cost {h.start_cost:.4g}, with learning "
            f"rate {schedule(t - 1):g}; try a smaller learning rate (or turn this check off)"
        )


# --- the recipe of a command-line run ------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """The recipe of a run of the command-line trainer; defaults are the lecture's Example 6.2 with
    U = 200 ReLU hidden units. Everything here is recorded in the checkpoint and config.json."""

    hidden: list[int] = dataclasses.field(default_factory=lambda: [200])
    activation: str = "relu"
    epochs: int = 15
    batch_size: int = 100
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_step_epochs: int = 5
    lr_gamma: float = 0.1
    eval_every: int = 100
    seed: int = 0
    dtype: str = "float32"
    num_classes: int = 10

    LIMITS: ClassVar[dict] = {  # whole-number fields: (lowest, highest) a run can use
        "epochs": (1, 1_000_000),
        "batch_size": (1, 1 << 24),
        "eval_every": (1, 1 << 40),
        "lr_step_epochs": (1, 1_000_000),
        "num_classes": (2, 1 << 20),
        "seed": (0, (1 << 63) - 1),
    }
    MAX_WIDTH: ClassVar[int] = 1 << 20  # a hidden layer wider than this is a typo, not a network

    def check(self) -> Config:
        """Raise ValueError naming the first field with an impossible value; return self."""
        for name, (low, high) in self.LIMITS.items():
            _whole(name, getattr(self, name), low, high)
        if not isinstance(self.hidden, list) or any(
            isinstance(u, bool) or not isinstance(u, int) or not 1 <= u <= self.MAX_WIDTH for u in self.hidden
        ):
            raise ValueError(f"hidden widths must be whole numbers in 1…{self.MAX_WIDTH}; got {self.hidden}")
        for name, value, allowed in (
            ("activation", self.activation, [a for a in ACTIVATIONS if a != "identity"]),
            ("optimizer", self.optimizer, list(OPTIMIZERS)),
            ("lr_schedule", self.lr_schedule, SCHEDULES),
            ("dtype", self.dtype, DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}; got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "lr_gamma"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"{name} must be a number; got {getattr(self, name)!r}")
        if self.optimizer != "sgd" and self.momentum:
            raise ValueError(f"momentum must be 0 with optimizer {self.optimizer!r} (an SGD option)")
        checks = (
            ("lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay, 0 <= self.weight_decay < math.inf, "finite, >= 0"),
            ("lr_gamma", self.lr_gamma, 0 < self.lr_gamma <= 1, "in (0, 1]"),
        )
        for name, value, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}; got {value!r}")
        return self

    def sizes(self, inputs: int) -> list[int]:
        return [inputs, *self.hidden, self.num_classes]

    def network(self, inputs: int, device) -> MLP:
        """The network of this recipe for ``inputs`` input variables, initialised from the seed."""
        return MLP(self.sizes(inputs), self.activation, "classification", device, self.seed, self.dtype)

    def make_optimizer(self, net: MLP) -> Optimizer:
        return make_optimizer(
            net, self.optimizer, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def fit_options(self) -> dict:
        """The keyword arguments of ``fit`` this recipe sets."""
        names = ("epochs", "batch_size", "lr_schedule", "lr_step_epochs", "lr_gamma", "eval_every", "seed")
        return {name: getattr(self, name) for name in names}

    def train(self, train, val, device, **options) -> tuple[MLP, History]:
        """(network, History) of this recipe trained from its seed on ``train`` and evaluated on ``val``
        (data.Split of MNIST-layout images, the pixels scaled to [0, 1]); ``options`` go to ``fit``."""
        from .data import PIXEL_SCALE

        net = self.network(train.X.shape[1], device)
        history = fit(
            net,
            train.X,
            train.y,
            optimizer=self.make_optimizer(net),
            validation_data=(val.X, val.y),
            input_scale=PIXEL_SCALE,
            **{"progress": False, **self.fit_options(), **options},
        )
        return net, history

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """The recipe in ``d`` (a checkpoint's record), checked; ValueError for anything else."""
        if not isinstance(d, dict):
            raise ValueError(f"the recipe must be a JSON object; got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}")
        return cls(**d).check()
