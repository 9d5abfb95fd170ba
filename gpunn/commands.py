"""What every gpunn command-line tool shares: one-line errors, exit statuses, one-line notices.

    def main(argv=None):
        return run_command(PROG, build_parser().parse_args, _run, argv)

A problem the user can cause ends in one line on stderr, ``PROG: error: …``, and exit status 2 for bad
flags (UsageError), 1 for the rest (any GpunnError, a file-system error, running out of memory) and 130
for Ctrl-C outside training (143 for SIGTERM); warnings become ``PROG: notice: …`` lines.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from collections.abc import Callable

from .backend import Device, get_device, parse_device
from .errors import DeviceError, GpunnError


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
    would otherwise ignore it.
    """
    argv = sys.argv[1:] if argv is None else argv
    main_thread = threading.current_thread() is threading.main_thread()  # signals are the main thread's
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return run(parse(argv))
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except GpunnError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError as exc:  # CuPy's OutOfMemoryError is one
        print(f"{prog}: error: out of memory ({exc}); try a smaller batch or network", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a folder that vanished
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


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


def no_matplotlib(prog: str, filename: str) -> None:
    print(
        f"{prog}: notice: matplotlib is not installed, so no {filename} (pip install 'gpunn[plot]')",
        file=sys.stderr,
    )
