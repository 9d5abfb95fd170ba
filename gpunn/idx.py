"""IDX files, the layout of MNIST, read without trusting a byte of them.

An IDX file of unsigned bytes is a 4-byte magic number ``00 00 08 NDIM``, NDIM big-endian uint32
dimensions, then their product of bytes, row-major. ``read_idx`` checks all of it before it believes
any of it: header arithmetic is exact (Python integers), a header promising more than ``MAX_IDX_BYTES``
is refused, a raw file's size is compared with its header before the data is read, and a ``.gz`` is
decompressed as a stream that stops one byte past what the header promises, so a small file that
inflates to gigabytes fails fast in little memory. Every defect is a DataError, one line naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy

from .errors import DataError
from .files import display_path, open_regular, reason_of

MAX_IDX_BYTES = 8 << 30  # MNIST's training images are 47 MB; 8 GiB fits any dataset this package trains on
_IDX_UBYTE = 0x08
_CHUNK = 16 << 20  # what a .gz read holds beyond the array itself


def find_idx_file(folder: str | os.PathLike, name: str) -> Path:
    """The file for ``name`` in ``folder``: ``name``, ``name.gz``, or the original ``.idx`` spelling
    (``train-images.idx3-ubyte``) and its ``.gz``; DataError if none is there."""
    folder = Path(folder)
    dotted = name.replace("-idx", ".idx")
    try:
        for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
            if (folder / candidate).is_file():
                return folder / candidate
    except OSError as exc:  # is_file() passes on EACCES, for one
        raise DataError(f"cannot read {display_path(folder)}: {reason_of(exc)}") from None
    raise DataError(f"missing {name}[.gz] in {display_path(folder)}")


def read_idx(path: str | os.PathLike, ndim: int) -> numpy.ndarray:
    """The uint8 array, of the stored shape (``ndim`` dimensions), in the IDX file ``path``
    (gzip-compressed when its name ends in ``.gz``), after checking that its magic number, its
    dimensions and its exact byte length agree. DataError naming the file otherwise; the file is only
    read."""
    path = Path(path)
    where = display_path(path)
    try:
        with open_regular(path) as f:
            if path.suffix != ".gz":
                return _read_idx_stream(f, ndim, where, os.fstat(f.fileno()).st_size)
            with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                return _read_idx_stream(stream, ndim, where, None)
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        raise DataError(f"cannot read {where}: {reason_of(exc)}") from None
    except MemoryError:
        raise DataError(f"cannot read {where}: not enough memory for its array") from None


def _read_idx_stream(f: BinaryIO, ndim: int, where: str, size: int | None) -> numpy.ndarray:
    """The array of the IDX stream ``f``; ``size`` is its length when known (a raw file), None for a
    decompressing stream."""
    header = 4 + 4 * ndim
    head = _read_up_to(f, header)
    if len(head) >= 4 and (head[0], head[1], head[2], head[3]) != (0, 0, _IDX_UBYTE, ndim):
        raise DataError(
            f"{where}: bad IDX magic number 0x{head[:4].hex()}; expected 0x000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(head) < header:
        raise DataError(f"{where}: {len(head)} bytes is too short for an IDX header")
    shape = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dims, count = "x".join(map(str, shape)), math.prod(shape)
    expected = header + count

    def mismatch(actual: int) -> DataError:
        return DataError(
            f"{where}: header says {dims} items, which needs {expected} bytes; the file has {actual}"
        )

    if count == 0:
        raise DataError(f"{where}: header says {dims} items; a dataset needs at least one")
    if size is not None and size != expected:
        raise mismatch(size)
    if expected > MAX_IDX_BYTES:
        raise DataError(
            f"{where}: header says {dims} items, {expected} bytes in all; gpunn reads IDX files of at "
            f"most {MAX_IDX_BYTES} bytes"
        )
    data = numpy.empty(count, dtype=numpy.uint8)
    got = _read_into(f, data)
    if got < count:
        raise mismatch(header + got)
    if f.read(1):  # for a .gz, also the read that reaches the end, where gzip checks the CRC
        if size is not None:  # the file grew while it was read
            raise mismatch(os.fstat(f.fileno()).st_size)
        raise DataError(
            f"{where}: decompresses to more than its header promises ({dims} items, which needs "
            f"{expected} bytes)"
        )
    return data.reshape(shape)


def _read_up_to(f: BinaryIO, n: int) -> bytes:
    """``n`` bytes of ``f``, or fewer at its end."""
    parts, left = [], n
    while left:
        part = f.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _read_into(f: BinaryIO, out: numpy.ndarray) -> int:
    """Fill the uint8 array ``out`` from ``f`` in bounded chunks; how many bytes there were."""
    view, filled = memoryview(out), 0
    while filled < len(view):
        got = f.readinto(view[filled : filled + _CHUNK])
        if not got:
            break
        filled += got
    return filled
