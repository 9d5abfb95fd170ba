"""IDX files read defensively: the checks and messages of gpunn.data's reader, exact header arithmetic,
a size cap, bounded gzip decompression, and fuzzing that finds nothing but DataError."""

from __future__ import annotations

import gzip
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpunn
from gpunn import idx
from gpunn.idx import find_idx_file, read_idx

from helpers import idx_bytes, make_digits, write_idx

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(params=["", ".gz"], ids=["raw", "gz"])
def suffix(request) -> str:
    return request.param


def test_finds_each_spelling_and_names_what_is_missing(tmp_path):
    for stored in ("a-idx1-ubyte", "a-idx1-ubyte.gz", "a.idx1-ubyte", "a.idx1-ubyte.gz"):
        folder = tmp_path / stored
        folder.mkdir()
        (folder / stored).write_bytes(b"")
        assert find_idx_file(folder, "a-idx1-ubyte") == folder / stored
    (tmp_path / "empty" / "a-idx1-ubyte").mkdir(parents=True)  # a folder of that name is not the file
    with pytest.raises(gpunn.DataError, match=r"^missing a-idx1-ubyte\[\.gz\] in .*empty$"):
        find_idx_file(tmp_path / "empty", "a-idx1-ubyte")


@pytest.mark.parametrize("ndim", [1, 3])
def test_reads_raw_and_gzip(tmp_path, suffix, ndim):
    array = make_digits(7, 0, size=5)[0] if ndim == 3 else np.arange(9, dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / f"x{suffix}", array), ndim)
    assert got.dtype == np.uint8 and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        ({"magic": b"\x00\x00\x08\x02"}, r"bad IDX magic number 0x00000802; expected 0x00000803 \(unsigned"),
        ({"magic": b"\x00\x00\x0d\x03"}, "bad IDX magic number 0x00000d03"),
        ({"dims": (30, 28, 29)}, "header says 30x28x29 items, which needs 24376 bytes; the file has 23536$"),
    ],
)
def test_the_messages_of_gpunn_data(tmp_path, suffix, forge, message):
    path = write_idx(tmp_path / f"images{suffix}", make_digits(30, 0)[0], **forge)
    with pytest.raises(gpunn.DataError, match=message) as info:
        read_idx(path, 3)
    assert str(info.value).startswith(f"{path}: ")


def test_trailing_bytes_of_a_raw_file_and_of_a_gzip(tmp_path):
    images = make_digits(30, 0)[0]
    with pytest.raises(gpunn.DataError, match=r"needs 23536 bytes; the file has 23537$"):
        read_idx(write_idx(tmp_path / "raw", images, extra=b"\x00"), 3)
    with pytest.raises(gpunn.DataError, match=r"decompresses to more than its header promises \(30x28x28"):
        read_idx(write_idx(tmp_path / "packed.gz", images, extra=b"\x00"), 3)


def test_too_short_for_a_header_and_broken_gzip(tmp_path):
    (tmp_path / "short").write_bytes(b"\x00\x00\x08")
    with pytest.raises(gpunn.DataError, match=r"short: 3 bytes is too short for an IDX header$"):
        read_idx(tmp_path / "short", 1)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(idx_bytes(np.arange(100)))[:-8])
    with pytest.raises(gpunn.DataError, match=r"^cannot read .*cut\.gz: Compressed file ended"):
        read_idx(tmp_path / "cut.gz", 1)
    (tmp_path / "plain.gz").write_bytes(idx_bytes(np.arange(100)))
    with pytest.raises(gpunn.DataError, match=r"^cannot read .*plain\.gz: Not a gzipped file"):
        read_idx(tmp_path / "plain.gz", 1)


def test_missing_file_folder_and_fifo_are_one_line_errors(tmp_path):
    with pytest.raises(gpunn.DataError, match=r"^cannot read .*nowhere: No such file or directory$"):
        read_idx(tmp_path / "nowhere", 1)
    with pytest.raises(gpunn.DataError, match=r"^cannot read .*: a folder, not a file$"):
        read_idx(tmp_path, 1)
    os.mkfifo(tmp_path / "fifo")  # opening it for reading the plain way would wait for a writer forever
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(read_idx, tmp_path / "fifo", 1)))
    reader.daemon = True
    reader.start()
    reader.join(20)
    assert outcome and "fifo: not a regular file" in outcome[0]


def _error_of(function, *args) -> str:
    try:
        function(*args)
    except gpunn.DataError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("dims", [(2**31,) * 3, (2**32 - 1,) * 3, (2**16,) * 3])
def test_header_arithmetic_cannot_overflow(tmp_path, suffix, dims):
    # numpy.prod in int64 wrapped these around (2**93 is 0 mod 2**64) and reshape raised a ValueError.
    path = write_idx(tmp_path / f"huge{suffix}", np.zeros((1, 1, 1), np.uint8), dims=dims)
    items = "x".join(map(str, dims))
    with pytest.raises(gpunn.DataError) as info:
        read_idx(path, 3)
    message = str(info.value)
    assert message.startswith(f"{path}: header says {items} items") and "\n" not in message
    assert str(16 + dims[0] * dims[1] * dims[2]) in message


def test_a_header_beyond_the_cap_is_refused_before_reading(tmp_path, suffix, monkeypatch):
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 1000)
    path = write_idx(tmp_path / f"big{suffix}", np.zeros((3, 20, 20), np.uint8))
    with pytest.raises(gpunn.DataError, match=r"3x20x20 items, 1216 bytes in all; gpunn reads IDX files of"):
        read_idx(path, 3)
    small = write_idx(tmp_path / f"small{suffix}", np.zeros((2, 20, 20), np.uint8))
    assert read_idx(small, 3).shape == (2, 20, 20)


def test_a_raw_file_is_measured_before_it_is_read(tmp_path):
    # A sparse 1 GiB file whose header promises 1584 bytes: the old reader loaded all of it first.
    path = write_idx(tmp_path / "sparse", np.zeros((2, 28, 28), np.uint8))
    with path.open("r+b") as f:
        f.truncate(1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(gpunn.DataError, match=f"needs 1584 bytes; the file has {1 << 30}$"):
            read_idx(path, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes held to refuse a file by its size"


def gzip_bomb(header_and_data: bytes, zero_mib: int) -> bytes:
    """A small gzip file (multi-member, as gzip allows) that inflates to ``header_and_data`` followed by
    ``zero_mib`` MiB of zeros."""
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)
    return gzip.compress(header_and_data) + zeros * zero_mib


def test_a_gzip_bomb_fails_fast_in_little_memory(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip_bomb(idx_bytes(np.arange(1000) % 10), zero_mib=1024))  # 1 GiB from ~1 MB
    tracemalloc.start()
    try:
        with pytest.raises(gpunn.DataError, match=r"labels\.gz: decompresses to more than its header"):
            read_idx(path, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak} bytes held while refusing a 1 GiB gzip bomb"


def test_a_gzip_shorter_than_its_header_promises(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(10), dims=(12,))))
    with pytest.raises(gpunn.DataError, match=r"says 12 items, which needs 20 bytes; the file has 18$"):
        read_idx(path, 1)


def test_zero_items_and_undecodable_names(tmp_path):
    with pytest.raises(gpunn.DataError, match=r"header says 0x28x28 items; a dataset needs at least one$"):
        read_idx(write_idx(tmp_path / "none", np.zeros((0, 28, 28), np.uint8)), 3)
    bad = tmp_path / os.fsdecode(b"caf\xe9-\xff")
    write_idx(bad, np.zeros(3, np.uint8), magic=b"\x00\x00\x08\x03")
    with pytest.raises(gpunn.DataError) as info:
        read_idx(bad, 1)
    message = str(info.value)
    assert "caf\\xe9-\\xff: bad IDX magic number" in message
    message.encode("ascii")  # printable to any stream


def test_the_file_is_left_untouched(tmp_path, suffix):
    path = write_idx(tmp_path / f"bad{suffix}", np.arange(5, dtype=np.uint8), dims=(6,))
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    with pytest.raises(gpunn.DataError):
        read_idx(path, 1)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime


# --- fuzzing: the only outcomes are an array that matches its header, or a DataError ----------------


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("idx_fuzz")


def idx_files(draw) -> tuple[bytes, int]:
    ndim = draw(st.sampled_from([1, 3]))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    size = int(np.prod(shape))
    array = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8)
    return idx_bytes(array.reshape(shape)), ndim


@st.composite
def damaged_idx(draw) -> tuple[bytes, int]:
    """A valid IDX file truncated, bit-flipped, overwritten or extended, or random bytes outright."""
    data, ndim = idx_files(draw)
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "extend", "random"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "flip":
        flipped = bytearray(data)
        for bit in draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=4)):
            flipped[bit // 8] ^= 1 << (bit % 8)
        data = bytes(flipped)
    elif how == "overwrite":
        at = draw(st.integers(0, len(data)))
        patch = draw(st.binary(min_size=1, max_size=8))
        data = data[:at] + patch + data[at + len(patch) :]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=8))
    else:
        data = draw(st.binary(max_size=64))
    return data, ndim


def assert_array_or_data_error(path: Path, ndim: int, content: bytes | None) -> None:
    """``content``: the decompressed bytes when known, to check a successful read against."""
    try:
        array = read_idx(path, ndim)
    except gpunn.DataError as exc:
        assert "\n" not in str(exc)
        return
    assert array.dtype == np.uint8 and array.ndim == ndim and array.size > 0
    if content is not None:
        assert content[:4] == bytes([0, 0, 8, ndim])
        dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        assert array.shape == dims and array.tobytes() == content[4 + 4 * ndim :]


@FUZZ
@given(damaged_idx())
def test_fuzz_raw(fuzz_dir, case):
    data, ndim = case
    path = fuzz_dir / "raw"
    path.write_bytes(data)
    assert_array_or_data_error(path, ndim, data)


@FUZZ
@given(damaged_idx())
def test_fuzz_gzip_of_damaged_content(fuzz_dir, case):
    data, ndim = case
    path = fuzz_dir / "content.gz"
    path.write_bytes(gzip.compress(data, mtime=0))
    assert_array_or_data_error(path, ndim, data)


@st.composite
def damaged_gzip(draw) -> tuple[bytes, int]:
    """The gzip of a valid IDX file, its compressed bytes truncated, bit-flipped or overwritten."""
    data, ndim = idx_files(draw)
    packed = bytearray(gzip.compress(data, mtime=0))
    how = draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    if how == "truncate":
        return bytes(packed[: draw(st.integers(0, len(packed) - 1))]), ndim
    if how == "flip":
        for bit in draw(st.lists(st.integers(0, 8 * len(packed) - 1), min_size=1, max_size=4)):
            packed[bit // 8] ^= 1 << (bit % 8)
        return bytes(packed), ndim
    at = draw(st.integers(0, len(packed) - 1))
    patch = draw(st.binary(min_size=1, max_size=8))
    return bytes(packed[:at]) + patch + bytes(packed[at + len(patch) :]), ndim


@FUZZ
@given(damaged_gzip())
def test_fuzz_damaged_gzip(fuzz_dir, case):
    packed, ndim = case
    path = fuzz_dir / "packed.gz"
    path.write_bytes(packed)
    assert_array_or_data_error(path, ndim, None)


@FUZZ
@given(st.binary(max_size=96), st.sampled_from([1, 3]))
def test_fuzz_random_bytes_named_gz(fuzz_dir, data, ndim):
    path = fuzz_dir / "random.gz"
    path.write_bytes(data)
    assert_array_or_data_error(path, ndim, None)
