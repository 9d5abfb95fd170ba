"""The fused CUDA step (gpunn/fused.py, gpunn/kernels.cu) without a GPU: nvcc compiles the kernels, and
their C++ compilation, run through a sequential emulation of the grid, trains exactly like the reference.
On a GPU, the same comparison runs for real (marked cuda)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import gpunn
from gpunn import fused
from gpunn.data import DeviceDataset
from gpunn.train import TrainStep

from cuda_emulation import EmulatedKernels


def test_signatures_are_parsed():
    sig = fused.kernel_signatures()
    assert sorted(sig) == [
        "activation_backward",
        "bias_activation",
        "gather_batch",
        "sgd_update",
        "softmax_cross_entropy",
    ]
    assert sig["bias_activation"] == ["REAL*", "const REAL*", "long long", "int", "int"]
    args = fused.convert_args(sig["bias_activation"], (np.zeros(2), np.zeros(2), 5, 2, 1), np.float32)
    assert [type(a) for a in args[2:]] == [np.int64, np.int32, np.int32]
    with pytest.raises(TypeError, match="takes 5 arguments"):
        fused.convert_args(sig["bias_activation"], (1, 2), np.float32)


@pytest.mark.parametrize("real", ["float", "double"])
def test_nvcc_compiles_the_kernels(tmp_path, real):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here")
    command = [
        nvcc,
        "-c",
        "-x",
        "cu",
        f"-DREAL={real}",
        "-arch=sm_80",
        "-std=c++14",
        "-o",
        str(tmp_path / "k.o"),
    ]
    result = subprocess.run([*command, str(fused.SOURCE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler for the emulation")
    folder = tmp_path_factory.mktemp("emulated")
    return {np.float32: EmulatedKernels(np.float32, folder), np.float64: EmulatedKernels(np.float64, folder)}


def train_both(make_step, sizes, activation, dtype, steps=30, n=260, batch=64, **opt):
    """Per-step (cost, errors) and final θ of the reference TrainStep and of make_step(...)."""
    rng = np.random.default_rng(3)
    X8, y = rng.integers(0, 256, (n, sizes[0]), dtype=np.uint8), rng.integers(0, sizes[-1], n)
    order = np.concatenate([np.random.default_rng(e).permutation(n) for e in range(3)])
    out = []
    for factory in (TrainStep, make_step):
        net = gpunn.MLP(sizes, activation, device="cpu", seed=1, dtype=dtype)
        sgd = gpunn.SGD(net, **opt)
        step = factory(net, sgd, DeviceDataset(X8, y, net.device))
        history = []
        for t in range(steps):
            start = (t * batch) % (len(order) - batch)
            J, errors = step(order[start : start + batch], opt["lr"])
            history.append((float(J), int(errors)))
        out.append((np.array(history), net.theta.copy()))
    return out


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("sizes", [[20, 16, 5], [20, 5], [20, 12, 8, 5]], ids=["L2", "L1", "L3"])
@pytest.mark.parametrize(
    "opt", [{"lr": 0.5}, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}], ids=["sgd", "momentum-decay"]
)
def test_emulated_fused_step_trains_like_the_reference(emulated, activation, sizes, opt):
    (ref, ref_theta), (got, theta) = train_both(
        lambda net, sgd, data: fused.FusedStep(net, sgd, data, kernels=emulated[np.float64]),
        sizes,
        activation,
        "float64",
        **opt,
    )
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=1e-10)
    np.testing.assert_array_equal(got[:, 1], ref[:, 1])
    np.testing.assert_allclose(theta, ref_theta, rtol=1e-9, atol=1e-12)


def test_emulated_fused_step_in_float32_and_its_launch_count(emulated):
    steps = []

    def make(net, sgd, data):
        steps.append(fused.FusedStep(net, sgd, data, kernels=emulated[np.float32]))
        return steps[-1]

    (ref, ref_theta), (got, theta) = train_both(make, [20, 16, 5], "relu", "float32", lr=0.5)
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=2e-5)  # float32: summation order differs
    np.testing.assert_allclose(theta, ref_theta, rtol=2e-4, atol=1e-6)
    launches = emulated[np.float32].launches
    per_step = launches[: len(launches) // 30]
    assert per_step == [
        "gather_batch",
        "bias_activation",
        "softmax_cross_entropy",
        "activation_backward",
        "activation_backward",
        "sgd_update",
    ]


def test_fused_refuses_what_it_cannot_train():
    for net in (gpunn.MLP([3, 2], task="regression"), gpunn.MLP([3, 1], task="binary")):
        assert "classification only" in fused.fused_support(net)
        with pytest.raises(ValueError, match="classification only"):
            fused.FusedStep(net, gpunn.SGD(net), None, kernels=object())
    assert fused.fused_support(gpunn.MLP([3, 4, 2])) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_step_on_a_gpu_trains_like_the_reference(cuda_device, dtype):
    rng = np.random.default_rng(3)
    X8, y = rng.integers(0, 256, (600, 784), dtype=np.uint8), rng.integers(0, 10, 600)
    results = []
    for factory in (TrainStep, fused.FusedStep):
        net = gpunn.MLP([784, 200, 10], device=cuda_device, seed=1, dtype=dtype)
        sgd = gpunn.SGD(net, lr=0.5)
        step = factory(net, sgd, DeviceDataset(X8, y, cuda_device))
        rows = cuda_device.asarray(np.random.default_rng(0).permutation(600))
        costs = [float(step(rows[i * 100 : (i + 1) * 100], 0.5)[0]) for i in range(6)]
        results.append((np.array(costs), gpunn.to_numpy(net.theta)))
    tol = 1e-9 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=tol)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=tol * 10, atol=tol)


def test_fused_engine_falls_back_to_xp_without_a_gpu(tmp_path):
    net = gpunn.MLP([4, 3], device="cpu")
    data = DeviceDataset(np.zeros((5, 4), np.uint8), np.zeros(5, int), net.device)
    with pytest.warns(gpunn.train.EngineFallbackWarning, match="need a CUDA device"):
        step = gpunn.train.make_step(net, gpunn.SGD(net), data, "fused")
    assert isinstance(step, TrainStep)
    with pytest.raises(ValueError, match="unknown engine"):
        gpunn.train.make_step(net, gpunn.SGD(net), data, "turbo")
