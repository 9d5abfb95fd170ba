"""Saved models and checkpoints: .npz files of plain arrays plus a JSON description, never a pickle.

    net.save("model.npz"); net = gpunn.load("model.npz", device="cpu")    # a model
    save_checkpoint(path, net, optimizer, history, config, run)            # a run, to continue it
    ckpt = load_checkpoint(path); net = ckpt.network(device)

Format (``numpy.savez``, one array per member): W1, b1, …, WL, bL in the book's shapes, and ``meta``, a
0-d string holding JSON: {"format": "gpunn-model-1", "gpunn": version, "model": {"sizes", "activation",
"task", "dtype", "seed"}}. A checkpoint ("gpunn-checkpoint-2") adds the optimizer's state arrays
(``velocity``, or ``adam_m``, ``adam_v``, ``adam_t``), the per-iteration ``batch_loss`` and
``batch_error``, and in ``meta`` the optimizer's description, the history (iteration, training time,
evaluation records, starting cost), the command-line recipe ``config`` and the ``run`` (data set, data
folder, device, input scale). ``gpunn.load`` opens either kind.

Reading trusts nothing: the container is read by ``files.read_npz`` and every field of ``meta`` is
checked for its type and range; any damage is one CheckpointError naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy

from . import __version__ as VERSION
from .backend import to_numpy
from .errors import CheckpointError
from .files import display_path, read_npz, write_atomic
from .layers import ACTIVATIONS
from .model import DTYPES, MLP, TASKS
from .optim import OPTIMIZERS, Optimizer
from .train import Config, History

MODEL_FORMAT = "gpunn-model-1"
CHECKPOINT_FORMAT = "gpunn-checkpoint-2"
MAX_LAYERS = 1000
MAX_WIDTH = 1 << 24
RECORD_KEYS = ("iteration", "epoch", "train_loss", "train_error", "val_loss", "val_error", "lr", "time_s")


class _Damaged(ValueError):
    """What is wrong inside a file (becomes the CheckpointError's reason)."""


# --- checking the JSON ---------------------------------------------------------------------------


def _field(obj: dict, name: str, where: str):
    if not isinstance(obj, dict):
        raise _Damaged(f"{where} is not a JSON object")
    if name not in obj:
        raise _Damaged(f"{where} lacks {name!r}")
    return obj[name]


def _whole(value, where: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Damaged(f"{where} must be a whole number in {low}…{high}; got {_short(value)}")
    return value


def _real(value, where: str, low: float = -math.inf, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < low
    ):
        raise _Damaged(f"{where} must be a finite number >= {low}; got {_short(value)}")
    return float(value)


def _choice(value, where: str, allowed) -> str:
    if value not in allowed:
        raise _Damaged(f"{where} must be one of {sorted(allowed)}; got {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_description(meta: dict) -> dict:
    m = _field(meta, "model", "meta")
    sizes = _field(m, "sizes", "model")
    if not isinstance(sizes, list) or not 2 <= len(sizes) <= MAX_LAYERS + 1:
        raise _Damaged(f"model sizes must be a list of 2…{MAX_LAYERS + 1} widths; got {_short(sizes)}")
    for u in sizes:
        _whole(u, "every model size", 1, MAX_WIDTH)
    described = {
        "sizes": sizes,
        "activation": _choice(_field(m, "activation", "model"), "model activation", ACTIVATIONS),
        "task": _choice(_field(m, "task", "model"), "model task", TASKS),
        "dtype": _choice(_field(m, "dtype", "model"), "model dtype", DTYPES),
        "seed": _whole(_field(m, "seed", "model"), "model seed"),
    }
    if described["task"] == "binary" and sizes[-1] != 1:
        raise _Damaged("a binary model has one output")
    return described


def _meta(arrays: dict, expected: tuple[str, ...]) -> dict:
    raw = arrays.pop("meta", None)
    if raw is None or raw.shape != () or raw.dtype.kind != "U":
        raise _Damaged("no meta description")
    try:
        meta = json.loads(str(raw))
    except (ValueError, RecursionError) as exc:
        raise _Damaged(f"meta is not JSON: {exc}") from None
    found = _field(meta, "format", "meta")
    if found == "gpunn-checkpoint-1":
        raise _Damaged("written by gpunn 0.1, whose checkpoints this version cannot continue: start anew")
    _choice(found, "meta format", expected)
    return meta


def _parameters(arrays: dict, model: dict) -> dict:
    """W1, b1, … checked against the model's shapes and for finite values."""
    sizes = model["sizes"]
    params = {}
    for l in range(1, len(sizes)):
        for name, shape in ((f"W{l}", (sizes[l], sizes[l - 1])), (f"b{l}", (sizes[l],))):
            a = arrays.pop(name, None)
            if a is None:
                raise _Damaged(f"no {name}")
            if a.shape != shape or a.dtype.kind != "f":
                raise _Damaged(f"{name} is {a.dtype} {a.shape}, the model needs floats {shape}")
            if not numpy.isfinite(a).all():
                raise _Damaged(f"{name} holds values that are not finite")
            params[name] = a
    return params


# --- models --------------------------------------------------------------------------------------


def save_model(path, net: MLP) -> None:
    """Write ``net`` to ``path`` atomically (see the module for the format)."""
    meta = {"format": MODEL_FORMAT, "gpunn": VERSION, "model": net.describe()}
    _write(path, {**net.state(), "meta": numpy.asarray(json.dumps(meta))})


def _write(path, arrays: dict) -> None:
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def load(path, device="cpu") -> MLP:
    """The network saved in ``path`` (by ``MLP.save``, or a command-line checkpoint), ready on
    ``device``. CheckpointError if the file is missing, damaged, or not a gpunn file."""
    return read_saved(path).network(device)


@dataclasses.dataclass
class Saved:
    """A saved network: its description and parameters, and the whole Checkpoint where the file is
    one (else None)."""

    model: dict
    params: dict
    checkpoint: Checkpoint | None

    def network(self, device) -> MLP:
        """The saved network on ``device``, its parameters loaded."""
        net = MLP(device=device, **self.model)
        net.load_state(self.params)
        return net


def read_saved(path) -> Saved:
    """A saved model or a checkpoint, whichever ``path`` holds; CheckpointError naming the file if it
    is missing, damaged or neither."""
    arrays = read_npz(path, what="model")
    try:
        meta = _meta(arrays, (MODEL_FORMAT, CHECKPOINT_FORMAT))
        if meta["format"] == CHECKPOINT_FORMAT:
            ckpt = _checkpoint(path, arrays, meta)
            return Saved(ckpt.model, ckpt.params, ckpt)
        model = _model_description(meta)
        return Saved(model, _parameters(arrays, model), None)
    except _Damaged as exc:
        raise CheckpointError(f"{display_path(path)} is damaged or not a gpunn model ({exc})") from None


# --- checkpoints ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    """A run as ``load_checkpoint`` found it: its network's description and parameters, the
    optimizer's description and state, the History, and (command-line runs) the recipe and the run's
    data and device."""

    path: object
    model: dict
    params: dict
    optimizer: dict
    optimizer_state: dict
    history: History
    config: Config | None
    run: dict

    def network(self, device) -> MLP:
        """The checkpoint's network on ``device``, its parameters loaded."""
        return Saved(self.model, self.params, self).network(device)

    def make_optimizer(self, net: MLP) -> Optimizer:
        """The checkpoint's optimizer for ``net``, its state loaded (CheckpointError where it does not
        fit)."""
        spec = dict(self.optimizer)
        optimizer = OPTIMIZERS[spec.pop("name")](net, **spec)
        try:
            optimizer.load_state(self.optimizer_state)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{display_path(self.path)} is damaged: optimizer state {exc}") from None
        return optimizer


def save_checkpoint(path, net: MLP, optimizer: Optimizer, history: History, config=None, run=None) -> None:
    """Write everything needed to continue the run bit for bit to ``path``, atomically."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "gpunn": VERSION,
        "model": net.describe(),
        "optimizer": optimizer.describe(),
        "history": {
            "iteration": history.iteration,
            "train_time": history.train_time,
            "records": history.records,
            "start_cost": history.start_cost,
        },
        "config": None if config is None else config.to_dict(),
        "run": run or {},
    }
    arrays = dict(net.state())
    arrays.update({name: to_numpy(a) for name, a in optimizer.state().items()})
    arrays["batch_loss"] = numpy.asarray(history.batch_loss, dtype=numpy.float64)
    arrays["batch_error"] = numpy.asarray(history.batch_error, dtype=numpy.float64)
    arrays["meta"] = numpy.asarray(json.dumps(meta))
    _write(path, arrays)


def load_checkpoint(path) -> Checkpoint:
    """The run saved in ``path``; CheckpointError if it is missing, damaged or not a gpunn checkpoint."""
    arrays = read_npz(path, what="checkpoint")
    try:
        return _checkpoint(path, arrays, _meta(arrays, (CHECKPOINT_FORMAT,)))
    except _Damaged as exc:
        raise CheckpointError(f"{display_path(path)} is damaged or not a gpunn checkpoint ({exc})") from None


def _checkpoint(path, arrays: dict, meta: dict) -> Checkpoint:
    model = _model_description(meta)
    params = _parameters(arrays, model)
    spec = _field(meta, "optimizer", "meta")
    name = _choice(_field(spec, "name", "optimizer"), "optimizer name", OPTIMIZERS)
    hyper_type = OPTIMIZERS[name].Hyper
    fields = {f.name for f in dataclasses.fields(hyper_type)}
    if set(spec) - {"name"} != fields:
        raise _Damaged(f"optimizer {name} needs exactly {sorted(fields)}")
    for field in fields:
        _real(spec[field], f"optimizer {field}")
    try:
        hyper_type(**{f: spec[f] for f in fields}).check()
    except ValueError as exc:
        raise _Damaged(f"optimizer: {exc}") from None
    h = _field(meta, "history", "meta")
    iteration = _whole(_field(h, "iteration", "history"), "history iteration")
    history = History(
        iteration=iteration,
        train_time=_real(_field(h, "train_time", "history"), "history train_time", 0.0),
        records=_records(_field(h, "records", "history"), iteration),
        start_cost=_real(_field(h, "start_cost", "history"), "history start_cost", 0.0, optional=True),
    )
    for name in ("batch_loss", "batch_error"):
        a = arrays.pop(name, None)
        if a is None or a.shape != (iteration,) or a.dtype.kind != "f":
            raise _Damaged(f"{name} must hold {iteration} numbers (one per iteration)")
        setattr(history, name, a.astype(numpy.float64).tolist())
    config = _field(meta, "config", "meta")
    if config is not None:
        try:
            config = Config.from_dict(config)
        except (TypeError, ValueError) as exc:
            raise _Damaged(f"config: {exc}") from None
    run = _field(meta, "run", "meta")
    if not isinstance(run, dict) or any(
        not isinstance(v, (str, int, float, type(None))) or isinstance(v, bool) for v in run.values()
    ):
        raise _Damaged("run must be a JSON object of plain values")
    state = {k: arrays.pop(k) for k in list(arrays)}  # what is left: the optimizer's arrays
    return Checkpoint(path, model, params, {"name": name, **spec}, state, history, config, run)


def _records(records, iteration: int) -> list:
    if not isinstance(records, list):
        raise _Damaged("history records must be a list")
    for r in records:
        if not isinstance(r, dict) or set(r) != set(RECORD_KEYS):
            raise _Damaged(f"every history record needs exactly the keys {list(RECORD_KEYS)}")
        _whole(r["iteration"], "a record's iteration", 1, max(iteration, 1))
        for key in RECORD_KEYS[1:]:
            _real(r[key], f"a record's {key}", optional=key in ("train_error", "val_loss", "val_error"))
    return records
