"""Mini-batch SGD on a device-resident dataset (Example 6.2), as plain functions.

    cfg = Config(hidden=[200])                       # the lecture's recipe: γ = 0.5, n_b = 100, 15 epochs
    net, opt = build(cfg, train_set, device)
    state = TrainState()
    fit(net, opt, cfg, train_set, val_set, state, on_eval=print)

Every iteration records the mini-batch cost and misclassification rate on the device (the blue curves
of Figures 6.7/6.8); they are fetched only at evaluation points and checkpoints, so the step itself
never waits for the device. Every ``eval_every`` iterations and at the end the whole validation set is
evaluated (the red curves). Checkpoints are written atomically and hold everything needed to continue
the run bit for bit: parameters, optimizer state, iteration, per-iteration history and the config
(whose seed fixes every epoch's data order, see ``data.epoch_order``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy

from .backend import Device, to_numpy
from .data import DeviceDataset
from .errors import CheckpointError, DivergenceError, EngineFallbackWarning
from .layers import ACTIVATIONS
from .losses import LOSSES, count_errors
from .model import DTYPES, MLP, Workspace, backprop
from .optim import SCHEDULES, SGD, Schedule

CHECKPOINT_FORMAT = "gpunn-checkpoint-1"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
EVAL_CHUNK = 1000


@dataclasses.dataclass
class Config:
    """The recipe of a run; defaults are the lecture's Example 6.2 with U = 200 ReLU hidden units."""

    hidden: list[int] = dataclasses.field(default_factory=lambda: [200])
    activation: str = "relu"
    epochs: int = 15
    batch_size: int = 100
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

    def check(self) -> Config:
        """Raise ValueError naming the first field with an impossible value; return self."""
        positive = ("epochs", "batch_size", "eval_every", "lr_step_epochs", "num_classes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1; got {value!r}")
        if any(not isinstance(u, int) or u < 1 for u in self.hidden):
            raise ValueError(f"hidden widths must be whole numbers >= 1; got {self.hidden}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {self.num_classes}")
        checks = (
            ("lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay, 0 <= self.weight_decay < math.inf, "finite, >= 0"),
            ("lr_gamma", self.lr_gamma, 0 < self.lr_gamma <= 1, "in (0, 1]"),
        )
        for name, value, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}; got {value!r}")
        for name, value, allowed in (
            ("activation", self.activation, [a for a in ACTIVATIONS if a != "identity"]),
            ("lr_schedule", self.lr_schedule, SCHEDULES),
            ("dtype", self.dtype, DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}; got {value!r}")
        return self

    def sizes(self, inputs: int) -> list[int]:
        return [inputs, *self.hidden, self.num_classes]

    def schedule(self, iterations_per_epoch: int) -> Schedule:
        return Schedule(
            self.lr,
            self.lr_schedule,
            total=self.epochs * iterations_per_epoch,
            step_size=self.lr_step_epochs * iterations_per_epoch,
            gamma=self.lr_gamma,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d).check()


def iterations_per_epoch(n: int, batch_size: int) -> int:
    """⌈n / n_b⌉: the last, partial mini-batch of an epoch is kept."""
    return -(-n // batch_size)


def build(cfg: Config, inputs: int, device: Device) -> tuple[MLP, SGD]:
    """The network and optimizer of ``cfg`` for ``inputs`` input variables, initialised from the seed."""
    net = MLP(cfg.sizes(inputs), cfg.activation, "classification", device, cfg.seed, cfg.dtype)
    return net, SGD(net, cfg.lr, cfg.momentum, cfg.weight_decay)


# --- the step and the evaluation -----------------------------------------------------------------


class TrainStep:
    """One SGD iteration on rows of a DeviceDataset: gather, Algorithm 6.1, update; nothing allocated.
    The xp engine, on any device, and the reference the fast engines are checked against.

    Returns the mini-batch cost J and its number of misclassified rows as device scalars. One
    Workspace per mini-batch size (the full one, and the last partial batch if any), sharing one
    gradient vector.
    """

    def __init__(self, net: MLP, opt: SGD, data: DeviceDataset):
        self.net, self.opt, self.data = net, opt, data
        self.grad = net.xp.empty_like(net.theta)
        self.workspaces: dict[int, Workspace] = {}

    def workspace(self, n: int) -> Workspace:
        if n not in self.workspaces:
            self.workspaces[n] = Workspace(self.net, n, grad=self.grad)
        return self.workspaces[n]

    def __call__(self, rows, lr):
        ws = self.workspace(rows.shape[0])
        X, y = self.data.batch(rows, ws.X, ws.y, ws.staging)
        net, opt = self.net, self.opt
        if opt.momentum or opt.weight_decay:
            J, _ = backprop(net, X, y, ws)
            opt.step(ws.grad, lr)
        else:  # plain SGD (6.23): backprop yields γ∇J directly, and the update is one subtraction
            J, _ = backprop(net, X, y, ws, scale=lr)
            net.theta -= ws.grad
        return J, count_errors(ws.Z[-1], y, net.task)


ENGINES = ("auto", "xp", "blas", "fused", "graph")


def make_step(net: MLP, opt: SGD, data: DeviceDataset, engine: str = "auto"):
    """The training step of ``engine``:

    "xp"     TrainStep: the shared NumPy/CuPy code, any device, any network (the reference)
    "blas"   blas_step.BlasStep: the CPU engine, prepared BLAS calls (classification, plain SGD)
    "fused"  fused.FusedStep: CUDA kernels (classification)
    "graph"  fused.FusedStep with CUDA graphs: blocks of steps replayed as one launch (classification)
    "auto"   "blas" where it can run, else "xp" (so "xp" on CUDA: see fused.py's status note)

    An explicitly asked-for engine that cannot run this network here falls back to "xp" with an
    EngineFallbackWarning naming the reason ("graph" whose capture fails: to "fused"); "auto" falls
    back silently.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {list(ENGINES)}")
    if engine in ("auto", "blas"):
        from .blas_step import BlasStep, support

        reason = support(net, opt)
        if reason is None:
            return BlasStep(net, opt, data)
    elif engine in ("fused", "graph"):
        from .fused import FusedStep, fused_support

        reason = fused_support(net) if net.device.is_cuda else "the fused kernels need a CUDA device"
        if reason is None:
            try:
                return FusedStep(net, opt, data, graphs=engine == "graph")
            except Exception as exc:  # NVRTC or CuPy refusing the kernels: train with the reference
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                reason = f"the fused kernels cannot run here ({first_line})"
    if engine not in ("auto", "xp"):
        warnings.warn(f"{reason}; training with the xp engine", EngineFallbackWarning, stacklevel=2)
    return TrainStep(net, opt, data)


def evaluate(net: MLP, data: DeviceDataset, workspaces: dict | None = None) -> tuple[float, float]:
    """(mean cost, misclassification rate) of ``net`` on the whole of ``data``, in chunks of
    EVAL_CHUNK rows; one synchronisation at the end. ``workspaces`` caches buffers between calls."""
    xp = net.xp
    workspaces = {} if workspaces is None else workspaces
    total_cost, total_errors = xp.zeros((), dtype=numpy.float64), xp.zeros((), dtype=numpy.int64)
    for start in range(0, data.n, EVAL_CHUNK):
        rows = slice(start, min(data.n, start + EVAL_CHUNK))
        m = rows.stop - rows.start
        ws = workspaces.get(m) or workspaces.setdefault(m, Workspace(net, m, forward_only=True))
        X, y = data.batch(rows, ws.X, ws.y)
        Z = net.forward(X, ws)
        J, _ = LOSSES[net.task](Z, y, ws.dZL, ws.rows, grad=False)
        total_cost += J * m
        total_errors += count_errors(Z, y, net.task)
    return float(total_cost) / data.n, float(total_errors) / data.n


# --- the run's state and the loop ----------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """Where a run stands: iterations done, training seconds, and per-iteration mini-batch history."""

    iteration: int = 0
    train_time: float = 0.0
    batch_loss: list = dataclasses.field(default_factory=list)
    batch_error: list = dataclasses.field(default_factory=list)


class _Recorder:
    """Per-iteration (J, errors) kept on the device until ``flush`` moves them to the TrainState."""

    def __init__(self, xp, capacity: int):
        self.loss = xp.zeros(capacity, dtype=numpy.float64)
        self.errors = xp.zeros(capacity, dtype=numpy.float64)
        self.sizes: list[int] = []

    def add(self, J, errors, n: int) -> None:
        k = len(self.sizes)
        self.loss[k] = J
        self.errors[k] = errors
        self.sizes.append(n)

    def add_block(self, costs, errors, n: int) -> None:
        """Several iterations of n rows each at once: (count,) device arrays of J and errors."""
        k, count = len(self.sizes), costs.shape[0]
        self.loss[k : k + count] = costs
        self.errors[k : k + count] = errors
        self.sizes.extend([n] * count)

    def flush(self, state: TrainState, schedule: Schedule) -> None:
        """Append the recorded iterations to ``state``; raise DivergenceError at a non-finite cost."""
        k = len(self.sizes)
        if not k:
            return
        loss = to_numpy(self.loss[:k])
        rate = to_numpy(self.errors[:k]) / numpy.asarray(self.sizes)
        first = len(state.batch_loss)
        bad = numpy.flatnonzero(~numpy.isfinite(loss))
        if bad.size:
            t = first + int(bad[0])
            raise DivergenceError(
                f"training diverged: the mini-batch cost at iteration {t + 1} is {loss[bad[0]]} "
                f"with learning rate {schedule(t):g}; try a smaller learning rate"
            )
        state.batch_loss.extend(loss.tolist())
        state.batch_error.extend(rate.tolist())
        self.sizes.clear()


@numpy.errstate(over="ignore", invalid="ignore", divide="ignore")  # divergence is reported, not warned
def fit(
    net: MLP,
    opt: SGD,
    cfg: Config,
    train_set: DeviceDataset,
    val_set: DeviceDataset,
    state: TrainState,
    on_eval: Callable[[dict], None] = lambda record: None,
    on_checkpoint: Callable[[TrainState], None] = lambda state: None,
    on_step: Callable[[int], None] = lambda t: None,
    should_stop: Callable[[], bool] = lambda: False,
    step: Callable | None = None,
) -> bool:
    """Train from ``state.iteration`` to cfg.epochs epochs. Returns True when finished, False when
    ``should_stop()`` turned true (checked after every step, or every block of steps for the graph
    engine; a checkpoint is then taken). ``step`` defaults to make_step(net, opt, train_set).

    ``on_eval(record)`` receives each evaluation: iteration, epoch, train_loss/train_error (mini-batch
    means since the previous evaluation), val_loss, val_error, lr and time_s (training seconds so far,
    evaluation excluded). ``on_checkpoint(state)`` runs at every epoch end and when stopping.
    """
    device, nb = net.device, cfg.batch_size
    per_epoch = iterations_per_epoch(train_set.n, nb)
    total = cfg.epochs * per_epoch
    schedule = cfg.schedule(per_epoch)
    step = step or make_step(net, opt, train_set)
    recorder = _Recorder(net.xp, cfg.eval_every)
    eval_workspaces: dict = {}
    t, last_eval = state.iteration, state.iteration - state.iteration % cfg.eval_every

    def pause():  # the device catches up, and the clock stops
        device.synchronize()
        state.train_time += time.perf_counter() - started
        recorder.flush(state, schedule)
        state.iteration = t

    full_batches = train_set.n // nb
    started = time.perf_counter()
    while t < total:
        epoch, i = divmod(t, per_epoch)
        order = train_set.order(cfg.seed, epoch, nb)
        while i < per_epoch:
            block = getattr(step, "block_steps", 0)  # the graph engine takes up to this many steps a call
            span = min(block, cfg.eval_every - t % cfg.eval_every, full_batches - i)
            if span > 0:  # full mini-batches up to the next evaluation or the epoch's end, in one call
                costs, errors = step.run_block(order, i, span, nb, [schedule(t + k) for k in range(span)])
                recorder.add_block(costs, errors, nb)
            else:
                rows = order[i * nb : (i + 1) * nb]
                J, errors = step(rows, schedule(t))
                recorder.add(J, errors, rows.shape[0])
                span = 1
            for _ in range(span):
                t += 1
                on_step(t)
            i += span
            if t % cfg.eval_every == 0 or t == total:
                pause()
                if hasattr(step, "evaluate"):  # the engine's own forward pass
                    val_loss, val_error = step.evaluate(val_set, EVAL_CHUNK)
                else:
                    val_loss, val_error = evaluate(net, val_set, eval_workspaces)
                on_eval(_record(state, last_eval, t, per_epoch, val_loss, val_error, schedule(t - 1)))
                last_eval = t
                started = time.perf_counter()
            if should_stop():
                pause()
                on_checkpoint(state)
                return t >= total
        pause()
        on_checkpoint(state)
        started = time.perf_counter()
    return True


def _record(state, last_eval, t, per_epoch, val_loss, val_error, lr) -> dict:
    since = slice(last_eval, t)
    return {
        "iteration": t,
        "epoch": round(t / per_epoch, 4),
        "train_loss": float(numpy.mean(state.batch_loss[since])),
        "train_error": float(numpy.mean(state.batch_error[since])),
        "val_loss": val_loss,
        "val_error": val_error,
        "lr": lr,
        "time_s": round(state.train_time, 4),
    }


# --- checkpoints ---------------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results private to the user
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, net: MLP, opt: SGD, cfg: Config, state: TrainState) -> None:
    meta = {
        "format": CHECKPOINT_FORMAT,
        "iteration": state.iteration,
        "train_time": state.train_time,
        "sizes": net.sizes,
        "config": cfg.to_dict(),
    }
    arrays = dict(net.state())
    arrays.update({k: to_numpy(v) for k, v in opt.state().items()})
    arrays["batch_loss"] = numpy.asarray(state.batch_loss, dtype=numpy.float64)
    arrays["batch_error"] = numpy.asarray(state.batch_error, dtype=numpy.float64)
    arrays["meta"] = numpy.asarray(json.dumps(meta))
    write_atomic(path, lambda f: numpy.savez(f, **arrays))


def load_checkpoint(path: Path) -> tuple[Config, dict, TrainState]:
    """(config, arrays, state) of a checkpoint; CheckpointError if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with path.open("rb") as f, numpy.load(f, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        cfg = Config.from_dict(meta["config"])
        iteration = int(meta["iteration"])
        state = TrainState(
            iteration,
            float(meta["train_time"]),
            arrays.pop("batch_loss").tolist(),
            arrays.pop("batch_error").tolist(),
        )
        if len(state.batch_loss) != iteration or len(state.batch_error) != iteration:
            raise ValueError(f"history holds {len(state.batch_loss)} iterations, not {iteration}")
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is damaged or not a gpunn checkpoint ({exc})") from None
    return cfg, arrays, state


def restore(net: MLP, opt: SGD, arrays: dict, path: Path) -> None:
    """Load a checkpoint's arrays into ``net`` and ``opt``, naming what does not fit."""
    try:
        net.load_state(arrays)
        opt.load_state(arrays)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit this network: {exc}") from None
