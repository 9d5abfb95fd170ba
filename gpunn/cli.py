"""The command line: ``gpunn train`` (= ``python scripts/train_mnist.py``), ``gpunn eval``, ``gpunn export``.

    gpunn train --dataset mnist --device cuda            # Example 6.2: 784-200-10 ReLU, SGD γ = 0.5
    gpunn train --out runs/a --resume --epochs 30        # continue a run, or extend a finished one
    gpunn eval runs/a                                    # a run folder, a checkpoint or a saved model
    gpunn export runs/a model.onnx                       # the trained network as ONNX

A thin layer over ``gpunn.fit``: it reads an MNIST-layout data set, builds the network of its flags,
and trains with callbacks that write the run folder (metrics.jsonl, curves.png, config.json,
checkpoint.npz). Every problem a user can cause ends in one line on stderr and a non-zero exit status:
2 for bad flags, 1 for the rest, 130 after Ctrl-C (143 after SIGTERM) with a checkpoint to resume
from. Under ``mpiexec -n N`` it trains data-parallel; rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

from . import datasets
from .checkpoint import Checkpoint, load_checkpoint, read_saved, save_checkpoint
from .commands import Parser, UsageError, device_name, plot_history, run_command, with_notices
from .commands import device as cli_device
from .data import PIXEL_SCALE, DeviceDataset, load_idx_dataset, load_split, resolve_data_dir
from .distributed import get_communicator
from .engines import ENGINE_NAMES, make_engine
from .engines.reference import evaluate
from .errors import CheckpointError, DivergenceError, RunFolderError, WriteError
from .files import RunLock, display_path, reason_of, remove_stale_temporaries, write_atomic
from .train import DIVERGENCE_FACTOR, Callback, Config, History, fit, iterations_per_epoch

RECIPE = [f.name for f in dataclasses.fields(Config)]  # the flags that make a run what it is
EXTENDABLE = ("constant", "step")  # schedules whose γ_t does not depend on the total: --epochs may grow
RUN_FILES = ("checkpoint.npz", "config.json", "metrics.jsonl", "curves.png")


def build_train_parser(prog: str, with_defaults: bool = True) -> argparse.ArgumentParser:
    """The training flags; with ``with_defaults=False`` only the flags actually given appear."""
    d = Config()

    def option(*names, default=None, **kwargs):
        kwargs["default"] = default if with_defaults else argparse.SUPPRESS
        p.add_argument(*names, **kwargs)

    p = Parser(
        prog=prog,
        description="Train logistic regression or an MLP on an MNIST-layout data set with mini-batch "
        "SGD or Adam (Lindholm et al., Example 6.2), the data resident on the device.",
    )
    option("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    option(
        "--dataset",
        choices=sorted(datasets.DATASETS),
        help="a named data set, downloaded into ~/.cache/gpunn/NAME on first use (default: mnist)",
    )
    option(
        "--data-dir",
        type=Path,
        help="folder with the four MNIST-layout IDX files (.gz or not), only read; default: "
        "$GPUNN_DATA_DIR for MNIST, else the --dataset download",
    )
    option(
        "--hidden",
        type=int,
        nargs="*",
        metavar="W",
        default=d.hidden,
        help="hidden-layer widths; --hidden alone gives logistic regression (784→10)",
    )
    option(
        "--activation",
        choices=["relu", "sigmoid", "tanh"],
        default=d.activation,
        help="h of the hidden layers",
    )
    option("--epochs", type=int, default=d.epochs, help="passes over the training set")
    option("--batch-size", type=int, default=d.batch_size, help="mini-batch size n_b")
    option("--optimizer", choices=["sgd", "adam"], default=d.optimizer, help="the update rule")
    option("--lr", type=float, help="learning rate γ (default: 0.5 for sgd, 0.001 for adam)")
    option("--momentum", type=float, default=d.momentum, help="SGD momentum μ in [0, 1)")
    option("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay λ, on W only")
    option(
        "--lr-schedule", choices=["constant", "step", "cosine"], default=d.lr_schedule, help="how γ changes"
    )
    option(
        "--lr-step-epochs",
        type=int,
        default=d.lr_step_epochs,
        help="step schedule: multiply γ by --lr-gamma every this many epochs",
    )
    option("--lr-gamma", type=float, default=d.lr_gamma, help="step schedule factor, in (0, 1]")
    option("--eval-every", type=int, default=d.eval_every, help="iterations between evaluations")
    option("--seed", type=int, default=d.seed, help="seeds the initial weights and every epoch's order")
    option("--dtype", choices=["float32", "float64"], default=d.dtype, help="floating-point type")
    option("--num-classes", type=int, default=d.num_classes, help="M; labels must lie in 0…M−1")
    option("--out", type=Path, help="run folder; default: a fresh runs/<dataset>-<date>-<time>")
    option(
        "--resume", action="store_true", default=False, help="continue the run in --out from its checkpoint"
    )
    option(
        "--eval-only",
        type=Path,
        metavar="PATH",
        help="evaluate a run folder, checkpoint or saved model on the validation set, and stop",
    )
    option("--no-progress", action="store_true", default=False, help="plain lines instead of progress bars")
    option(
        "--engine",
        choices=list(ENGINE_NAMES),
        default="auto",
        help="how iterations run: auto (the fastest here), xp (the reference NumPy/CuPy code), blas (CPU), "
        "fused or graph (CUDA kernels, the latter replayed as CUDA graphs)",
    )
    option(
        "--divergence-factor",
        type=float,
        default=DIVERGENCE_FACTOR,
        help="stop when the median mini-batch cost of 20 iterations exceeds this × the starting cost",
    )
    option(
        "--no-divergence-check",
        action="store_true",
        default=False,
        help="train on however high the cost climbs (a non-finite cost still stops)",
    )
    option("--export-onnx", type=Path, metavar="FILE", help="also write the trained network as ONNX")
    return p


# --- entry points --------------------------------------------------------------------------------


def train_main(argv: list[str] | None = None, prog: str = "train_mnist.py") -> int:
    """``scripts/train_mnist.py`` (and ``gpunn train``)."""
    return run_command(
        prog, lambda a: _parse_train(prog, a), lambda parsed: _train_or_eval(prog, parsed), argv
    )


def main(argv: list[str] | None = None) -> int:
    """The console command ``gpunn``: train, eval, export."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "eval": eval_main, "export": export_main}
    if argv and argv[0] in commands:
        command = argv[0]
        return commands[command](argv[1:], prog=f"gpunn {command}")
    usage = (
        "usage: gpunn {train,eval,export} ...\n\n"
        "  train    train a network on an MNIST-layout data set (gpunn train --help)\n"
        "  eval     evaluate a run folder, checkpoint or saved model on the validation set\n"
        "  export   write a run's or a saved model's network as ONNX\n"
    )
    if argv and argv[0] in ("-h", "--help"):
        print(usage, end="")
        return 0
    given = f"unknown command {argv[0]!r}" if argv else "a command is needed"
    print(f"gpunn: error: {given}; use train, eval or export (see gpunn --help)", file=sys.stderr)
    return 2


def eval_main(argv: list[str] | None = None, prog: str = "gpunn eval") -> int:
    p = Parser(
        prog=prog, description="Evaluate a run folder, checkpoint or saved model on the validation set."
    )
    p.add_argument("path", type=Path, help="run folder, checkpoint.npz, or a model saved by gpunn")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dataset", choices=sorted(datasets.DATASETS), help="default: the run's, else mnist")
    p.add_argument("--data-dir", type=Path, help="default: the run's folder, else as gpunn train")
    p.add_argument("--no-progress", action="store_true", help="no download progress bar")
    return run_command(prog, p.parse_args, lambda args: _evaluate(prog, args), argv)


def export_main(argv: list[str] | None = None, prog: str = "gpunn export") -> int:
    p = Parser(prog=prog, description="Write the network of a run folder, checkpoint or saved model as ONNX.")
    p.add_argument("path", type=Path, help="run folder, checkpoint.npz, or a model saved by gpunn")
    p.add_argument("onnx", type=Path, help="the ONNX file to write")
    return run_command(prog, p.parse_args, lambda args: _export(prog, args), argv)


# --- training ------------------------------------------------------------------------------------


def _parse_train(prog: str, argv: list[str]):
    """The flags, and which of them were given explicitly (so --resume and --eval-only can refuse)."""
    return build_train_parser(prog).parse_args(argv), vars(build_train_parser(prog, False).parse_args(argv))


def config_from_flags(**values) -> Config:
    """Config(**values), checked; an impossible value is a UsageError naming its flag."""
    if values.get("lr") is None:
        values["lr"] = 1e-3 if values.get("optimizer") == "adam" else 0.5
    try:
        return Config(**values).check()
    except ValueError as exc:  # "batch_size must be …" -> "--batch-size must be …"
        field, _, rest = str(exc).partition(" ")
        raise UsageError(f"{_flag(field)} {rest}") from None


def _train_or_eval(prog: str, parsed) -> int:
    args, explicit = parsed
    if args.eval_only is not None:
        ignored = sorted(set(explicit) - {"eval_only", "device", "dataset", "data_dir", "no_progress"})
        if ignored:
            flags = ", ".join(map(_flag, ignored))
            raise UsageError(f"--eval-only evaluates the saved network as it is; drop {flags}")
        return _evaluate(prog, argparse.Namespace(**vars(args), path=args.eval_only))
    return _Run(prog, args, explicit).execute()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Run:
    """One invocation of the trainer: flags checked, data and network ready, and only then the run
    folder claimed, locked and written (nothing is created before the inputs are known good)."""

    def __init__(self, prog: str, args, explicit: dict):
        self.prog, self.args, self.explicit = prog, args, explicit
        if args.divergence_factor is not None and not (
            math.isfinite(args.divergence_factor) and args.divergence_factor > 1
        ):
            raise UsageError(f"--divergence-factor must be a finite number > 1; got {args.divergence_factor}")
        if args.resume and args.out is None:
            raise UsageError("--resume needs --out DIR, the run to continue")
        if args.export_onnx is not None:
            _need_onnx()

    def execute(self) -> int:
        self.comm = get_communicator("auto")
        with self.comm.guard():
            self._prepare()
        if self.comm.is_root:
            self.lock = RunLock(self.out)
        with self.comm.guard():
            if self.comm.is_root:
                self._claim()
        try:
            return self._train()
        finally:
            if self.comm.is_root:
                self.lock.release()

    def _prepare(self) -> None:
        """Everything that can fail before the run folder exists: recipe, device, data, network."""
        args, explicit = self.args, self.explicit
        self.checkpoint: Checkpoint | None = None
        if args.resume:
            self.checkpoint = load_checkpoint(args.out / "checkpoint.npz")
            cfg, run = self.checkpoint.config, self.checkpoint.run
            if cfg is None:
                raise CheckpointError(
                    f"{display_path(args.out)} holds a library checkpoint, not a run of this command"
                )
            self.cfg = self._resumed_config(cfg)
            dataset = args.dataset if "dataset" in explicit else run.get("dataset")
            data_dir = args.data_dir if "data_dir" in explicit else run.get("data_dir")
            device_spec = args.device if "device" in explicit else run.get("device") or "auto"
        else:
            values = {name: getattr(args, name) for name in RECIPE}
            self.cfg = config_from_flags(**values)
            dataset, data_dir, device_spec = args.dataset, args.data_dir, args.device
        if data_dir is None and dataset is None:
            dataset = "mnist"
        self.dataset = (
            dataset if (dataset is not None and (data_dir is None or "dataset" in explicit)) else None
        )
        self.device = cli_device(self.prog, _local_device(device_spec, self.comm))
        folder = resolve_data_dir(data_dir, dataset, progress=not args.no_progress and self.comm.is_root)
        self.data_dir = folder.resolve()
        train, val = load_idx_dataset(folder, self.cfg.num_classes)
        self.title = datasets.get(self.dataset).title if self.dataset else f"IDX data in {folder.name}"
        self.net = self.cfg.network(train.X.shape[1], self.device)
        if self.checkpoint is None:
            self.optimizer, self.history = self.cfg.make_optimizer(self.net), History()
        else:
            try:
                self.net.load_state(self.checkpoint.params)
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"the checkpoint does not fit this data: {exc}") from None
            self.optimizer, self.history = self.checkpoint.make_optimizer(self.net), self.checkpoint.history
        self.train_set = DeviceDataset(self.net, train.X, train.y, PIXEL_SCALE)
        self.val_set = DeviceDataset(self.net, val.X, val.y, PIXEL_SCALE)
        self.out = args.out or _fresh_run_dir(self.dataset or "idx")

    def _resumed_config(self, cfg: Config) -> Config:
        """The run's recipe; --epochs may extend it (where the schedule allows), any other change is
        refused."""
        args, explicit = self.args, self.explicit
        changed = [
            f"{_flag(k)} {explicit[k]} (the run has {getattr(cfg, k)})"
            for k in RECIPE
            if k in explicit and k != "epochs" and explicit[k] != getattr(cfg, k)
        ]
        if changed:
            raise UsageError(f"--resume continues the run as configured; drop {', '.join(changed)}")
        if "epochs" in explicit and args.epochs != cfg.epochs:
            if args.epochs < cfg.epochs:
                raise UsageError(f"--epochs {args.epochs} is fewer than the run's {cfg.epochs}")
            if cfg.lr_schedule not in EXTENDABLE:
                raise UsageError(
                    f"a run with the {cfg.lr_schedule} schedule cannot get more epochs: γ_t depends on the "
                    "total; start a new run instead"
                )
            cfg = Config(**{**cfg.to_dict(), "epochs": args.epochs}).check()
        return cfg

    def _claim(self) -> None:
        """Create and lock the run folder; refuse one that holds another run unless resuming it."""
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create --out {display_path(out)}: {exc.strerror or exc}") from None
        self.lock.acquire()
        try:
            remove_stale_temporaries(out)
            if not self.args.resume and (out / "checkpoint.npz").exists():
                raise RunFolderError(
                    f"{display_path(out)} already holds a run's checkpoint; continue it with --resume "
                    "or choose another --out"
                )
            self.config_json = self._config_record()
            write_atomic(out / "config.json", lambda f: f.write(self.config_json))
        except BaseException:
            self.lock.release()
            raise

    def _config_record(self) -> bytes:
        record = {
            **self.cfg.to_dict(),
            "dataset": self.dataset,
            "title": self.title,
            "data_dir": str(self.data_dir),
            "device": self.device.description(),
            "ranks": self.comm.size,
            "engine": self.args.engine,
        }
        return json.dumps(record, indent=2).encode()

    def _train(self) -> int:
        prog, cfg, out, comm = self.prog, self.cfg, self.out, self.comm
        per_epoch = iterations_per_epoch(self.train_set.n, cfg.batch_size)
        total = cfg.epochs * per_epoch
        run = {
            "dataset": self.dataset,
            "data_dir": str(self.data_dir),
            "device": self.device.name,
            "title": self.title,
        }
        stop = _StopFlag(prog)
        callbacks: list[Callback] = [stop]
        checkpointer = _Checkpointer(out / "checkpoint.npz", self.net, self.optimizer, cfg, run)
        if comm.is_root:
            metrics = _MetricsLog(out / "metrics.jsonl", self.history.records)
            callbacks += [metrics, checkpointer]
            bars = not self.args.no_progress and sys.stderr.isatty()
            if not bars:
                callbacks.append(_Lines(total))
            ranks = f" on {comm.size} ranks" if comm.size > 1 else ""
            print(
                f"{prog}: {self.net} on {self.device.description()}{ranks}: {self.title}, "
                f"{cfg.epochs} epochs × {per_epoch} iterations, n_b={cfg.batch_size}, {cfg.optimizer} "
                f"γ={cfg.lr}; writing to {display_path(out)}",
                flush=True,
            )
        else:
            bars = False
        options = cfg.fit_options()
        divergence = None if self.args.no_divergence_check else self.args.divergence_factor
        try:
            with stop:
                fit(
                    self.net,
                    self.train_set,
                    optimizer=self.optimizer,
                    validation_data=self.val_set,
                    engine=with_notices(prog, _make_engine, self, comm)
                    if comm.is_root
                    else _make_engine(self, comm),
                    progress=bars,
                    callbacks=callbacks,
                    divergence_factor=divergence,
                    history=self.history,
                    comm=comm,
                    **options,
                )
        except DivergenceError as exc:
            kept = checkpointer.saved_iteration
            raise DivergenceError(
                f"{exc}; {display_path(out / 'checkpoint.npz')} keeps iteration {kept}"
                if kept is not None
                else str(exc)
            ) from None
        if not comm.is_root:
            return 128 + stop.signum if stop.signum else 0
        written = [name for name in RUN_FILES if name != "curves.png"]
        arch = f"{'-'.join(map(str, self.net.sizes))} {self.net.activation.name}"
        if plot_history(prog, out / "curves.png", self.history, f"{self.title}, {arch}"):
            written.append("curves.png")
        if stop.signum:
            print(
                f"{prog}: stopped at iteration {self.history.iteration} of {total}; checkpoint saved. "
                f"Resume with: {_resume_command(prog, out)}",
                file=sys.stderr,
            )
            return 128 + stop.signum
        if self.args.export_onnx is not None:
            self.net.export_onnx(self.args.export_onnx)
            written.append(display_path(self.args.export_onnx))
        last = self.history.records[-1] if self.history.records else None
        if last:
            print(
                f"{prog}: done: validation error {100 * last['val_error']:.2f} %, cost "
                f"{last['val_loss']:.4f}, after {total} iterations in {last['time_s']:.1f} s of training; "
                f"wrote {', '.join(written)} in {display_path(out)}"
            )
        return 0


def _make_engine(run: _Run, comm):
    return make_engine(run.args.engine, run.net, run.optimizer, run.train_set, comm)


def _local_device(spec: str, comm) -> str:
    """Under MPI on CUDA, each rank takes its node-local GPU: cuda → cuda:<local rank>."""
    if comm.size > 1 and spec in ("cuda", "auto"):
        return f"cuda:{comm.local_rank}" if spec == "cuda" else spec
    return spec


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UsageError("--export-onnx needs the onnx package: pip install 'gpunn[onnx]'") from None


def _resume_command(prog: str, out: Path) -> str:
    program = "gpunn train" if prog.startswith("gpunn") else "python scripts/train_mnist.py"
    return f"{program} --out {display_path(out)} --resume"


def _fresh_run_dir(name: str) -> Path:
    base = Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


class _Checkpointer(Callback):
    """checkpoint.npz at every epoch's end and when the run stops (rank 0)."""

    def __init__(self, path: Path, net, optimizer, cfg: Config, run: dict):
        self.path, self.net, self.optimizer, self.cfg, self.run = path, net, optimizer, cfg, run
        self.saved_iteration = None

    def on_checkpoint(self, history: History) -> None:
        save_checkpoint(self.path, self.net, self.optimizer, history, self.cfg, self.run)
        self.saved_iteration = history.iteration


class _MetricsLog(Callback):
    """metrics.jsonl, one evaluation per line: rewritten from the run's history when the run starts
    (so a resumed run drops what its checkpoint does not hold), then appended to."""

    def __init__(self, path: Path, records: list):
        self.path = path
        text = "".join(json.dumps(r) + "\n" for r in records).encode()
        write_atomic(path, lambda f: f.write(text))

    def on_eval(self, record: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise WriteError(f"cannot write {display_path(self.path)}: {reason_of(exc)}") from None


class _StopFlag(Callback):
    """Turns SIGINT/SIGTERM into a request to stop after the current stretch (restored on exit)."""

    per_iteration = False  # the run stops after the current stretch (at most 100 iterations)

    def __init__(self, prog: str):
        self.prog, self.signum = prog, 0
        self._previous = {}

    def should_stop(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, frame):
        if not self.signum:
            print(f"\n{self.prog}: stopping after the current iterations…", file=sys.stderr)
        self.signum = signum

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Lines(Callback):
    """One line per evaluation on stdout (when there are no progress bars)."""

    def __init__(self, total: int):
        self.width = len(str(total))

    def on_eval(self, r: dict) -> None:
        print(
            f"iter {r['iteration']:>{self.width}}  epoch {r['epoch']:6.2f}  "
            f"train {r['train_loss']:.4f} / {100 * r['train_error']:5.2f} %  "
            f"val {r['val_loss']:.4f} / {100 * r['val_error']:5.2f} %  "
            f"lr {r['lr']:.4g}  {r['time_s']:7.1f} s",
            flush=True,
        )


# --- evaluation and export -----------------------------------------------------------------------


def _saved(path: Path):
    """(file, checkpoint.Saved) for a run folder, a checkpoint or a saved model."""
    file = path / "checkpoint.npz" if path.is_dir() else path
    return file, read_saved(file)


def _evaluate(prog: str, args) -> int:
    file, saved = _saved(args.path)
    run = saved.checkpoint.run if saved.checkpoint is not None else {}
    dataset = args.dataset or (run.get("dataset") if not args.data_dir else None)
    data_dir = args.data_dir or (None if args.dataset else run.get("data_dir"))
    net = saved.network(cli_device(prog, args.device))
    if net.task != "classification":
        raise UsageError(
            f"{display_path(file)} holds a {net.task} network; MNIST-layout sets are classification"
        )
    folder = resolve_data_dir(data_dir, dataset, progress=not args.no_progress)
    val = load_split(folder, "val", net.sizes[-1])
    if val.X.shape[1] != net.sizes[0]:
        where = display_path(folder)
        raise UsageError(
            f"the network takes {net.sizes[0]} inputs; the images in {where} have {val.X.shape[1]}"
        )
    val_loss, val_error = evaluate(net, DeviceDataset(net, val.X, val.y, PIXEL_SCALE))
    where = f" (iteration {saved.checkpoint.history.iteration})" if saved.checkpoint is not None else ""
    print(
        f"{display_path(file)}{where}: validation cost {val_loss:.4f}, misclassification "
        f"{100 * val_error:.2f} % on {val.X.shape[0]} images of {display_path(folder)}"
    )
    return 0


def _export(prog: str, args) -> int:
    _need_onnx()
    _, saved = _saved(args.path)
    net = saved.network("cpu")
    net.export_onnx(args.onnx)
    print(f"{prog}: wrote {display_path(args.onnx)} ({net})")
    return 0
