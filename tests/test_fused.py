"""The CUDA engines' own pieces without a GPU: nvcc compiles the kernels, the launch plan per iteration,
the row-major → column-major cuBLAS mapping, graph capture's binding of cuBLAS to the capturing
stream, and capture failures. (That the engines train like the reference is tests/test_engines.py.)
On a GPU, the same comparisons with the reference run for real (marked cuda)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import types
import warnings

import numpy as np
import pytest

import gpunn
from gpunn import native
from gpunn.data import DeviceDataset
from gpunn.engines import fused, graph, make_engine
from gpunn.engines.graph import GraphEngine
from gpunn.errors import EngineFallbackWarning

from cuda_emulation import EmulatedGemm, RecordingGraphs, cublas_gemm


def test_signatures_are_parsed():
    sig = fused.kernel_signatures()
    assert sorted(sig) == [
        "activation_backward",
        "adam_update",
        "bias_activation",
        "gather_batch",
        "loss_rows",
        "sgd_update",
        "sum_rows",
    ]
    assert sig["bias_activation"] == ["REAL*", "const REAL*", "long long", "int", "int"]
    args = fused.convert_args(sig["bias_activation"], (np.zeros(2), np.zeros(2), 5, 2, 1), np.float32)
    assert [type(a) for a in args[2:]] == [np.int64, np.int32, np.int32]
    with pytest.raises(TypeError, match="takes 5 arguments"):
        fused.convert_args(sig["bias_activation"], (1, 2), np.float32)


def test_the_kernels_use_no_atomics():  # so that two runs of one seed give the same bits
    code = "\n".join(line.split("//")[0] for line in fused.SOURCE.read_text().splitlines())
    assert "atomic" not in code


@pytest.mark.parametrize("real", ["float", "double"])
@pytest.mark.parametrize("inputs", ["unsigned char", "float", "double", "long long"])
def test_nvcc_compiles_the_kernels(tmp_path, real, inputs):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here")
    command = [nvcc, "-c", "-x", "cu", f"-DREAL={real}", f"-DINPUT={inputs}", "-arch=sm_90", "-std=c++14"]
    result = subprocess.run(
        [*command, "-o", str(tmp_path / "k.o"), str(fused.SOURCE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


GATHER, LOSS, BACKWARD = ["gather_batch"], ["loss_rows", "sum_rows"], ["activation_backward"]


@pytest.mark.parametrize(
    ("task", "sizes", "per_iteration"),
    [
        ("classification", [20, 16, 5], [*GATHER, "bias_activation", *LOSS, *BACKWARD * 2, "sgd_update"]),
        ("regression", [20, 2], [*GATHER, *LOSS, *BACKWARD, "sgd_update"]),
    ],
)  # fmt: skip
def test_the_launches_of_one_iteration(emulated_kernels, task, sizes, per_iteration):
    net = gpunn.MLP(sizes, task=task, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 64) if task == "classification" else rng.standard_normal((64, 2))
    data = DeviceDataset(net, rng.integers(0, 256, (64, 20), dtype=np.uint8), y, 1 / 255)
    engine = fused.FusedEngine(net, gpunn.SGD(net, lr=0.1), data, kernels=emulated_kernels)
    emulated_kernels.launches.clear()
    engine.run(np.arange(64), 0, 2, 32, [0.1, 0.1])
    assert emulated_kernels.launches == per_iteration * 2


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
    monkeypatch.setattr(graph, "import_cupy", lambda: fake_cupy(binding))
    monkeypatch.setattr(graph, "import_cublas", lambda: binding)
    graphs = graph.CudaGraphs()
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
    monkeypatch.setattr(native, "import_cupy", lambda: fake_cupy(FakeCublasBinding()))
    monkeypatch.setattr(native, "cublas_library", lambda: library)
    A, B = (
        rng.standard_normal((6, 5)).astype(dtype),
        np.asfortranarray(rng.standard_normal((5, 4)).astype(dtype)),
    )
    C = np.zeros((6, 4), dtype=dtype)
    gemm = native.CublasGemm(dtype)
    gemm(DeviceLike(A), DeviceLike(B), DeviceLike(C))
    np.testing.assert_allclose(C, A @ B, rtol=1e-5)
    assert calls == [(77, 1.0, 0.0)]
    library.cublasSgemm_v2 = library.cublasDgemm_v2 = lambda *args: 13  # CUBLAS_STATUS_EXECUTION_FAILED
    with pytest.raises(RuntimeError, match="status 13"):
        native.CublasGemm(dtype)(DeviceLike(A), DeviceLike(B), DeviceLike(C))


def fit_engine(
    make, epochs=3, n=250, batch=20, eval_every=5, device="cpu", dtype="float64", task="classification"
):
    """A whole gpunn.fit with the engine ``make`` builds: (engine, history, final θ)."""
    rng = np.random.default_rng(5)
    X8 = rng.integers(0, 256, (n, 12), dtype=np.uint8)
    y = rng.integers(0, 4, n) if task == "classification" else rng.standard_normal((n, 4))
    net = gpunn.MLP([12, 8, 4], task=task, device=device, seed=0, dtype=dtype)
    opt = gpunn.SGD(net, 0.4)
    train, val = DeviceDataset(net, X8, y, 1 / 255), DeviceDataset(net, X8[:60], y[:60], 1 / 255)
    engine = make(net, opt, train)
    history = gpunn.fit(
        net, train, epochs=epochs, batch_size=batch, optimizer=opt, validation_data=val,
        eval_every=eval_every, lr_schedule="cosine", engine=engine, progress=False,
    )  # fmt: skip
    return engine, history, gpunn.to_numpy(net.theta)


def emulated_graph(emulated_kernels, fail_after=None):
    gemm = EmulatedGemm()
    graphs = RecordingGraphs(emulated_kernels, gemm, fail_after)
    return lambda net, opt, data: GraphEngine(net, opt, data, None, emulated_kernels, gemm, graphs)


def reference_run():
    return fit_engine(lambda net, opt, data: make_engine("xp", net, opt, data))


def test_graph_engine_when_capture_is_refused_warns_and_trains_without_graphs(emulated_kernels):
    with pytest.warns(EngineFallbackWarning, match="graph capture failed") as caught:
        engine, history, theta = fit_engine(emulated_graph(emulated_kernels, fail_after=0))
    _, ref, ref_theta = reference_run()
    assert len(caught) == 1 and not engine.capturing and engine.graphs.launches == 0
    np.testing.assert_allclose(history.batch_loss, ref.batch_loss, rtol=1e-10)
    np.testing.assert_allclose(theta, ref_theta, rtol=1e-9, atol=1e-12)


def test_graph_engine_when_a_later_capture_fails_finishes_without_graphs(emulated_kernels):
    with pytest.warns(EngineFallbackWarning, match="graph capture failed") as caught:
        engine, history, theta = fit_engine(emulated_graph(emulated_kernels, fail_after=3))
    _, ref, ref_theta = reference_run()
    assert len(caught) == 1 and not engine.capturing and engine.graphs.launches >= 2
    np.testing.assert_allclose(history.batch_loss, ref.batch_loss, rtol=1e-10)
    assert history.batch_error == ref.batch_error
    np.testing.assert_allclose(theta, ref_theta, rtol=1e-9, atol=1e-12)


def test_graph_engine_refuses_mpi_which_a_graph_cannot_capture():
    from fake_comm import thread_group

    net = gpunn.MLP([4, 3])
    data = DeviceDataset(net, np.zeros((5, 4)), np.zeros(5, int))
    comm = thread_group(2)[0]
    assert "cannot capture MPI" in GraphEngine.supports(net, gpunn.SGD(net), data, comm)


# --- on a GPU ------------------------------------------------------------------------------------

GPU_CASES = [("classification", "sgd"), ("regression", "sgd"), ("classification", "adam")]


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["fused", "graph"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("task", "optimizer"), GPU_CASES)
def test_cuda_engines_on_a_gpu_fit_like_the_reference(cuda_device, engine, dtype, task, optimizer):
    rng = np.random.default_rng(4)
    X8 = rng.integers(0, 256, (1000, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 1000) if task == "classification" else rng.standard_normal((1000, 10))
    results = []
    for name in ("xp", engine):
        net = gpunn.MLP([784, 200, 10], task=task, device=cuda_device, seed=1, dtype=dtype)
        train, val = DeviceDataset(net, X8, y, 1 / 255), DeviceDataset(net, X8[:300], y[:300], 1 / 255)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture must fail this test, not fall back quietly
            history = gpunn.fit(
                net, train, epochs=2, batch_size=100, optimizer=optimizer,
                lr=0.01 if optimizer == "adam" else 0.1, validation_data=val, eval_every=5,
                lr_schedule="cosine", engine=name, progress=False,
            )  # fmt: skip
        results.append(
            (
                np.array(history.batch_loss),
                gpunn.to_numpy(net.theta),
                [r["val_loss"] for r in history.records],
            )
        )
    tol = 1e-9 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=tol)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=tol * 10, atol=tol)
    np.testing.assert_allclose(results[1][2], results[0][2], rtol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["fused", "graph"])
def test_cuda_engines_on_a_gpu_repeat_themselves_bit_for_bit(cuda_device, engine):
    runs = [
        fit_engine(
            lambda net, opt, data: make_engine(engine, net, opt, data), device=cuda_device, dtype="float32"
        )
        for _ in range(2)
    ]
    assert runs[0][1].batch_loss == runs[1][1].batch_loss
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
