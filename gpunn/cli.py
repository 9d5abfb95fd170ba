"""``python scripts/train_mnist.py``: train the lecture's MNIST models (Example 6.2) with mini-batch SGD.

Every problem a user can cause (bad flags, missing or corrupt data, no GPU, an unwritable or occupied
--out, a damaged checkpoint, divergence) ends in one line on stderr and a non-zero exit status: 2 for
bad flags, 1 for the rest, 130 after Ctrl-C (143 after SIGTERM) with a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from .commands import Parser, UsageError, device_name, no_matplotlib, run_command, with_notices
from .commands import device as cli_device
from .data import DeviceDataset, load_idx_dataset, load_split, resolve_data_dir
from .errors import CheckpointError, DivergenceError
from .train import (
    ENGINES,
    Config,
    TrainState,
    build,
    evaluate,
    fit,
    iterations_per_epoch,
    load_checkpoint,
    make_step,
    restore,
    save_checkpoint,
    write_atomic,
)

PROG = "train_mnist.py"
RECIPE = [f.name for f in Config.__dataclass_fields__.values()]  # flags --resume must not change


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The flags; with ``with_defaults=False`` only the flags actually given appear in the result."""
    d = Config()

    def option(*names, default=None, **kwargs):
        kwargs["default"] = default if with_defaults else argparse.SUPPRESS
        p.add_argument(*names, **kwargs)

    p = Parser(
        prog=PROG,
        description="Train logistic regression or an MLP on MNIST with mini-batch SGD "
        "(Lindholm et al., Example 6.2), the dataset resident on the device.",
    )
    option("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    option(
        "--data-dir",
        help="folder with the four MNIST-layout IDX files (.gz or not), only read; "
        "default: $GPUNN_DATA_DIR, else a download into ~/.cache/gpunn/mnist",
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
    option("--lr", type=float, default=d.lr, help="learning rate γ")
    option("--momentum", type=float, default=d.momentum, help="momentum μ in [0, 1)")
    option("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay λ, on W only")
    option(
        "--lr-schedule",
        choices=["constant", "step", "cosine"],
        default=d.lr_schedule,
        help="how γ changes over the run",
    )
    option(
        "--lr-step-epochs",
        type=int,
        default=d.lr_step_epochs,
        help="step schedule: multiply γ by --lr-gamma every this many epochs",
    )
    option("--lr-gamma", type=float, default=d.lr_gamma, help="step schedule factor, in (0, 1]")
    option(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="iterations between evaluations on the whole validation set",
    )
    option("--seed", type=int, default=d.seed, help="seeds the initial weights and every epoch's order")
    option("--dtype", choices=["float32", "float64"], default=d.dtype, help="floating-point type")
    option("--num-classes", type=int, default=d.num_classes, help="M; labels must lie in 0…M−1")
    option("--out", type=Path, help="run folder; default: a fresh runs/mnist-<date>-<time>")
    option(
        "--resume", action="store_true", default=False, help="continue the run in --out from its checkpoint"
    )
    option("--eval-only", type=Path, metavar="CHECKPOINT", help="evaluate a checkpoint on the validation set")
    option("--no-progress", action="store_true", default=False, help="plain lines instead of progress bars")
    option(
        "--engine",
        choices=list(ENGINES),
        default="auto",
        help="training step: auto (blas where it can run, else xp), xp (the shared NumPy/CuPy code), "
        "blas (CPU: prepared BLAS calls; classification, plain SGD), fused (CUDA kernels) or graph "
        "(fused, replayed as CUDA graphs; the fastest on a GPU)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _parse, _run, argv)


def _parse(argv: list[str]):
    """The flags, and which of them were given explicitly (so --resume can refuse changes)."""
    return build_parser().parse_args(argv), vars(build_parser(with_defaults=False).parse_args(argv))


def config_from_flags(**values) -> Config:
    """Config(**values), checked; an impossible value is a UsageError naming its flag."""
    try:
        return Config(**values).check()
    except ValueError as exc:  # "batch_size must be …" -> "--batch-size must be …"
        field, _, rest = str(exc).partition(" ")
        raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def _run(parsed) -> int:
    args, explicit = parsed
    if args.eval_only is not None:
        return _eval_only(args)
    out = args.out or _fresh_run_dir()
    ckpt_path = out / "checkpoint.npz"
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out DIR, the run to continue")
        cfg, arrays, state = load_checkpoint(ckpt_path)
        changed = [
            f"--{k.replace('_', '-')} {explicit[k]} (the run has {getattr(cfg, k)})"
            for k in RECIPE
            if k in explicit and explicit[k] != getattr(cfg, k)
        ]
        if changed:
            raise UsageError(f"--resume continues the run as configured; drop {', '.join(changed)}")
    else:
        cfg = config_from_flags(**{name: getattr(args, name) for name in RECIPE})
        arrays, state = None, TrainState()
    created = not out.exists()
    if not args.resume:
        _claim_run_dir(out)
    try:
        return _train(args, out, cfg, arrays, state)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves nothing behind
        raise


def _train(args, out: Path, cfg: Config, arrays, state: TrainState) -> int:
    ckpt_path = out / "checkpoint.npz"
    device = cli_device(PROG, args.device)
    folder = resolve_data_dir(args.data_dir, progress=not args.no_progress)
    train_split, val_split = load_idx_dataset(folder, cfg.num_classes)
    net, opt = build(cfg, train_split.X.shape[1], device)
    if arrays is not None:
        restore(net, opt, arrays, ckpt_path)
    train_set = DeviceDataset(train_split.X, train_split.y, device)
    val_set = DeviceDataset(val_split.X, val_split.y, device)
    del train_split, val_split

    if not args.resume:
        config = {**cfg.to_dict(), "data_dir": str(folder), "device": device.description()}
        write_atomic(out / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    metrics = _MetricsLog(out / "metrics.jsonl", keep_until=state.iteration)
    per_epoch = iterations_per_epoch(train_set.n, cfg.batch_size)
    total = cfg.epochs * per_epoch
    print(
        f"{PROG}: {net} on {device.description()}: {cfg.epochs} epochs × {per_epoch} iterations, "
        f"n_b={cfg.batch_size}, γ={cfg.lr}; writing to {out}",
        flush=True,
    )
    progress = _progress(args, total, per_epoch, state.iteration)
    stop = _StopFlag()
    step = with_notices(PROG, make_step, net, opt, train_set, args.engine)

    def on_eval(record):
        metrics.append(record)
        progress.evaluated(record)

    def on_checkpoint(st):
        save_checkpoint(ckpt_path, net, opt, cfg, st)

    try:
        with stop:
            done = fit(
                net,
                opt,
                cfg,
                train_set,
                val_set,
                state,
                on_eval=on_eval,
                on_checkpoint=on_checkpoint,
                on_step=progress.step,
                should_stop=stop.is_set,
                step=step,
            )
    except DivergenceError as exc:
        progress.close()
        kept = f"{ckpt_path} keeps iteration {_checkpoint_iteration(ckpt_path)}"
        raise DivergenceError(f"{exc}; {kept}" if ckpt_path.exists() else str(exc)) from None
    progress.close()
    _plot(out, state, metrics.records, net)
    if not done:
        print(
            f"{PROG}: stopped at iteration {state.iteration} of {total}; checkpoint saved. "
            f"Resume with: python scripts/train_mnist.py --out {out} --resume",
            file=sys.stderr,
        )
        return 128 + stop.signum
    last = metrics.records[-1] if metrics.records else None
    if last:
        print(
            f"{PROG}: done: validation error {100 * last['val_error']:.2f} %, cost "
            f"{last['val_loss']:.4f}, after {total} iterations in {last['time_s']:.1f} s of training"
        )
    return 0


def _eval_only(args) -> int:
    cfg, arrays, state = load_checkpoint(args.eval_only)
    device = cli_device(PROG, args.device)
    folder = resolve_data_dir(args.data_dir, progress=not args.no_progress)
    val = load_split(folder, "val", cfg.num_classes)
    net, opt = build(cfg, val.X.shape[1], device)
    restore(net, opt, arrays, args.eval_only)
    val_loss, val_error = evaluate(net, DeviceDataset(val.X, val.y, device))
    print(
        f"{args.eval_only} (iteration {state.iteration}): validation cost {val_loss:.4f}, "
        f"misclassification {100 * val_error:.2f} % on {val.X.shape[0]} images"
    )
    return 0


def _fresh_run_dir() -> Path:
    base = Path("runs") / time.strftime("mnist-%Y%m%d-%H%M%S")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _claim_run_dir(out: Path) -> None:
    """Make ``out`` and prove it writable; refuse one that holds another run's checkpoint."""
    if (out / "checkpoint.npz").exists():
        raise CheckpointError(
            f"{out} already holds a run's checkpoint; continue it with --resume or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / ".write-test", lambda f: f.write(b"ok"))
        (out / ".write-test").unlink()
    except OSError as exc:
        raise CheckpointError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def _checkpoint_iteration(path: Path) -> int:
    try:
        return load_checkpoint(path)[2].iteration
    except CheckpointError:
        return -1


class _MetricsLog:
    """metrics.jsonl, one evaluation per line. On resume, records after the checkpoint are dropped
    (the resumed run will produce them again) and unreadable lines from a crash are skipped."""

    def __init__(self, path: Path, keep_until: int):
        self.path, self.records = path, []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("iteration", 1 << 62) <= keep_until:
                    self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records).encode()
        write_atomic(path, lambda f: f.write(text))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (restored on exit)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def is_set(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, frame):
        if not self.signum:
            print(f"\n{PROG}: stopping after this step…", file=sys.stderr)
        self.signum = signum

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress(args, total: int, per_epoch: int, start: int):
    if not args.no_progress and sys.stderr.isatty():
        return _Bars(total, per_epoch, start)
    return _Lines(total)


class _Lines:
    """One line per evaluation on stdout."""

    def __init__(self, total: int):
        self.width = len(str(total))

    def step(self, t: int) -> None:
        pass

    def evaluated(self, r: dict) -> None:
        print(
            f"iter {r['iteration']:>{self.width}}  epoch {r['epoch']:6.2f}  "
            f"train {r['train_loss']:.4f} / {100 * r['train_error']:5.2f} %  "
            f"val {r['val_loss']:.4f} / {100 * r['val_error']:5.2f} %  "
            f"lr {r['lr']:.4g}  {r['time_s']:7.1f} s",
            flush=True,
        )

    def close(self) -> None:
        pass


class _Bars:
    """tqdm bars for epochs and for the iterations of the current epoch."""

    def __init__(self, total: int, per_epoch: int, start: int):
        from tqdm import tqdm

        self.per_epoch = per_epoch
        epochs = -(-total // per_epoch)
        self.epochs = tqdm(total=epochs, initial=start // per_epoch, desc="epochs", position=0)
        self.iters = tqdm(
            total=per_epoch, initial=start % per_epoch, desc="iterations", position=1, leave=False
        )

    def step(self, t: int) -> None:
        self.iters.update()
        if t % self.per_epoch == 0:
            self.epochs.update()
            self.iters.reset()

    def evaluated(self, r: dict) -> None:
        self.epochs.set_postfix(val_error=f"{100 * r['val_error']:.2f}%", refresh=False)

    def close(self) -> None:
        self.iters.close()
        self.epochs.close()


def _plot(out: Path, state: TrainState, records: list, net) -> None:
    try:
        from .plots import plot_training_curves
    except ImportError:
        no_matplotlib(PROG, "curves.png")
        return
    title = f"MNIST, {'-'.join(map(str, net.sizes))} {net.activation.name}"
    plot_training_curves(out / "curves.png", state.batch_loss, state.batch_error, records, title)
