"""What every gpunn command-line tool shares: one-line errors, exit statuses, one-line notices.

    def main(argv=None):
        return run_command(PROG, build_parser().parse_args, _run, argv)

A problem the user can cause ends in one line on stderr, ``PROG: error: …``, and exit status 2 for bad
flags (UsageError), 1 for the rest (any GpunnError, a file-system error, running out of memory) and 130
for Ctrl-C outside training (143 for SIGTERM); warnings, whenever they come, become ``PROG: notice: …``
lines.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from .backend import Device, get_device, parse_device
from .errors import DeviceError, GpunnError
from .files import display_path, reason_of


class UsageError(GpunnError):
    """Bad flags: exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every real default; says nothing for options whose default is "none given"."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with ``--help`` showing defaults and errors as one line (UsageError), not a usage block."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt (the trainer catches both during training)."""


def _raise_terminated(signum, frame):
    raise Terminated


def run_command(prog: str, parse: Callable, run: Callable[..., int], argv: list[str] | None = None) -> int:
    """``run(parse(argv))`` with every error a user can cause turned into one line and an exit status.

    SIGTERM stops the command like Ctrl-C (exit 143), also where Python runs as PID 1 in a container and
    would otherwise ignore it. Under ``mpiexec`` only rank 0 reports what every rank sees alike (bad
    flags, another rank's failure), and a rank that ends with an error ends every rank (MPI_Abort), so
    none is left waiting in a collective.
    """
    argv = sys.argv[1:] if argv is None else argv
    main_thread = threading.current_thread() is threading.main_thread()  # signals are the main thread's
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    show = warnings.showwarning

    def notice(message, category, filename, lineno, file=None, line=None):  # one line, no source
        print(f"{prog}: notice: {message}", file=sys.stderr)

    warnings.showwarning = notice
    try:
        return run(parse(argv))
    except BaseException as exc:
        code, line = _outcome(exc)
        if code is None:  # a bug: its traceback, and under MPI the other ranks must not wait for this one
            _end_other_ranks(1, unexpected=True)
            raise
        if _reports(exc):
            print(f"{prog}: {line}", file=sys.stderr)
        _end_other_ranks(code)
        return code
    finally:
        warnings.showwarning = show
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _outcome(exc: BaseException) -> tuple[int | None, str | None]:
    """(exit status, the line to print) for an error a user can cause; (None, None) for a bug."""
    if isinstance(exc, UsageError):
        return 2, f"error: {exc}"
    if isinstance(exc, GpunnError):
        return 1, f"error: {exc}"
    if isinstance(exc, MemoryError):  # CuPy's OutOfMemoryError is one
        return 1, f"error: out of memory ({exc}); try a smaller batch or network"
    if isinstance(exc, OSError):  # a folder that vanished mid-run, a device gone
        where = f" ({display_path(exc.filename)})" if exc.filename else ""
        return 1, f"error: {reason_of(exc)}{where}"
    if isinstance(exc, KeyboardInterrupt):
        return (143 if isinstance(exc, Terminated) else 130), "interrupted"
    return None, None


def _mpi_rank() -> int | None:
    from .distributed import mpi_launch

    launch = mpi_launch()
    return None if launch is None or launch.size == 1 else launch.rank


def _reports(exc: BaseException) -> bool:
    """Whether this process prints ``exc``: always outside MPI; under MPI not an error relayed from the
    rank that reports it (Communicator.check_all), nor bad flags except on rank 0 (every rank parses
    the same flags)."""
    rank = _mpi_rank()
    if rank is None:
        return True
    return not getattr(exc, "relayed", False) and (rank == 0 or not isinstance(exc, UsageError))


def _end_other_ranks(code: int, unexpected: bool = False) -> None:
    """Under MPI, once MPI has started: end every rank (MPI_Abort) with ``code``."""
    mpi = sys.modules.get("mpi4py.MPI")
    if _mpi_rank() is None or mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    if unexpected:
        traceback.print_exc()
    sys.stderr.flush()
    mpi.COMM_WORLD.Abort(code)


def with_notices(prog: str, f: Callable, *args, **kwargs):
    """``f(*args, **kwargs)``, each warning it gives printed as one ``prog: notice:`` line."""
    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        result = f(*args, **kwargs)
    for notice in notices:
        print(f"{prog}: notice: {notice.message}", file=sys.stderr)
    return result


def device_name(text: str) -> str:
    """argparse type for --device: "cpu", "cuda", "cuda:N" or "auto", checked before anything runs."""
    try:
        parse_device(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def device(prog: str, spec: str) -> Device:
    """get_device(spec), its "no GPU, using the CPU" warning printed as a notice."""
    return with_notices(prog, get_device, spec)


def plot_history(prog: str, path, history, title: str) -> bool:
    """The curves of a run's ``history`` (train.History: Figures 6.7/6.8) into the image ``path``;
    without matplotlib, a notice and False."""
    try:
        from .plots import plot_training_curves
    except ImportError as exc:
        if (exc.name or "").startswith("gpunn"):  # a bug of ours, not a missing matplotlib
            raise
        no_matplotlib(prog, Path(path).name)
        return False
    plot_training_curves(path, history.batch_loss, history.batch_error, history.records, title)
    return True


def no_matplotlib(prog: str, filename: str) -> None:
    print(
        f"{prog}: notice: matplotlib is not installed, so no {filename} (pip install 'gpunn[plot]')",
        file=sys.stderr,
    )
