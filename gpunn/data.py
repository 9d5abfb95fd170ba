"""Data on the device, and the MNIST-layout folders the command line reads.

* ``DeviceDataset``: inputs and targets resident on a network's device, checked against it; mini-batches
  gathered (and integer inputs converted and scaled) on the device, in an order that depends only on
  the seed and the epoch (``epoch_order``).
* ``load_idx_dataset``: the four IDX files of a folder (idx.py reads each defensively), cross-checked:
  image count = label count, labels inside 0…M−1 (CuPy would wrap an out-of-range index silently).
* ``resolve_data_dir``: ``--data-dir`` (only read), else ``$GPUNN_DATA_DIR`` (the MNIST files, only
  read), else the named data set's cache, downloaded into by datasets.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy

from .errors import DataError
from .files import display_path
from .idx import find_idx_file, read_idx

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ENV_DATA_DIR = "GPUNN_DATA_DIR"
PIXEL_SCALE = 1 / 255  # the lecture's inputs are the pixels scaled to [0, 1]


# --- IDX folders -------------------------------------------------------------------------------


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
            f"{display_path(labels_path)}: label {labels[bad[0]]} at index {bad[0]} is outside "
            f"0…{num_classes - 1} ({bad.size} such labels; set the number of classes if the dataset has more)"
        )
    n, rows, cols = images.shape
    return Split(images.reshape(n, rows * cols), labels, (rows, cols))


def load_idx_dataset(folder: Path, num_classes: int = 10) -> tuple[Split, Split]:
    """(train, val) from the four MNIST-layout files in ``folder``; both must share an image size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {display_path(folder)} does not exist")
    train, val = load_split(folder, "train", num_classes), load_split(folder, "val", num_classes)
    if train.image_shape != val.image_shape:
        raise DataError(
            f"training images are {train.image_shape[0]}x{train.image_shape[1]} but validation "
            f"images are {val.image_shape[0]}x{val.image_shape[1]}"
        )
    return train, val


def resolve_data_dir(data_dir=None, dataset: str | None = None, progress: bool = True) -> Path:
    """The folder to read: ``data_dir``; else, for MNIST (``dataset`` None or "mnist"),
    ``$GPUNN_DATA_DIR``; else the data set's cache, downloaded into (datasets.fetch). The first two
    are only read, never written."""
    given = [(data_dir, "--data-dir")]
    if dataset in (None, "mnist"):
        given.append((os.environ.get(ENV_DATA_DIR), ENV_DATA_DIR))
    for folder, origin in given:
        if folder:
            folder = Path(folder).expanduser()
            if not folder.is_dir():
                raise DataError(f"{origin} {display_path(folder)} is not a folder")
            return folder
    from . import datasets

    return datasets.fetch(dataset or "mnist", progress=progress)


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
    """A data set resident on a network's device, uploaded once and checked against the network.

    X (n, p) of any real dtype, NumPy or CuPy: float inputs are stored in the network's float type and
    used as given (times ``input_scale`` if one is given, applied once at upload); integer inputs
    (uint8 images) stay as they are, compact (one byte per pixel), and each mini-batch is converted to
    floats and multiplied by ``input_scale`` when it is gathered (the MNIST paths pass PIXEL_SCALE).
    y: the network's targets (see ``MLP.targets``: int32 labels, 0/1 floats, or (n, U_L) values).
    Wrong shapes, non-finite values and labels outside 0…M−1 raise ValueError naming the first bad row.
    """

    def __init__(self, net, X, y, input_scale: float | None = None):
        if input_scale is not None and not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a finite number > 0; got {input_scale!r}")
        device, p = net.device, net.sizes[0]
        self.device, self.xp, self.dtype = device, device.xp, net.dtype
        X = device.asarray(X)
        if X.ndim != 2 or X.shape[1] != p or X.dtype.kind not in "biuf":
            raise ValueError(f"X must be real numbers of shape (n, {p}); got {X.dtype} {X.shape}")
        if X.shape[0] == 0:
            raise ValueError("X holds no rows")
        self.integer_inputs = X.dtype.kind in "biu"
        if self.integer_inputs:
            self.X = self.xp.ascontiguousarray(X.astype(numpy.uint8) if X.dtype.kind == "b" else X)
            self.scale = 1.0 if input_scale is None else float(input_scale)
        else:
            self.X = net.inputs(X, input_scale)  # checked: every value finite
            self.X = self.xp.ascontiguousarray(self.X)
            self.scale = 1.0
        self.n = self.X.shape[0]
        self.p = p
        self.y = net.targets(y, self.n)

    @property
    def nbytes(self) -> int:
        return int(self.X.nbytes + self.y.nbytes)

    def order(self, seed: int, epoch: int, batch_size: int | None = None):
        """This epoch's permutation (see ``epoch_order``), copied to the device once per epoch."""
        return self.device.asarray(epoch_order(seed, epoch, self.n, batch_size))

    def buffers(self, n: int) -> tuple:
        """(X, y, staging) for mini-batches of n rows: the float inputs, the targets, and (for integer
        inputs) the gathered raw rows before conversion."""
        xp = self.xp
        staging = xp.empty((n, self.p), dtype=self.X.dtype) if self.integer_inputs else None
        return (
            xp.empty((n, self.p), dtype=self.dtype),
            xp.empty((n, *self.y.shape[1:]), self.y.dtype),
            staging,
        )

    def batch(self, rows, X=None, y=None, staging=None, raw: bool = False):
        """The mini-batch at ``rows`` (a slice, or an index array on the device whose entries lie in
        0…n−1, unchecked): X (n_b, p) and y. ``X``/``y``/``staging`` are optional buffers (see
        ``buffers``); X may be a strided view, the rows are then gathered into ``staging`` (contiguous,
        of the stored type) first. ``raw=True`` leaves integer inputs unscaled, for a caller that
        applies ``scale`` itself (the CPU engine folds it into its first product)."""
        xp = self.xp
        n = rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]
        if X is None:
            X, y, staging = self.buffers(n)
        if staging is None and self.integer_inputs:
            staging = xp.empty((n, self.p), dtype=self.X.dtype)
        source = X if staging is None else staging
        if isinstance(rows, slice):
            xp.copyto(source, self.X[rows])
            xp.copyto(y, self.y[rows])
        else:  # NumPy's default mode="raise" would copy through a buffer; the rows are valid indices
            mode = {"mode": "clip"} if not self.device.is_cuda else {}
            xp.take(self.X, rows, axis=0, out=source, **mode)
            xp.take(self.y, rows, axis=0, out=y, **mode)
        scale = 1.0 if raw else self.scale
        if source is not X:
            if self.device.is_cuda and scale != 1.0:  # one kernel
                xp.multiply(source, X.dtype.type(scale), out=X)
                return X, y
            xp.copyto(X, source)  # NumPy: a plain cast and an in-place scale beat one mixed-type multiply
        if scale != 1.0:
            X *= X.dtype.type(scale)
        return X, y
