"""CPU and GPU agree: the same seed and data give the same start, the same data order, the same
mini-batch costs up to rounding, and the same validation error after an epoch; and the GPU's own
failure modes (no such device, out of memory) end in one line.

Every GPU test is marked ``cuda`` and takes the ``cuda_device`` fixture, which skips with the reason
where no GPU answers. Runs go through the library's own loop: ``Config.network``, ``DeviceDataset``,
``gpunn.fit`` with the default engine ("auto"), as ``scripts/train_mnist.py`` runs them.

The bounds, and why:

* Initial parameters, data order and gathered mini-batches: exactly equal. θ and every epoch's
  permutation are drawn on the host (``model.init_theta``, ``data.epoch_order``); the device gets copies,
  and scaling uint8 pixels by 1/255 is one correctly rounded multiplication on both.
* Mini-batch cost J of each of the first 100 SGD steps: relative gap <= 1e-4 in float64, <= 1e-3 in
  float32. The devices do the same arithmetic in another order (cuBLAS and OpenBLAS block their sums
  differently, CuPy reduces in a tree) and with their own exp/log, so J differs by rounding, which SGD
  carries forward. Measured on the CPU with the network's inputs fed in another order (a pure change of
  summation order, see ``test_bounds_separate_rounding_from_a_real_change``): at most 5e-7 in float32
  (8 orders tried), below 1e-15 in float64. A 0.1 % change of the learning rate moves them by 2e-2. So the
  float32 bound leaves three orders of magnitude for the GPU's rounding and still fails a real change.
  CuPy computes float32 matmuls in full FP32 unless CUPY_TF32=1, which rounds their inputs to TF32's
  10-bit mantissa; it must stay off, and the float32 tests check CuPy's compute type and name it.
* Validation error after one epoch (600 steps) of 784-200-10 on the real MNIST: within 0.2 percentage
  points. Past a few hundred steps a rounding difference can tip a ReLU unit and the two float32
  trajectories part: on the CPU, 4 of the 8 reorderings above did, and moved the final error by at most
  0.09 pp; 12 runs whose initial θ differed by one part in a million ended at 3.9 % with a standard
  deviation of 0.035 pp, so 0.2 pp is about four standard deviations of the difference of two runs.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import gpunn
from gpunn.backend import is_device_array
from gpunn.data import PIXEL_SCALE, DeviceDataset, Split, epoch_order, load_idx_dataset
from gpunn.engines.reference import evaluate
from gpunn.train import Callback, Config

from helpers import assert_one_line_error, make_digits, run_script

CPU = gpunn.get_device("cpu")
STEPS = 100
STEP_RTOL = {"float64": 1e-4, "float32": 1e-3}
VAL_ERROR_ATOL = 0.002  # 0.2 percentage points


# --- the harness -----------------------------------------------------------------------------------


@functools.cache
def _load_mnist(folder: str) -> tuple[Split, Split]:
    return load_idx_dataset(Path(folder))


@pytest.fixture
def mnist(mnist_dir) -> tuple[Split, Split]:
    """(train, val) of the real MNIST on the host, read once per session."""
    return _load_mnist(str(mnist_dir))


@pytest.fixture(scope="module")
def digits() -> tuple[Split, Split]:
    """(train, val): 1200 and 300 synthetic 28x28 digits, 12 mini-batches of 100 per epoch."""
    (Xtr, ytr), (Xva, yva) = make_digits(1200, seed=1), make_digits(300, seed=2)
    return Split(Xtr.reshape(1200, -1), ytr, (28, 28)), Split(Xva.reshape(300, -1), yva, (28, 28))


def recipe(dtype: str, **changes) -> Config:
    """Example 6.2 as train_mnist.py runs it (784-200-10 ReLU, γ = 0.5, n_b = 100, seed 0), in ``dtype``."""
    return Config(hidden=[200], dtype=dtype, **changes).check()


@dataclass
class Run:
    losses: np.ndarray  # the mini-batch cost J of every step taken, (steps,)
    val_loss: float | None = None  # on the whole validation split, after a run to the end
    val_error: float | None = None


class StopAfter(Callback):
    """Stop once ``steps`` SGD steps are done (None: never)."""

    def __init__(self, steps: int | None):
        self.steps, self.t = steps, 0

    def on_step(self, t: int) -> None:
        self.t = t

    def should_stop(self) -> bool:
        return self.steps is not None and self.t >= self.steps


def train(device, splits, cfg: Config, steps: int | None = None, input_order=None) -> Run:
    """Train ``cfg`` on ``device`` with the library's loop for ``steps`` steps, or for cfg.epochs and
    then evaluate on the whole validation split (``steps=None``).

    ``input_order`` (a permutation of the pixels) feeds the pixels in that order and permutes the
    columns of W^(1) alike: the same network, whose first-layer sums are taken in another order.
    """
    train_split, val_split = splits
    Xtr, Xva = train_split.X, val_split.X
    net = cfg.network(Xtr.shape[1], device)
    if input_order is not None:
        Xtr, Xva = Xtr[:, input_order], Xva[:, input_order]
        W1 = net.params[0][0]
        W1[...] = W1[:, device.asarray(input_order)]
    train_set = DeviceDataset(net, Xtr, train_split.y, PIXEL_SCALE)
    val_set = DeviceDataset(net, Xva, val_split.y, PIXEL_SCALE)
    history = gpunn.fit(
        net,
        train_set,
        optimizer=cfg.make_optimizer(net),
        validation_data=val_set,
        callbacks=[StopAfter(steps)],
        progress=False,
        **cfg.fit_options(),
    )
    losses = np.asarray(history.batch_loss)
    return Run(losses) if steps is not None else Run(losses, *evaluate(net, val_set))


def worst_gap(got: np.ndarray, want: np.ndarray) -> tuple[float, int]:
    """(the largest relative gap |got − want| / |want|, the step it occurs at, counting from 1)."""
    gap = np.abs(got - want) / np.abs(want)
    k = int(np.argmax(gap))
    return float(gap[k]), k + 1


def assert_full_fp32(cuda_device) -> None:
    """Fail, naming the cause, where CuPy would run float32 matmuls on TF32 tensor cores."""
    try:  # CuPy's own record of the cuBLAS compute type (a private module, hence the fallback)
        linalg = importlib.import_module("cupy._core._routines_linalg")
        mode = linalg.compute_type_to_str(linalg.get_compute_type(np.float32))
    except (ImportError, AttributeError):
        mode = "COMPUTE_TYPE_TF32" if int(os.environ.get("CUPY_TF32") or 0) > 0 else "unknown"
    assert mode != "COMPUTE_TYPE_TF32", (
        "CuPy runs float32 matmuls in TF32 (CUPY_TF32=1), which rounds their inputs to 10-bit mantissas; "
        "unset CUPY_TF32 to compare float32 results with the CPU"
    )


# --- CPU and GPU agree -----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_initial_parameters(cuda_device, dtype):
    cfg = recipe(dtype)
    cpu_net, gpu_net = cfg.network(784, CPU), cfg.network(784, cuda_device)
    assert is_device_array(gpu_net.theta) and not is_device_array(cpu_net.theta)
    cpu_state, gpu_state = cpu_net.state(), gpu_net.state()
    assert gpu_state.keys() == cpu_state.keys() == {"W1", "b1", "W2", "b2"}
    for name, want in cpu_state.items():
        assert gpu_state[name].dtype == want.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(gpu_state[name], want, err_msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (0, 1), (0, 14), (7, 3)])
def test_same_data_order_and_mini_batches(cuda_device, digits, seed, epoch):
    split = digits[0]
    cpu_net, gpu_net = recipe("float32").network(784, CPU), recipe("float32").network(784, cuda_device)
    cpu_set = DeviceDataset(cpu_net, split.X, split.y, PIXEL_SCALE)
    gpu_set = DeviceDataset(gpu_net, split.X, split.y, PIXEL_SCALE)
    want = epoch_order(seed, epoch, split.X.shape[0], 100)
    gpu_order = gpu_set.order(seed, epoch, 100)
    assert is_device_array(gpu_order)
    np.testing.assert_array_equal(gpunn.to_numpy(gpu_order), want)
    np.testing.assert_array_equal(cpu_set.order(seed, epoch, 100), want)
    Xc, yc = cpu_set.batch(cpu_set.order(seed, epoch, 100)[:100])
    Xg, yg = gpu_set.batch(gpu_order[:100])
    np.testing.assert_array_equal(gpunn.to_numpy(Xg), Xc)
    np.testing.assert_array_equal(gpunn.to_numpy(yg), yc)


@pytest.mark.cuda
@pytest.mark.mnist
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_first_100_mini_batch_costs_agree(cuda_device, mnist, dtype):
    if dtype == "float32":
        assert_full_fp32(cuda_device)
    cfg = recipe(dtype)
    cpu = train(CPU, mnist, cfg, steps=STEPS)
    gpu = train(cuda_device, mnist, cfg, steps=STEPS)
    assert len(cpu.losses) == len(gpu.losses) == STEPS
    gap, step = worst_gap(gpu.losses, cpu.losses)
    assert gap <= STEP_RTOL[dtype], (
        f"{dtype}: at step {step} the GPU's mini-batch cost is {gpu.losses[step - 1]!r} and the CPU's "
        f"{cpu.losses[step - 1]!r}, a relative gap of {gap:.2e} > {STEP_RTOL[dtype]:.0e}"
    )


@pytest.mark.cuda
@pytest.mark.mnist
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_validation_error_after_one_epoch_agrees(cuda_device, mnist, dtype):
    if dtype == "float32":
        assert_full_fp32(cuda_device)
    cfg = recipe(dtype, epochs=1)
    cpu = train(CPU, mnist, cfg)
    gpu = train(cuda_device, mnist, cfg)
    assert len(cpu.losses) == len(gpu.losses) == 600
    assert cpu.val_error < 0.06, f"one epoch should learn MNIST to ~4 %, got {100 * cpu.val_error:.2f} %"
    assert abs(gpu.val_error - cpu.val_error) <= VAL_ERROR_ATOL, (
        f"{dtype}: validation error {100 * gpu.val_error:.2f} % on the GPU, {100 * cpu.val_error:.2f} % on "
        f"the CPU: more than {100 * VAL_ERROR_ATOL:.1f} percentage points apart"
    )


@pytest.mark.cuda
def test_gpu_repeats_itself_bit_for_bit(cuda_device, digits):
    """Two GPU runs of one seed give identical costs: what resuming a GPU run bit for bit needs."""
    cfg = recipe("float32", epochs=9)
    first = train(cuda_device, digits, cfg, steps=STEPS)
    second = train(cuda_device, digits, cfg, steps=STEPS)
    assert len(first.losses) == STEPS
    np.testing.assert_array_equal(second.losses, first.losses)


# --- the GPU's own failures ------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_index_beyond_the_count(cuda_device, digits_dir, tmp_path):
    count = cuda_device.xp.cuda.runtime.getDeviceCount()
    message = rf"cuda:{count} does not exist; this machine shows {count}: "
    with pytest.raises(gpunn.DeviceError, match=message):
        gpunn.get_device(f"cuda:{count}")
    result = run_script(
        "--device", f"cuda:{count}", "--data-dir", digits_dir, "--out", tmp_path / "run", "--no-progress",
        timeout=300,
    )  # fmt: skip
    assert_one_line_error(result, 1, f"cuda:{count} does not exist", f"shows {count}")


@pytest.mark.cuda
def test_out_of_memory_ends_in_one_line(cuda_device, digits_dir, tmp_path):
    """CuPy's pool, capped at 1 MiB, cannot hold θ and the optimizer's scratch (0.6 MB each in float32)."""
    assert issubclass(cuda_device.xp.cuda.memory.OutOfMemoryError, MemoryError)  # what the CLI catches
    result = run_script(
        "--device", "cuda", "--data-dir", digits_dir, "--out", tmp_path / "run", "--epochs", "1",
        "--no-progress", env={"CUPY_GPU_MEMORY_LIMIT": str(1 << 20)}, timeout=300,
    )  # fmt: skip
    assert_one_line_error(result, 1, "out of memory")


# --- the harness itself, on the CPU (no GPU needed: not marked cuda) --------------------------------


def test_harness_repeats_itself_on_the_cpu(digits, monkeypatch):
    monkeypatch.setenv("GPUNN_BLAS_THREADS", "2")  # the count OpenBLAS sums with, fixed (docs/engines.md)
    cfg = recipe("float64", epochs=9)
    first = train(CPU, digits, cfg, steps=STEPS)
    second = train(CPU, digits, cfg, steps=STEPS)
    assert first.losses.shape == (STEPS,) and np.all(np.isfinite(first.losses))
    assert worst_gap(second.losses, first.losses) == (0.0, 1)
    assert first.losses[-1] < first.losses[0] / 2  # it learns: the costs compared are not a flat line
    assert worst_gap(np.array([1.0, 2.2, 3.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx((0.1, 2))


@pytest.mark.mnist
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bounds_separate_rounding_from_a_real_change(mnist, dtype):
    """The per-step bound on the CPU: summing the first layer in another order (what another BLAS
    does) stays 100 times inside it; a 0.1 % change of the learning rate breaks it."""
    cfg = recipe(dtype)
    base = train(CPU, mnist, cfg, steps=STEPS)
    reordered = train(CPU, mnist, cfg, steps=STEPS, input_order=np.random.default_rng(7).permutation(784))
    nudged = train(CPU, mnist, recipe(dtype, lr=cfg.lr * 1.001), steps=STEPS)
    assert worst_gap(reordered.losses, base.losses)[0] < STEP_RTOL[dtype] / 100
    assert worst_gap(nudged.losses, base.losses)[0] > STEP_RTOL[dtype]
