"""The shared file plumbing: printable paths, atomic writes, the run-folder lock (across real processes),
and the defensive .npz and text readers, fuzzed until nothing but CheckpointError comes out."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpunn
from gpunn import files
from gpunn.errors import CheckpointError, RunFolderError, WriteError
from gpunn.files import (
    RunLock,
    display_path,
    read_npz,
    read_text,
    remove_stale_temporaries,
    write_atomic,
)

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
REPO = Path(__file__).resolve().parents[1]


# --- display_path ---------------------------------------------------------------------------------


def test_plain_paths_print_unchanged():
    for path in ("runs/x/checkpoint.npz", Path("/tmp/a b/c.json"), "C:\\runs\\x"):
        assert display_path(path) == str(path)


def test_undecodable_bytes_and_control_characters_are_escaped():
    assert display_path(os.fsdecode(b"runs/\xff\xfe/x")) == "runs/\\xff\\xfe/x"
    assert display_path(b"runs/\xff") == "runs/\\xff"
    assert display_path(Path(os.fsdecode(b"a\xffb"))) == "a\\xffb"
    assert display_path("a\nb\tc\x1b") == "a\\nb\\tc\\x1b"  # a message stays one line
    assert display_path("a\ud800b") == "a\\ud800b"  # a lone surrogate that no byte stands for


def test_non_ascii_names_are_kept_where_the_stream_can_print_them():
    assert display_path("körningar/é", encoding="utf-8") == "körningar/é"
    shown = display_path(os.fsdecode("körningar/\u2028".encode() + b"\xff"), encoding="ascii")
    assert shown == "k\\xf6rningar/\\u2028\\xff"
    shown.encode("ascii")


# --- write_atomic -----------------------------------------------------------------------------------


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_writes_and_follows_the_umask_of_the_moment(tmp_path):
    target = tmp_path / "config.json"
    old = os.umask(0o027)  # the old code read the umask once, at import
    try:
        write_atomic(target, lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert target.read_bytes() == b"{}" and (target.stat().st_mode & 0o777) == 0o640
    write_atomic(target, lambda f: f.write(b"[1]"))
    assert target.read_bytes() == b"[1]" and listing(tmp_path) == ["config.json"]


def test_disk_full_is_a_write_error_naming_the_target(tmp_path):
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"old")

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match=f"^cannot write {target}: No space left on device$"):
        write_atomic(target, disk_full)
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["checkpoint.npz"]


def test_real_os_errors_are_write_errors_and_leave_no_temporary(tmp_path):
    with pytest.raises(WriteError, match=r"^cannot write .*missing/model\.npz: No such file or directory$"):
        write_atomic(tmp_path / "missing" / "model.npz", lambda f: f.write(b"x"))
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(WriteError, match=r"^cannot write .*taken: Is a directory$"):
        write_atomic(tmp_path / "taken", lambda f: f.write(b"x"))
    assert listing(tmp_path) == ["taken"] and listing(tmp_path / "taken") == []
    assert issubclass(WriteError, gpunn.GpunnError)


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError("a bug in write")])
def test_other_exceptions_propagate_unchanged_and_remove_the_temporary(tmp_path, error):
    target = tmp_path / "metrics.jsonl"
    target.write_bytes(b"old")

    def interrupted(f):
        f.write(b"half")
        raise error

    with pytest.raises(type(error) if isinstance(error, Exception) else error) as info:
        write_atomic(target, interrupted)
    assert not isinstance(info.value, gpunn.GpunnError)
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["metrics.jsonl"]


# --- remove_stale_temporaries -----------------------------------------------------------------------

KILLED_MID_WRITE = """
import os, signal, sys
from gpunn.files import write_atomic
def die(f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
write_atomic(sys.argv[1], die)
"""


def python(code: str, *args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, **popen)


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    process = python(KILLED_MID_WRITE, tmp_path / "checkpoint.npz")
    assert process.wait(60) == -signal.SIGKILL
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".checkpoint.npz.") and leftover.name.endswith(".tmp")
    keep = ["checkpoint.npz", ".checkpoint.npz", "notes.tmp", ".x.tmp", "x.abc123.tmp", ".a.b.TMP"]
    for name in keep:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".folder.abc123.tmp").mkdir()
    (tmp_path / ".model.npz.abc123.tmp").write_bytes(b"")
    removed = remove_stale_temporaries(tmp_path)
    assert removed == sorted([leftover, tmp_path / ".model.npz.abc123.tmp"])
    assert listing(tmp_path) == sorted([*keep, ".folder.abc123.tmp"])
    assert remove_stale_temporaries(tmp_path) == [] and remove_stale_temporaries(tmp_path / "none") == []


# --- RunLock ----------------------------------------------------------------------------------------

HOLD = """
import sys, time
from gpunn.files import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""

FLOCK_ONLY = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holders():
    """Start processes that print 'locked' once they hold a lock; kill whichever are left at the end."""
    started = []

    def start(code: str, *args) -> subprocess.Popen:
        process = python(code, *args, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(60)
        process.stdout.close()


def refusal(folder: Path) -> str:
    with pytest.raises(RunFolderError) as info:
        RunLock(folder).acquire()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_second_process_is_refused_with_the_holder_named(tmp_path, holders):
    holder = holders(HOLD, tmp_path)
    message = refusal(tmp_path)
    assert message.startswith(f"{tmp_path} is in use by another gpunn run (pid {holder.pid} on host ")
    assert f"on host {socket.gethostname()}, started 2" in message and ": python -c " in message
    assert len(message) < 400  # the command line is cut short


def test_a_killed_holder_does_not_block_the_next_run(tmp_path, holders):
    holder = holders(HOLD, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(60)
    assert json.loads((tmp_path / files.OWNER_FILE).read_text())["pid"] == holder.pid  # left behind
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / files.OWNER_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / files.OWNER_FILE).exists() and (tmp_path / files.LOCK_FILE).exists()


def test_stale_owner_records_are_not_shown_as_live(tmp_path, holders):
    holder = holders(HOLD, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(60)
    # The next run holds the lock but has not written its record yet: the dead one must not be named.
    holders(FLOCK_ONLY, tmp_path / files.LOCK_FILE)
    message = refusal(tmp_path)
    assert message == f"{tmp_path} is in use by another gpunn run (which one is not recorded yet)"
    # A live pid that started at another time is a reused pid, not the owner.
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (tmp_path / files.OWNER_FILE).write_text(json.dumps({**record, "command": "x", "process_start": -1}))
    assert "not recorded yet" in refusal(tmp_path)
    # Another host's record cannot be checked from here, so it is shown; so is an unchecked live one.
    (tmp_path / files.OWNER_FILE).write_text(json.dumps({**record, "host": "elsewhere", "command": "y"}))
    shown = f"(pid {os.getpid()} on host elsewhere, started 2026-01-01 00:00:00: y)"
    assert refusal(tmp_path).endswith(shown)
    (tmp_path / files.OWNER_FILE).write_bytes(b"\xff garbage")
    assert "not recorded yet" in refusal(tmp_path)


def test_in_one_process_the_lock_is_exclusive_too(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        assert f"(pid {os.getpid()} on host" in refusal(tmp_path)
    finally:
        first.release()
    first.release()  # a second release does nothing
    with RunLock(tmp_path):
        pass


def test_the_holder_may_release_from_another_thread(tmp_path):
    lock = RunLock(tmp_path).acquire()
    releaser = threading.Thread(target=lock.release)
    releaser.start()
    releaser.join(30)
    with RunLock(tmp_path):
        pass


def test_a_folder_that_cannot_hold_a_lock(tmp_path):
    with pytest.raises(RunFolderError, match=r"^cannot lock the run folder .*nowhere: no such folder$"):
        RunLock(tmp_path / "nowhere").acquire()
    assert listing(tmp_path) == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(RunFolderError, match=r"^cannot lock the run folder .*file: no such folder$"):
        RunLock(tmp_path / "file").acquire()


def test_lock_files_are_not_mistaken_for_temporaries(tmp_path):
    with RunLock(tmp_path):
        assert remove_stale_temporaries(tmp_path) == []
        assert listing(tmp_path) == sorted([files.LOCK_FILE, files.OWNER_FILE])


# --- read_text --------------------------------------------------------------------------------------


def test_read_text(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"lr": 0.5}\n', encoding="utf-8")
    assert read_text(path, "config") == '{"lr": 0.5}\n'
    with pytest.raises(CheckpointError, match=r"^no config at .*nothing\.json$"):
        read_text(tmp_path / "nothing.json", "config")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(
        CheckpointError, match=r"json is damaged or not a gpunn config \(not UTF-8 text: byte"
    ):
        read_text(path, "config")
    path.write_bytes(b"x" * 101)
    with pytest.raises(CheckpointError, match=r"not a gpunn metrics log \(more than 100 bytes\)$"):
        read_text(path, "metrics log", max_bytes=100)
    with pytest.raises(CheckpointError, match=r"^cannot read .*: a folder, not a file$"):
        read_text(tmp_path, "config")


# --- read_npz ---------------------------------------------------------------------------------------


def checkpoint_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "W1": rng.standard_normal((4, 3)).astype(np.float32),
        "b1": np.zeros(4),
        "meta": np.asarray(json.dumps({"format": "gpunn-checkpoint-1", "iteration": 3})),
    }


def npz_bytes(arrays=None, compressed=False) -> bytes:
    buffer = io.BytesIO()
    save = np.savez_compressed if compressed else np.savez
    save(buffer, **(checkpoint_arrays() if arrays is None else arrays))
    return buffer.getvalue()


def assert_checkpoint(arrays: dict) -> None:
    expected = checkpoint_arrays()
    assert sorted(arrays) == sorted(expected)
    for name, array in expected.items():
        assert arrays[name].dtype == array.dtype and np.array_equal(arrays[name], array)


@pytest.mark.parametrize("compressed", [False, True])
def test_reads_a_checkpoint(tmp_path, compressed):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(npz_bytes(compressed=compressed))
    assert_checkpoint(read_npz(path))


def test_a_missing_file_names_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match=r"^no checkpoint at .*ckpt\.npz$"):
        read_npz(tmp_path / "ckpt.npz")
    with pytest.raises(CheckpointError, match=r"^no saved model at .*model\.npz$"):
        read_npz(tmp_path / "model.npz", what="saved model")


def central_entries(data: bytes) -> list[int]:
    """Offsets of the central-directory entries of a zip file."""
    at, found = 0, []
    while (at := data.find(b"PK\x01\x02", at)) != -1:
        found.append(at)
        at += 4
    return found


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def damaged_message(tmp_path: Path, data: bytes, **kwargs) -> str:
    path = tmp_path / "damaged.npz"
    path.write_bytes(data)
    before = path.stat().st_mtime_ns
    with pytest.raises(CheckpointError) as info:
        read_npz(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path} is damaged or not a gpunn checkpoint (") and "\n" not in message
    assert path.read_bytes() == data and path.stat().st_mtime_ns == before
    return message


def test_the_errors_one_flipped_bit_used_to_raise(tmp_path):
    data = npz_bytes()
    first = central_entries(data)[0]
    # flag bit 0: numpy.load raised RuntimeError "File 'W1.npy' is encrypted, password required"
    assert "'W1.npy' is encrypted" in damaged_message(tmp_path, patched(data, first + 8, "<H", 1))
    # compression method 99: numpy.load raised NotImplementedError "That compression method is not supported"
    assert "compression method 99" in damaged_message(tmp_path, patched(data, first + 10, "<H", 99))


def test_declared_sizes_are_checked_before_anything_is_read(tmp_path):
    data = npz_bytes()
    first = central_entries(data)[0]
    message = damaged_message(tmp_path, patched(data, first + 24, "<I", 0xFFFFFFF0))
    assert "'W1.npy' holds a 4x3 float32 array in 4294967280 bytes" in message
    assert "more than the 1000-byte limit" in damaged_message(tmp_path, data, max_bytes=1000)
    inflating = npz_bytes({"W1": np.zeros(10_000)}, compressed=True)  # 80 kB in a few hundred bytes
    assert len(inflating) < 2000
    message = damaged_message(tmp_path, inflating, max_bytes=2000)
    assert "members declare more than the 2000-byte limit" in message


def test_a_member_header_promising_gigabytes_is_refused(tmp_path):
    # A .npy whose header claims 10**9 float64 (8 GB) in a small member: refused before any allocation.
    member = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    member["shape"] = (10**9,)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, member)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("W1.npy", head.getvalue() + bytes(64))
    assert "'W1.npy' holds a 1000000000 float64 array in" in damaged_message(tmp_path, buffer.getvalue())
    assert "more than the" in damaged_message(tmp_path, npz_bytes({"W1": np.zeros(200)}), max_bytes=1000)


def test_crc_object_arrays_and_foreign_members_are_refused(tmp_path):
    data = bytearray(npz_bytes())
    data[data.find(b"\x93NUMPY") + 140] ^= 0x01  # inside W1's data: only the CRC can tell
    assert "Bad CRC-32" in damaged_message(tmp_path, bytes(data))
    objects = io.BytesIO()
    np.savez(objects, W1=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "has dtype object" in damaged_message(tmp_path, objects.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("payload.py", "print(1)")
    assert "'payload.py' is not a .npy array" in damaged_message(tmp_path, buffer.getvalue())
    assert "File is not a zip file" in damaged_message(tmp_path, b"not a zip at all")


def test_folders_and_fifos_are_refused_without_waiting(tmp_path):
    with pytest.raises(CheckpointError, match="a folder, not a file"):
        read_npz(tmp_path)
    os.mkfifo(tmp_path / "fifo.npz")
    outcome = []

    def read():
        try:
            read_npz(tmp_path / "fifo.npz")
        except CheckpointError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    assert outcome and outcome[0].endswith("fifo.npz: not a regular file")


@st.composite
def damaged_npz(draw) -> bytes:
    """A small valid checkpoint (stored or deflated), truncated, bit-flipped, overwritten, or random."""
    data = bytearray(npz_bytes(compressed=draw(st.booleans())))
    how = draw(st.sampled_from(["truncate", "flip", "flip", "overwrite", "random"]))
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "flip":
        for bit in draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=6)):
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)
    if how == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        return bytes(data[:at] + patch + data[at + len(patch) :])
    return draw(st.binary(max_size=600))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("npz_fuzz")


def assert_arrays_or_checkpoint_error(path: Path) -> None:
    try:
        arrays = read_npz(path)
    except CheckpointError as exc:
        message = str(exc)
        assert "\n" not in message and "damaged or not a gpunn checkpoint" in message
        return
    for name, array in arrays.items():
        assert isinstance(name, str) and isinstance(array, np.ndarray) and not array.dtype.hasobject


@FUZZ
@given(damaged_npz())
def test_fuzz_damaged_checkpoints(fuzz_dir, data):
    path = fuzz_dir / "checkpoint.npz"
    path.write_bytes(data)
    assert_arrays_or_checkpoint_error(path)
    assert path.read_bytes() == data


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=4)), min_size=1, max_size=4))
def test_fuzz_directory_fields(fuzz_dir, patches):
    # Aim at the central directory and the local headers, where a flipped byte once meant a traceback.
    data = bytearray(npz_bytes())
    local = (i for i in range(len(data)) if data[i : i + 4] == b"PK\x03\x04")
    headers = [*central_entries(bytes(data)), *local]
    for where, patch in patches:
        at = headers[where % len(headers)] + (where // len(headers)) % 46
        data[at : at + len(patch)] = patch
    path = fuzz_dir / "fields.npz"
    path.write_bytes(bytes(data))
    assert_arrays_or_checkpoint_error(path)
