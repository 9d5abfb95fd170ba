"""Test helpers: IDX files written by hand, and a small synthetic digit set."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, magic: bytes | None = None, dims=None, extra: bytes = b"") -> bytes:
    """The IDX encoding of a uint8 array; ``magic``/``dims``/``extra`` forge broken files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = bytes([0, 0, 0x08, array.ndim]) if magic is None else magic
    dims = array.shape if dims is None else dims
    header = magic + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return header + array.tobytes() + extra


def write_idx(path: Path, array: np.ndarray, **forge) -> Path:
    data = idx_bytes(array, **forge)
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_digits(n: int, seed: int, size: int = 28, classes: int = 10):
    """(images (n, size, size) uint8, labels (n,) uint8): each class lights its own block of pixels,
    with noise and a random shift, so a small network learns it in a few epochs but not in one step."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.float64)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 4)
        dr, dc = rng.integers(-1, 2, 2)
        r0, c0 = 2 + 7 * r + dr, 2 + 6 * col + dc
        images[i, max(r0, 0) : r0 + 6, max(c0, 0) : c0 + 5] += rng.uniform(40, 100)
    return np.clip(images, 0, 255).astype(np.uint8), labels
