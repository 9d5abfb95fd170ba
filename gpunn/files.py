"""The file plumbing every gpunn command shares: paths fit to print, atomic writes, the run-folder lock,
and defensive readers for the files a run leaves behind.

* ``display_path``: any path as one printable line (undecodable bytes as ``\\xff``).
* ``write_atomic``: readers see the old file or the new one, never half of one; a failed write is a
  ``WriteError`` naming the file, and leaves no temporary behind.
* ``RunLock``: one training run per run folder, held for the life of the run; a killed run leaves no
  lock behind (``flock`` semantics, through ``filelock``).
* ``read_npz`` / ``read_text``: checkpoints, saved models and small text files, read without trusting a
  byte of them: damage is a ``CheckpointError`` naming the file, never a traceback or a memory blow-up.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import re
import secrets
import shlex
import socket
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy
import numpy.lib.format

from .errors import CheckpointError, RunFolderError, WriteError

LOCK_FILE = ".gpunn.lock"  # flock'ed for the life of a run; never removed (waiters must share one inode)
OWNER_FILE = ".gpunn.owner.json"  # who holds the lock: apart, as a contender may open the lock file itself
MAX_NPZ_BYTES = 4 << 30  # a checkpoint of a 784-4096-4096-10 network with Adam state is about 0.5 GiB
MAX_NPZ_MEMBERS = 10_000
MAX_TEXT_BYTES = 64 << 20  # metrics.jsonl grows by ~200 bytes per evaluation
_MAX_OWNER_BYTES = 1 << 16
_MAX_COMMAND_CHARS = 200
_MAX_REASON_CHARS = 300
_NPY_HEADER_MAX = 16 << 10  # numpy itself refuses .npy headers over 10000 characters
_NPY_KINDS = "biufcU"  # numbers, and the unicode "meta"; never objects, records or raw bytes
# write_atomic's temporaries are ".NAME.<random>.tmp"; tempfile.mkstemp's 8 characters match as well.
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{6,16}\.tmp", re.ASCII)
# Everything zipfile, zlib and numpy.lib.format are known to raise on garbage.
_DAMAGE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,  # UnicodeDecodeError among them
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,  # RecursionError and NotImplementedError among them
    SyntaxError,
    zlib.error,
    struct.error,
    OverflowError,
    MemoryError,
)


# --- paths fit to print ---------------------------------------------------------------------------


def display_path(path: str | bytes | os.PathLike, encoding: str | None = None) -> str:
    """``path`` as one printable line that ``encoding`` (default: that of ``sys.stderr``) can encode.

    Bytes that are not valid in the file-system encoding become ``\\xff``; control characters (a newline
    in a file name would break a one-line message) and characters ``encoding`` lacks become ``\\n``,
    ``\\x1b``, ``\\u2028``... Plain paths come back unchanged.
    """
    text = os.fspath(path)
    if isinstance(text, str) and text.isascii() and text.isprintable():
        return text
    try:
        raw = text if isinstance(text, bytes) else os.fsencode(text)
        text = raw.decode(sys.getfilesystemencoding(), "backslashreplace")
    except UnicodeError:  # lone surrogates that did not come from undecodable bytes
        pass
    return printable(text, encoding)


def printable(text: str, encoding: str | None = None) -> str:
    """``text`` with each character that is not printable, or that ``encoding`` (default: that of
    ``sys.stderr``) cannot encode, replaced by its backslash escape."""
    if text.isascii() and text.isprintable():
        return text
    encoding = encoding or getattr(sys.stderr, "encoding", None) or "ascii"
    return "".join(ch if ch.isprintable() and _encodable(ch, encoding) else _escape(ch) for ch in text)


def _encodable(ch: str, encoding: str) -> bool:
    try:
        ch.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def _escape(ch: str) -> str:
    if 0xDC80 <= ord(ch) <= 0xDCFF:  # surrogateescape's stand-in for an undecodable byte
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return ch.encode("unicode_escape").decode("ascii")


def reason_of(exc: BaseException) -> str:
    """The why of an exception as a short printable line: an OSError's strerror, else its message,
    else its type's name."""
    text = " ".join(((exc.strerror if isinstance(exc, OSError) else None) or str(exc)).split())
    if len(text) > _MAX_REASON_CHARS:  # a forged member name can be 64 KiB long
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return printable(text or type(exc).__name__)


# --- atomic writes --------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file ``.NAME.<random>.tmp`` beside ``path``, flush it to the
    disk, then rename it over ``path``: readers see the old file or the new one, never half of one.

    The new file's permissions follow the umask. An OSError (disk full, no permission, read-only
    folder...) becomes a WriteError naming ``path``; any other exception (KeyboardInterrupt, a bug in
    ``write``) propagates unchanged. Either way the temporary file is gone.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _create_temporary(path)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as exc:
        raise WriteError(f"cannot write {display_path(path)}: {reason_of(exc)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _create_temporary(path: Path) -> tuple[int, Path]:
    # os.open applies the umask (and default ACLs) itself; mkstemp's 0600 would make results private.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path.name}")


def _fsync_folder(folder: Path) -> None:
    # The rename itself survives a power cut only once the folder's entry is on the disk.
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted ``write_atomic`` (SIGKILL, power cut) left in
    ``folder`` (not below it), and return them. Call it only while holding the folder's RunLock: a
    running writer's temporary looks just the same."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunFolderError(f"cannot list the run folder {display_path(folder)}: {reason_of(exc)}") from None
    removed = []
    for entry in entries:
        try:
            if not (_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            where = display_path(folder / entry.name)
            raise RunFolderError(f"cannot remove the leftover {where}: {reason_of(exc)}") from None
        removed.append(folder / entry.name)
    return sorted(removed)


# --- the run-folder lock --------------------------------------------------------------------------


class RunLock:
    """One gpunn run at a time in ``folder`` (which must exist), for the life of the run.

        with RunLock(run_dir):
            remove_stale_temporaries(run_dir)
            ...train, checkpoint...

    ``acquire`` never waits: if another process holds the folder it raises RunFolderError naming that
    run (pid, host, start time, command line). The lock is ``flock`` on ``folder/.gpunn.lock``: the
    kernel drops it when its holder dies, even by SIGKILL, so a killed run never blocks the next one.
    Who holds it is written, atomically, to ``folder/.gpunn.owner.json`` after acquiring and removed
    on release; a record whose process is gone is not shown.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.lock_path = self.folder / LOCK_FILE
        self.owner_path = self.folder / OWNER_FILE
        import filelock  # here, not at import: `import gpunn` needs only NumPy

        self._timeout = filelock.Timeout
        # thread_local=False: a run may release from another thread (a signal handler, a finalizer).
        self._lock = filelock.FileLock(self.lock_path, blocking=False, thread_local=False)
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> RunLock:
        """Take the lock and record this process as its owner; RunFolderError if another run holds it
        or the folder cannot hold a lock."""
        if self._held:
            raise RuntimeError(f"RunLock({self.folder}) is already held by this object")
        if not self.folder.is_dir():  # filelock would create it, and a mistyped path with it
            raise RunFolderError(f"cannot lock the run folder {display_path(self.folder)}: no such folder")
        try:
            self._lock.acquire(blocking=False)
        except self._timeout:
            raise RunFolderError(self._in_use_message()) from None
        except OSError as exc:
            where = display_path(self.folder)
            raise RunFolderError(f"cannot lock the run folder {where}: {reason_of(exc)}") from None
        self._held = True
        try:
            record = json.dumps(_owner_record())
            write_atomic(self.owner_path, lambda f: f.write(record.encode()))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Forget the owner record and drop the lock; nothing happens when it is not held."""
        if not self._held:
            return
        try:
            with contextlib.suppress(OSError):
                self.owner_path.unlink(missing_ok=True)
        finally:
            self._held = False
            self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _in_use_message(self) -> str:
        owner = _describe_owner(self.owner_path)
        return (
            f"{display_path(self.folder)} is in use by another gpunn run "
            f"({owner or 'which one is not recorded yet'})"
        )


def _owner_record() -> dict:
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = Path(argv[0]).name  # "python", not the virtual environment's path
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join(argv),
        "process_start": _process_start(os.getpid()),
    }


def _describe_owner(owner_path: Path) -> str | None:
    """'pid P on host H, started T: COMMAND' from a live owner record; None when there is none, it is
    unreadable, or its process is gone (a run killed before it could remove it)."""
    try:
        record = json.loads(_read_bounded(owner_path, _MAX_OWNER_BYTES))
        pid, host = int(record["pid"]), str(record["host"])
        started, command = str(record["started"]), str(record["command"])
        process_start = record.get("process_start")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if host == socket.gethostname() and not _alive(pid, process_start):
        return None
    if len(command) > _MAX_COMMAND_CHARS:
        command = command[: _MAX_COMMAND_CHARS - 3] + "..."
    return f"pid {pid} on host {printable(host)}, started {printable(started)}: {printable(command)}"


def _alive(pid: int, process_start) -> bool:
    """Whether process ``pid`` of this host runs, and is the one that started at ``process_start``."""
    if os.name != "posix":  # Windows' os.kill(pid, 0) would terminate the process
        return True
    if pid <= 0:  # kill(0, ...) and kill(-1, ...) address groups, not one process
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # another account's process: it exists
        pass
    except (OSError, OverflowError):
        return False
    now = _process_start(pid)
    return process_start is None or now is None or now == process_start


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read(4096).rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); the split starts at field 3
    except (OSError, IndexError, ValueError):
        return None


# --- defensive readers ----------------------------------------------------------------------------


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading; OSError("not a regular file") for anything but a regular
    file, since a FIFO would hang its reader and a device would never end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(0, "a folder, not a file" if stat.S_ISDIR(mode) else "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """The whole of ``path``; ValueError when it holds more than ``max_bytes``."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > max_bytes:
            raise ValueError(f"more than {max_bytes} bytes")
        data = f.read(max_bytes + 1)  # the file may have grown since fstat
    if len(data) > max_bytes:
        raise ValueError(f"more than {max_bytes} bytes")
    return data


def read_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the small file ``path`` (config.json, metrics.jsonl); ``what`` names it in
    errors. CheckpointError when it is missing, unreadable, larger than ``max_bytes`` or not UTF-8."""
    path = Path(path)
    where = display_path(path)
    try:
        data = _read_bounded(path, max_bytes)
    except FileNotFoundError:
        raise CheckpointError(f"no {what} at {where}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {where}: {reason_of(exc)}") from None
    except ValueError as exc:
        raise CheckpointError(f"{where} is damaged or not a gpunn {what} ({exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise CheckpointError(f"{where} is damaged or not a gpunn {what} ({reason})") from None


def read_npz(path: str | os.PathLike, what: str = "checkpoint", max_bytes: int = MAX_NPZ_BYTES) -> dict:
    """The arrays of the ``.npz`` file ``path`` (as written by ``numpy.savez``), by name: checkpoints
    and saved models, small numeric arrays and a 0-d unicode ``meta``. ``what`` names the file in
    errors.

    Nothing in the file is trusted: each member must be a ``NAME.npy``, unencrypted, stored or
    deflated, of a numeric or unicode dtype (never objects: nothing is unpickled), declaring sizes that
    agree with its .npy header before a byte is decompressed; the file and all members together stay
    within ``max_bytes``; every CRC is checked. A missing file, or any damage at all, is a
    CheckpointError naming the file. The file is only read.
    """
    path = Path(path)
    where = display_path(path)
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"no {what} at {where}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {where}: {reason_of(exc)}") from None
    try:
        with f:
            return _read_npz_members(f, max_bytes)
    except _DAMAGE as exc:
        raise CheckpointError(f"{where} is damaged or not a gpunn {what} ({reason_of(exc)})") from None


def _read_npz_members(f: BinaryIO, max_bytes: int) -> dict:
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise ValueError(f"{size} bytes, more than the {max_bytes}-byte limit")
    arrays = {}
    with zipfile.ZipFile(f) as archive:
        members = archive.infolist()
        if len(members) > MAX_NPZ_MEMBERS:
            raise ValueError(f"{len(members)} members")
        total = 0
        for info in members:
            name = info.filename
            if not name.endswith(".npy") or len(name) == 4:
                raise ValueError(f"member {name!r} is not a .npy array")
            if name[:-4] in arrays:
                raise ValueError(f"member {name!r} appears twice")
            if info.flag_bits & 0x1:
                raise ValueError(f"member {name!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"member {name!r} uses compression method {info.compress_type}")
            total += info.file_size
            if total > max_bytes:
                raise ValueError(f"members declare more than the {max_bytes}-byte limit")
            arrays[name[:-4]] = _read_npy_member(archive, info)
    return arrays


def _read_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> numpy.ndarray:
    name = info.filename
    # The header alone, from a bounded prefix: a forged header length cannot make us read more.
    with archive.open(info) as member:
        head = io.BytesIO(member.read(_NPY_HEADER_MAX))
    version = numpy.lib.format.read_magic(head)
    if version == (1, 0):
        shape, _, dtype = numpy.lib.format.read_array_header_1_0(head)
    elif version == (2, 0):
        shape, _, dtype = numpy.lib.format.read_array_header_2_0(head)
    else:
        raise ValueError(f"member {name!r} is a .npy of version {version}")
    if not _is_plain(dtype):
        raise ValueError(f"member {name!r} has dtype {dtype}")
    data_bytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on a forged shape
    if head.tell() + data_bytes != info.file_size:
        raise ValueError(
            f"member {name!r} holds a {'x'.join(map(str, shape)) or '0-d'} {dtype} array in "
            f"{info.file_size} bytes"
        )
    # The sizes agree: read_array allocates no more than the member declares, which is within bounds.
    with archive.open(info) as member:
        array = numpy.lib.format.read_array(member, allow_pickle=False)
        if member.read(1):  # also the read that reaches the end, where zipfile checks the CRC
            raise ValueError(f"member {name!r} is longer than its array")
    return array


def _is_plain(dtype: numpy.dtype) -> bool:
    """Numbers or unicode, of a size: never objects (pickles), records, sub-arrays or zero-width items."""
    return (
        dtype.kind in _NPY_KINDS
        and not dtype.hasobject
        and dtype.fields is None
        and dtype.subdtype is None
        and dtype.itemsize > 0
    )
