"""The fused CUDA step (gpunn/fused.py, gpunn/kernels.cu) without a GPU: nvcc compiles the kernels, and
their C++ compilation, run through a sequential emulation of the grid, trains exactly like the reference.
On a GPU, the same comparison runs for real (marked cuda)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import types
import warnings

import numpy as np
import pytest

import gpunn
from gpunn import fused
from gpunn.data import DeviceDataset
from gpunn.errors import EngineFallbackWarning
from gpunn.train import Config, TrainState, TrainStep, fit

from cuda_emulation import EmulatedGemm, EmulatedKernels, RecordingGraphs, cublas_gemm


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["CCC", "FCC", "CFC", "CCF", "FFF", "FFC"])
def test_cublas_arguments_compute_the_row_major_product(rng, dtype, layout):
    A, B = rng.standard_normal((7, 5)).astype(dtype), rng.standard_normal((5, 3)).astype(dtype)
    A, B = (np.asarray(x, order=o) for x, o in zip((A, B), layout))
    C = np.zeros((7, 3), dtype=dtype, order=layout[2])
    EmulatedGemm()(A, B, C)
    np.testing.assert_allclose(C, A @ B, rtol=1e-5)


def test_cublas_arguments_of_views_as_the_fused_step_passes_them(rng):
    theta = rng.standard_normal(4 * 6 + 4)
    W = theta[:24].reshape(6, 4).T  # (4, 6), column-major, as in θ (6.17)
    Q = rng.standard_normal((10, 6))
    dZ = rng.standard_normal((10, 4))
    H = np.zeros((10, 4))
    EmulatedGemm()(Q, W.T, H)  # forward: Q Wᵀ
    np.testing.assert_allclose(H, Q @ W.T)
    dW = np.zeros(28)[:24].reshape(6, 4).T  # a gradient view like W
    EmulatedGemm()(dZ.T, Q, dW)  # (6.27c)
    np.testing.assert_allclose(dW, dZ.T @ Q)
    with pytest.raises(ValueError, match="neither rows nor columns"):
        EmulatedGemm()(Q[:, ::2], W.T[::2], H)


class FakeCublasBinding:
    """CuPy's cuBLAS binding as it behaves: every call refused while a stream captures."""

    def __init__(self):
        self.stream, self.mode, self.capturing = 0, 1, False

    def _refuse_during_capture(self):
        if self.capturing:
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")

    def getStream(self, handle):
        self._refuse_during_capture()
        return self.stream

    def setStream(self, handle, stream):
        self._refuse_during_capture()
        self.stream = stream

    def getPointerMode(self, handle):
        self._refuse_during_capture()
        return self.mode

    def setPointerMode(self, handle, mode):
        self._refuse_during_capture()
        self.mode = mode


class FakeStream:
    def __init__(self, binding, non_blocking):
        assert non_blocking  # capture needs a non-blocking stream
        self.binding, self.ptr = binding, 4242

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self):
        self.binding.capturing = True

    def end_capture(self):
        self.binding.capturing = False
        return "graph"


def fake_cupy(binding):
    device = types.SimpleNamespace(get_cublas_handle=lambda: 77)
    cuda = types.SimpleNamespace(
        device=device, Stream=lambda non_blocking=False: FakeStream(binding, non_blocking)
    )
    return types.SimpleNamespace(cuda=cuda)


def test_capture_binds_cublas_to_the_capturing_stream_before_it_begins(monkeypatch):
    binding = FakeCublasBinding()
    monkeypatch.setattr(fused, "import_cupy", lambda: fake_cupy(binding))
    monkeypatch.setattr(fused, "import_cublas", lambda: binding)
    graphs = fused.CudaGraphs()
    seen = []
    assert graphs.capture(lambda: seen.append((binding.capturing, binding.stream, binding.mode))) == "graph"
    assert seen == [(True, 4242, 0)]  # capturing, on the capture stream, host pointer mode
    assert (binding.capturing, binding.stream, binding.mode) == (False, 0, 1)  # all given back

    def failing():
        raise RuntimeError("a launch failed")

    with pytest.raises(RuntimeError, match="a launch failed"):
        graphs.capture(failing)
    assert (binding.capturing, binding.stream, binding.mode) == (False, 0, 1)


class DeviceLike:
    """A NumPy array dressed as a CuPy one (``.data.ptr``), for CublasGemm's host logic."""

    def __init__(self, array):
        self.array = array
        self.shape, self.strides, self.itemsize = array.shape, array.strides, array.itemsize
        self.data = types.SimpleNamespace(ptr=array.ctypes.data)

    @property
    def T(self):
        return DeviceLike(self.array.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cublas_gemm_calls_the_c_function_with_host_scalars(monkeypatch, rng, dtype):
    calls = []

    def gemm_v2(handle, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        kind = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        calls.append((handle, kind.from_address(alpha).value, kind.from_address(beta).value))
        cublas_gemm(dtype, ta, tb, m, n, k, a, lda, b, ldb, c, ldc)  # column-major, on raw addresses
        return 0

    library = types.SimpleNamespace(cublasSgemm_v2=gemm_v2, cublasDgemm_v2=gemm_v2)
    monkeypatch.setattr(fused, "import_cupy", lambda: fake_cupy(FakeCublasBinding()))
    monkeypatch.setattr(fused, "cublas_library", lambda: library)
    A, B = (
        rng.standard_normal((6, 5)).astype(dtype),
        np.asfortranarray(rng.standard_normal((5, 4)).astype(dtype)),
    )
    C = np.zeros((6, 4), dtype=dtype)
    gemm = fused.CublasGemm(dtype)
    gemm(DeviceLike(A), DeviceLike(B), DeviceLike(C))
    np.testing.assert_allclose(C, A @ B, rtol=1e-5)
    assert calls == [(77, 1.0, 0.0)]
    library.cublasSgemm_v2 = library.cublasDgemm_v2 = lambda *args: 13  # CUBLAS_STATUS_EXECUTION_FAILED
    with pytest.raises(RuntimeError, match="status 13"):
        fused.CublasGemm(dtype)(DeviceLike(A), DeviceLike(B), DeviceLike(C))


def graph_setup(emulated, dtype=np.float64, fail_after=None):
    """(kernels, gemm, graphs) for an emulated graph engine."""
    kernels = emulated[dtype]
    gemm = EmulatedGemm()
    return kernels, gemm, RecordingGraphs(kernels, gemm, fail_after)


def fit_with(step_factory, epochs=3, n=250, batch=20, eval_every=5):
    """A whole fit() with the given step: per-iteration records, evaluations and final θ."""
    rng = np.random.default_rng(5)
    X8, y = rng.integers(0, 256, (n, 12), dtype=np.uint8), rng.integers(0, 4, n)
    train, val = (
        DeviceDataset(X8, y, gpunn.get_device("cpu")),
        DeviceDataset(X8[:60], y[:60], gpunn.get_device("cpu")),
    )
    cfg = Config(
        hidden=[8],
        epochs=epochs,
        batch_size=batch,
        lr=0.4,
        lr_schedule="cosine",  # γ changes every step: each replayed step must read its own
        eval_every=eval_every,
        dtype="float64",
        num_classes=4,
    )
    net = gpunn.MLP(cfg.sizes(12), device="cpu", seed=0, dtype="float64")
    opt = gpunn.SGD(net, cfg.lr)
    step = step_factory(net, opt, train)
    records, state = [], TrainState()
    fit(net, opt, cfg, train, val, state, records.append, step=step)
    return step, state, records, net.theta.copy()


@pytest.mark.parametrize("eval_every", [5, 13])
def test_graph_engine_fits_like_the_reference(emulated, eval_every):
    kernels, gemm, graphs = graph_setup(emulated)
    got = fit_with(
        lambda net, opt, data: fused.FusedStep(net, opt, data, kernels, True, gemm, graphs),
        eval_every=eval_every,
    )
    ref = fit_with(TrainStep, eval_every=eval_every)
    (step, state, records, theta), (_, ref_state, ref_records, ref_theta) = got, ref
    np.testing.assert_allclose(state.batch_loss, ref_state.batch_loss, rtol=1e-10)
    assert state.batch_error == ref_state.batch_error
    assert [r["val_error"] for r in records] == [r["val_error"] for r in ref_records]
    np.testing.assert_allclose(
        [r["val_loss"] for r in records], [r["val_loss"] for r in ref_records], rtol=1e-10
    )
    np.testing.assert_allclose(theta, ref_theta, rtol=1e-9, atol=1e-12)
    # 13 steps an epoch: 12 full batches as blocks that end at evaluations, then one of 10 rows eagerly
    assert step.block_steps == fused.GRAPH_STEPS and gemm.calls > 0
    assert graphs.captures == len(step.captured) + 2  # each block once, the evaluation, the trial
    assert len(step.captured) == {5: 9, 13: 1}[eval_every]
    evaluations = len(records)
    if eval_every == 13:  # every epoch has the same block, (0, 12): captured once, replayed thrice
        assert evaluations == 3 and graphs.launches == 3 + evaluations


def test_graph_engine_when_capture_is_refused_warns_and_trains_eagerly(emulated):
    kernels, gemm, graphs = graph_setup(emulated, fail_after=0)
    with pytest.warns(EngineFallbackWarning, match="graph capture failed"):
        got = fit_with(lambda net, opt, data: fused.FusedStep(net, opt, data, kernels, True, gemm, graphs))
    ref = fit_with(TrainStep)
    assert got[0].block_steps == 0 and graphs.launches == 0
    np.testing.assert_allclose(got[1].batch_loss, ref[1].batch_loss, rtol=1e-10)
    np.testing.assert_allclose(got[3], ref[3], rtol=1e-9, atol=1e-12)


def test_graph_engine_when_a_later_capture_fails_finishes_the_block_eagerly(emulated):
    kernels, gemm, graphs = graph_setup(emulated, fail_after=3)  # the trial and two blocks succeed
    with pytest.warns(EngineFallbackWarning, match="graph capture failed") as caught:
        got = fit_with(lambda net, opt, data: fused.FusedStep(net, opt, data, kernels, True, gemm, graphs))
    ref = fit_with(TrainStep)
    assert len(caught) == 1 and got[0].block_steps == 0 and graphs.launches >= 2
    np.testing.assert_allclose(got[1].batch_loss, ref[1].batch_loss, rtol=1e-10)
    assert got[1].batch_error == ref[1].batch_error
    np.testing.assert_allclose(got[3], ref[3], rtol=1e-9, atol=1e-12)


def test_run_block_refuses_what_is_not_a_block_of_full_batches(emulated):
    kernels, gemm, graphs = graph_setup(emulated)
    net = gpunn.MLP([12, 4], device="cpu", dtype="float64")
    data = DeviceDataset(np.zeros((50, 12), np.uint8), np.zeros(50, int), net.device)
    step = fused.FusedStep(net, gpunn.SGD(net, 0.1), data, kernels, True, gemm, graphs)
    order = np.arange(50)
    with pytest.raises(ValueError, match="full mini-batches"):
        step.run_block(order, 4, 2, 10, [0.1, 0.1])  # rows 40…59 of 50
    with pytest.raises(ValueError, match="full mini-batches"):
        step.run_block(order, 0, fused.GRAPH_STEPS + 1, 0, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        costs, errors = step.run_block(order, 0, 5, 10, [0.1] * 5)
    assert costs.shape == errors.shape == (5,) and np.all(costs > 0)
    eager = fused.FusedStep(net, gpunn.SGD(net, 0.1), data, kernels)  # without graphs: step by step
    eager_costs, _ = eager.run_block(order, 0, 5, 10, [0.1] * 5)
    assert eager_costs.shape == (5,) and np.all(eager_costs < costs)  # five more steps of descent


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_fused_evaluate_equals_the_reference(emulated, graphs):
    kernels, gemm, recorder = graph_setup(emulated)
    rng = np.random.default_rng(8)
    X8, y = rng.integers(0, 256, (103, 12), dtype=np.uint8), rng.integers(0, 4, 103)
    data = DeviceDataset(X8, y, gpunn.get_device("cpu"))
    net = gpunn.MLP([12, 8, 6, 4], "tanh", device="cpu", seed=2, dtype="float64")
    step = fused.FusedStep(net, gpunn.SGD(net, 0.1), data, kernels, graphs, gemm, recorder)
    for _ in range(2):  # the second time replays what the first captured
        cost, error = step.evaluate(data, 25)  # chunks of 25, 25, 25, 25 and 3 rows
        ref_cost, ref_error = gpunn.train.evaluate(net, data)
        assert cost == pytest.approx(ref_cost, rel=1e-12) and error == ref_error and 0 < error < 1
    assert recorder.launches == (2 if graphs else 0)


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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_graph_engine_on_a_gpu_fits_like_the_reference(cuda_device, dtype):
    rng = np.random.default_rng(4)
    X8, y = rng.integers(0, 256, (1000, 784), dtype=np.uint8), rng.integers(0, 10, 1000)
    train, val = DeviceDataset(X8, y, cuda_device), DeviceDataset(X8[:300], y[:300], cuda_device)
    cfg = Config(hidden=[200], epochs=2, eval_every=5, lr_schedule="cosine", dtype=dtype)
    results = []
    for engine in ("xp", "graph"):
        net, opt = gpunn.train.build(cfg, 784, cuda_device)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture must fail this test, not fall back quietly
            step = gpunn.train.make_step(net, opt, train, engine)
            state, records = TrainState(), []
            fit(net, opt, cfg, train, val, state, records.append, step=step)
        val_loss = [r["val_loss"] for r in records]
        results.append((np.array(state.batch_loss), gpunn.to_numpy(net.theta), step, val_loss))
    assert results[1][2].block_steps == fused.GRAPH_STEPS and len(results[1][2].captured) == 2
    tol = 1e-9 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=tol)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=tol * 10, atol=tol)
    np.testing.assert_allclose(results[1][3], results[0][3], rtol=tol)  # evaluation by replayed graph


def test_fused_engine_falls_back_to_xp_without_a_gpu(tmp_path):
    net = gpunn.MLP([4, 3], device="cpu")
    data = DeviceDataset(np.zeros((5, 4), np.uint8), np.zeros(5, int), net.device)
    for engine in ("fused", "graph"):
        with pytest.warns(gpunn.train.EngineFallbackWarning, match="need a CUDA device"):
            step = gpunn.train.make_step(net, gpunn.SGD(net), data, engine)
        assert isinstance(step, TrainStep)
    with pytest.raises(ValueError, match="unknown engine"):
        gpunn.train.make_step(net, gpunn.SGD(net), data, "turbo")


def test_fused_kernels_that_cannot_be_built_fall_back_to_xp_with_the_reason(monkeypatch):
    net = gpunn.MLP([4, 3], device="cpu")
    monkeypatch.setattr(
        net, "device", types.SimpleNamespace(is_cuda=True, xp=np)
    )  # a GPU, as make_step sees it

    def broken(*args, **kwargs):
        raise RuntimeError("nvrtc: error: invalid value for --gpu-architecture\n(and more lines)")

    monkeypatch.setattr(fused, "FusedStep", broken)
    data = DeviceDataset(np.zeros((5, 4), np.uint8), np.zeros(5, int), gpunn.get_device("cpu"))
    with pytest.warns(
        EngineFallbackWarning, match=r"cannot run here \(nvrtc: error: invalid value.*\); training"
    ):
        step = gpunn.train.make_step(net, gpunn.SGD(net), data, "graph")
    assert isinstance(step, TrainStep)
