"""MNIST-layout datasets: IDX files read and checked, fetched into a cache, and kept on the device.

* ``read_idx`` / ``load_idx_dataset``: the four IDX files of a folder (``.gz`` or not), validated before
  anything reaches the device: magic number, dimensions, exact byte length, image count = label count,
  labels inside 0…M−1 (CuPy would wrap an out-of-range index without a word).
* ``resolve_data_dir``: ``--data-dir`` (read-only), else ``$GPUNN_DATA_DIR``, else the cache
  ``$XDG_CACHE_HOME/gpunn/mnist`` (default ``~/.cache/gpunn/mnist``), filled by ``fetch_mnist`` from a
  public mirror with a fallback, behind a checksum.
* ``DeviceDataset``: a split uploaded once as uint8; mini-batches are gathered and scaled to [0, 1]
  on the device, in an order that depends only on the seed and the epoch (``epoch_order``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy

from .backend import Device
from .errors import DataError

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# sha256 of the decompressed files (identical to the published MNIST); the .gz wrappers vary by mirror.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
ENV_DATA_DIR = "GPUNN_DATA_DIR"
PIXEL_SCALE = 1 / 255  # the lecture's inputs are the pixels scaled to [0, 1]
_IDX_UBYTE = 0x08


# --- IDX files ---------------------------------------------------------------------------------


def find_idx_file(folder: Path, name: str) -> Path:
    """The file for ``name`` in ``folder``: ``name``, ``name.gz``, or the original ``.idx`` spelling."""
    folder = Path(folder)
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise DataError(f"missing {name}[.gz] in {folder}")


def read_idx(path: Path, ndim: int) -> numpy.ndarray:
    """The uint8 array stored in the IDX file ``path`` (gzip-compressed or not), after checking that
    its magic number, its ``ndim`` dimensions and its exact byte length agree."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    header = 4 + 4 * ndim
    if len(raw) >= 4 and (raw[0], raw[1], raw[2], raw[3]) != (0, 0, _IDX_UBYTE, ndim):
        raise DataError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(numpy.prod(shape, dtype=numpy.int64))
    if len(raw) != expected or 0 in shape:
        raise DataError(
            f"{path}: header says {'x'.join(map(str, shape))} items, which needs {expected} bytes; "
            f"the file has {len(raw)}"
        )
    return numpy.frombuffer(raw, dtype=numpy.uint8, offset=header).reshape(shape)


@dataclass
class Split:
    """One split on the host: images X (n, p) uint8, flattened row-major, and labels y (n,) uint8."""

    X: numpy.ndarray
    y: numpy.ndarray
    image_shape: tuple[int, int]


def load_split(folder: Path, split: str, num_classes: int = 10) -> Split:
    """Read and cross-check the images and labels of ``split`` ("train" or "val") in ``folder``."""
    images_name, labels_name = SPLITS[split]
    images_path, labels_path = find_idx_file(folder, images_name), find_idx_file(folder, labels_name)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path.name} holds {images.shape[0]} images but {labels_path.name} holds "
            f"{labels.shape[0]} labels"
        )
    bad = numpy.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(
            f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} is outside 0…{num_classes - 1} "
            f"({bad.size} such labels; set the number of classes if the dataset has more)"
        )
    n, rows, cols = images.shape
    return Split(images.reshape(n, rows * cols), labels, (rows, cols))


def load_idx_dataset(folder: Path, num_classes: int = 10) -> tuple[Split, Split]:
    """(train, val) from the four MNIST-layout files in ``folder``; both must share an image size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    train, val = load_split(folder, "train", num_classes), load_split(folder, "val", num_classes)
    if train.image_shape != val.image_shape:
        raise DataError(
            f"training images are {train.image_shape[0]}x{train.image_shape[1]} but validation "
            f"images are {val.image_shape[0]}x{val.image_shape[1]}"
        )
    return train, val


# --- where the data comes from -----------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpunn" / "mnist"


def resolve_data_dir(data_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The folder to read: ``data_dir``, else ``$GPUNN_DATA_DIR``, else the cache (downloaded into).

    The first two are only read, never written.
    """
    for given, origin in ((data_dir, "--data-dir"), (os.environ.get(ENV_DATA_DIR), ENV_DATA_DIR)):
        if given:
            folder = Path(given).expanduser()
            if not folder.is_dir():
                raise DataError(f"{origin} {folder} is not a folder")
            return folder
    folder = cache_dir()
    fetch_mnist(folder, progress=progress)
    return folder


def _sha256_of_content(path: Path, compressed: bool | None = None) -> str:
    """sha256 of a file's content, decompressed when it is gzip (by default: named .gz)."""
    digest = hashlib.sha256()
    compressed = path.suffix == ".gz" if compressed is None else compressed
    opener = gzip.open if compressed else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_mnist(
    folder: Path,
    mirrors=None,
    checksums=None,
    progress: bool = True,
    timeout: float = 30.0,
) -> None:
    """Download each missing ``NAME.gz`` of ``checksums`` into ``folder``, trying ``mirrors`` in order.

    Each file goes to a temporary file in ``folder`` and is renamed into place only after the sha256 of
    its decompressed content matches; a failed or interrupted download leaves nothing behind.
    """
    folder = Path(folder)
    mirrors = MNIST_MIRRORS if mirrors is None else mirrors
    checksums = MNIST_SHA256 if checksums is None else checksums
    missing = [name for name in checksums if not (folder / (name + ".gz")).is_file()]
    if not missing:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data cache {folder}: {exc.strerror}") from None
    for name in missing:
        failures = []
        for mirror in mirrors:
            url = mirror + name + ".gz"
            try:
                _download_verified(url, folder / (name + ".gz"), checksums[name], progress, timeout)
                break
            except (OSError, HTTPException, EOFError, zlib.error, ValueError) as exc:
                failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
        else:
            raise DataError(
                f"could not download {name}.gz ({'; '.join(failures)}); without internet access, "
                f"pass --data-dir DIR or set {ENV_DATA_DIR} to a folder holding the four MNIST files"
            )


def _download_verified(url: str, target: Path, sha256: str, progress: bool, timeout: float):
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress_bar(total, target.name, progress) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
        got = _sha256_of_content(tmp, compressed=True)
        if got != sha256:
            raise ValueError(f"checksum mismatch (sha256 {got[:12]}…, expected {sha256[:12]}…)")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _progress_bar(total, name, enabled):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"downloading {name}",
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )


# --- on the device -----------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, n: int, batch_size: int | None = None) -> numpy.ndarray:
    """The permutation of 0…n−1 that epoch ``epoch`` visits: a function of its arguments alone, drawn
    on the host, so every device and every resumed run sees the same order.

    With ``batch_size``, each consecutive slice of ``batch_size`` (one mini-batch) is sorted: the
    mini-batches are the same sets, and gathering each in address order is faster (about 5 % of a
    step here); the order of rows inside a mini-batch changes neither J nor ∇J, sums over rows.
    """
    order = numpy.random.default_rng((int(seed), int(epoch))).permutation(n)
    if batch_size:
        full = n - n % batch_size
        order[:full].reshape(-1, batch_size).sort(axis=1)
        order[full:].sort()
    return order


class DeviceDataset:
    """A split resident on ``device``: X (n, p) uint8 and y (n,) int32, uploaded once.

    Inputs are scaled to [0, 1] in the lecture's float type only per mini-batch (``batch``), so the
    dataset costs one byte per pixel of device memory.
    """

    def __init__(self, X: numpy.ndarray, y: numpy.ndarray, device: Device):
        self.device, self.xp = device, device.xp
        self.X = device.asarray(numpy.ascontiguousarray(X, dtype=numpy.uint8))
        self.y = device.asarray(numpy.asarray(y, dtype=numpy.int32))
        self.n, self.p = self.X.shape

    @property
    def nbytes(self) -> int:
        return int(self.X.nbytes + self.y.nbytes)

    def order(self, seed: int, epoch: int, batch_size: int | None = None):
        """This epoch's permutation (see ``epoch_order``), copied to the device once per epoch."""
        return self.device.asarray(epoch_order(seed, epoch, self.n, batch_size))

    def batch(self, rows, X=None, y=None, staging=None, raw: bool = False):
        """The mini-batch at ``rows`` (a slice, or an index array on the device whose entries lie in
        0…n−1, unchecked): X (n_b, p) in [0, 1] and y (n_b,). ``X``/``y``/``staging`` (uint8, like X)
        are optional preallocated buffers. ``raw=True`` leaves X in 0…255, for a caller that applies
        PIXEL_SCALE itself."""
        xp = self.xp
        if isinstance(rows, slice):
            pixels, labels = self.X[rows], self.y[rows]
            if y is not None:
                xp.copyto(y, labels)
                labels = y
        elif self.device.is_cuda:
            pixels = xp.take(self.X, rows, axis=0, out=staging)
            labels = xp.take(self.y, rows, out=y)
        else:  # the rows come from a permutation; NumPy's default mode="raise" would copy through a buffer
            pixels = xp.take(self.X, rows, axis=0, out=staging, mode="clip")
            labels = xp.take(self.y, rows, out=y, mode="clip")
        if X is None:
            X = xp.empty(pixels.shape, dtype=numpy.float32)
        if self.device.is_cuda and not raw:  # one kernel
            return xp.multiply(pixels, X.dtype.type(PIXEL_SCALE), out=X), labels
        xp.copyto(X, pixels)  # NumPy: a plain cast and an in-place scale beat one mixed-type multiply
        if not raw:
            X *= X.dtype.type(PIXEL_SCALE)
        return X, labels
