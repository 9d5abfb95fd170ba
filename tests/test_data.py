"""MNIST-layout data: IDX folders cross-checked, the data-folder order, the device-resident data set.
(IDX files themselves: test_idx.py; downloads: test_datasets.py.)"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

import gpunn
from gpunn import data, datasets
from gpunn.data import DeviceDataset, epoch_order, load_idx_dataset, resolve_data_dir
from gpunn.idx import read_idx

from helpers import idx_bytes, make_digits, write_idx

NAMES = [name for pair in data.SPLITS.values() for name in pair]


def write_dataset(folder: Path, n_train=30, n_val=10, labels=None, gz=False, size=28) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (Xtr, ytr), (Xva, yva) = make_digits(n_train, 0, size=size), make_digits(n_val, 1, size=size)
    if labels is not None:
        ytr = labels
    suffix = ".gz" if gz else ""
    for name, array in zip(NAMES, (Xtr, ytr, Xva, yva)):
        write_idx(folder / (name + suffix), array)
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_reads_a_dataset(tmp_path, gz):
    write_dataset(tmp_path, gz=gz)
    train, val = load_idx_dataset(tmp_path)
    assert train.X.shape == (30, 784) and train.X.dtype == np.uint8 and train.y.shape == (30,)
    assert val.X.shape == (10, 784) and train.image_shape == (28, 28)
    np.testing.assert_array_equal(train.X.reshape(30, 28, 28), make_digits(30, 0)[0])


def test_reads_the_original_dotted_names_and_other_image_sizes(tmp_path):
    write_dataset(tmp_path, size=12)
    for name in NAMES:
        (tmp_path / name).rename(tmp_path / name.replace("-idx", ".idx"))
    train, _ = load_idx_dataset(tmp_path)
    assert train.X.shape == (30, 144)


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        ({"magic": b"\x00\x00\x08\x02"}, "bad IDX magic number 0x00000802; expected 0x00000803"),
        ({"magic": b"\x00\x00\x0d\x03"}, "bad IDX magic number"),  # floats, not unsigned bytes
        ({"magic": b"\x01\x00\x08\x03"}, "bad IDX magic number"),
        ({"dims": (30, 28, 29)}, "30x28x29 items, which needs 24376 bytes; the file has 23536"),
        ({"extra": b"\x00"}, "needs 23536 bytes; the file has 23537"),
    ],
)
def test_corrupt_image_files_are_refused(tmp_path, forge, message):
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", make_digits(30, 0)[0], **forge)
    with pytest.raises(gpunn.DataError, match=message):
        load_idx_dataset(tmp_path)


def test_truncated_header_and_broken_gzip(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(gpunn.DataError, match="too short for an IDX header"):
        load_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(10, np.uint8)))[:-8]
    )
    with pytest.raises(gpunn.DataError, match=r"cannot read .*t10k-labels-idx1-ubyte\.gz"):
        load_idx_dataset(tmp_path)


def test_missing_file_and_folder(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(gpunn.DataError, match=r"missing t10k-images-idx3-ubyte\[.gz\]"):
        load_idx_dataset(tmp_path)
    with pytest.raises(gpunn.DataError, match="does not exist"):
        load_idx_dataset(tmp_path / "nowhere")


def test_image_and_label_counts_must_agree(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(29, np.uint8))
    with pytest.raises(gpunn.DataError, match="holds 30 images but train-labels-idx1-ubyte holds 29 labels"):
        load_idx_dataset(tmp_path)


def test_labels_must_be_classes(tmp_path):
    labels = np.zeros(30, np.uint8)
    labels[[7, 9]] = [10, 200]
    write_dataset(tmp_path, labels=labels)
    with pytest.raises(gpunn.DataError, match=r"label 10 at index 7 is outside 0…9 \(2 such labels"):
        load_idx_dataset(tmp_path)
    train, _ = load_idx_dataset(tmp_path, num_classes=201)
    assert int(train.y.max()) == 200


def test_train_and_validation_image_sizes_must_agree(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 20, 20), np.uint8))
    with pytest.raises(gpunn.DataError, match="training images are 28x28 but validation images are 20x20"):
        load_idx_dataset(tmp_path)


def test_read_idx_ndim(tmp_path):
    path = write_idx(tmp_path / "x", np.arange(6, dtype=np.uint8))
    assert read_idx(path, 1).tolist() == list(range(6))
    with pytest.raises(gpunn.DataError, match="expected 0x00000803"):
        read_idx(path, 3)


# --- where the data comes from -----------------------------------------------------------------


def test_flag_then_environment_then_cache(tmp_path, monkeypatch):
    flag, env, cache = tmp_path / "flag", tmp_path / "env", tmp_path / "xdg"
    flag.mkdir(), env.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv(data.ENV_DATA_DIR, str(env))
    monkeypatch.setattr(datasets, "_passes", lambda path, dataset, fname: path.is_file())  # synthetic files
    assert resolve_data_dir(flag) == flag
    assert resolve_data_dir(None) == env
    assert resolve_data_dir(None, "mnist") == env
    fashion = cache / "gpunn" / "fashion-mnist"
    write_dataset(fashion, gz=True)
    assert resolve_data_dir(None, "fashion-mnist") == fashion  # $GPUNN_DATA_DIR holds MNIST only
    monkeypatch.delenv(data.ENV_DATA_DIR)
    write_dataset(cache / "gpunn" / "mnist", gz=True)  # a filled cache is used without a download
    assert resolve_data_dir(None, progress=False) == cache / "gpunn" / "mnist"
    with pytest.raises(gpunn.DataError, match=r"--data-dir .* is not a folder"):
        resolve_data_dir(tmp_path / "missing")


# --- on the device -----------------------------------------------------------------------------


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(7, 3, 1000)
    assert sorted(a.tolist()) == list(range(1000))
    np.testing.assert_array_equal(a, epoch_order(7, 3, 1000))
    assert not np.array_equal(a, epoch_order(7, 4, 1000)) and not np.array_equal(a, epoch_order(8, 3, 1000))
    batched = epoch_order(7, 3, 1000, batch_size=64)  # the same mini-batches, each sorted
    for start in range(0, 1000, 64):
        assert batched[start : start + 64].tolist() == sorted(a[start : start + 64].tolist())


def test_device_dataset_keeps_integer_inputs_compact_and_scales_each_batch(device, rng):
    X8, y = rng.integers(0, 256, (50, 12), dtype=np.uint8), rng.integers(0, 10, 50)
    net = gpunn.MLP([12, 10], device=device)
    ds = DeviceDataset(net, X8, y, input_scale=1 / 255)
    assert ds.X.dtype == np.uint8 and ds.nbytes == 50 * 12 + 50 * 4 and ds.scale == pytest.approx(1 / 255)
    order = ds.order(seed=3, epoch=0)
    np.testing.assert_array_equal(gpunn.to_numpy(order), epoch_order(3, 0, 50))
    Xb, yb = ds.batch(order[10:20])
    rows = epoch_order(3, 0, 50)[10:20]
    np.testing.assert_allclose(gpunn.to_numpy(Xb), X8[rows] / 255, rtol=1e-6)
    assert gpunn.to_numpy(yb).tolist() == y[rows].tolist() and Xb.dtype == np.float32
    Xs, ys = ds.batch(slice(45, 50))
    assert Xs.shape == (5, 12) and gpunn.to_numpy(ys).tolist() == y[45:].tolist()
    assert float(Xb.min()) >= 0 and float(Xb.max()) <= 1
    raw, _ = ds.batch(order[10:20], raw=True)  # for an engine that scales inside its products
    np.testing.assert_array_equal(gpunn.to_numpy(raw), X8[rows])


def test_device_dataset_uses_float_inputs_as_given(device, rng):
    """Float inputs of small magnitude were quantised to uint8 (all zeros) by the old loader."""
    X = rng.uniform(0, 0.01, (40, 3))
    net = gpunn.MLP([3, 2], device=device, dtype="float64")
    ds = DeviceDataset(net, X, rng.integers(0, 2, 40))
    assert ds.X.dtype == np.float64 and ds.scale == 1.0
    Xb, _ = ds.batch(ds.order(0, 0)[:7])
    np.testing.assert_array_equal(gpunn.to_numpy(Xb), X[epoch_order(0, 0, 40)[:7]])
    scaled = DeviceDataset(net, X, rng.integers(0, 2, 40), input_scale=100.0)
    np.testing.assert_allclose(gpunn.to_numpy(scaled.X), X * 100, rtol=1e-15)


NAN_IN_ROW_1 = np.where(np.arange(12).reshape(4, 3) == 4, np.nan, 1.0)


@pytest.mark.parametrize(
    ("task", "X", "y", "message"),
    [
        ("classification", np.ones((4, 3)), np.array([0, 1, 3, -1]), r"labels must lie in 0…2; row 2 has 3"),
        ("classification", np.ones((4, 3)), np.array([0, -1, 2, 1]), r"row 1 has -1"),
        ("classification", np.ones((4, 3)), np.ones(4), "labels must be integers"),
        ("classification", np.ones((4, 3)), np.zeros(5, int), r"labels must have shape \(4,\)"),
        ("classification", NAN_IN_ROW_1, np.zeros(4, int), "X row 1 is not finite"),
        ("classification", np.ones((4, 2)), np.zeros(4, int), r"shape \(n, 3\)"),
        ("binary", np.ones((4, 3)), np.array([0, 1, 2, 1]), r"binary labels must be 0 or 1; row 2 has 2"),
        ("regression", np.ones((4, 3)), np.array([[0.0, np.inf]] * 4), "target row 0 is not finite"),
        ("regression", np.ones((4, 3)), np.zeros((4, 3)), r"targets must be real values of shape \(4, 2\)"),
    ],
)  # fmt: skip
def test_bad_rows_are_named(device, task, X, y, message):
    net = gpunn.MLP(
        [3, 1 if task == "binary" else 3 if task == "classification" else 2], task=task, device=device
    )
    with pytest.raises(ValueError, match=message):
        DeviceDataset(net, X, y)
    with pytest.raises(ValueError, match=message):
        gpunn.backprop(net, X, y)  # backprop checks as fit does
