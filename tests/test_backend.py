"""Device selection: the one guarded CuPy import, the fallback notice, and the errors' reasons."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest

import gpunn
from gpunn import backend


@pytest.fixture
def fresh_backend(monkeypatch):
    """Forget any CuPy import, so each test decides what `import cupy` does."""
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_import_error", None)
    monkeypatch.setattr(backend, "_auto_notice_given", False)
    return monkeypatch


def fake_cupy(device_count=None, runtime_error=None, runtime_version=12090):
    """A stand-in module for `cupy` (built for CUDA ``runtime_version``) whose runtime reports
    ``device_count`` GPUs or raises."""

    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        if runtime_error:
            raise CUDARuntimeError(runtime_error)
        return device_count

    module = types.ModuleType("cupy")
    module.ndarray = type("ndarray", (), {})
    runtime = types.SimpleNamespace(
        getDeviceCount=get_device_count, runtimeGetVersion=lambda: runtime_version
    )
    module.cuda = types.SimpleNamespace(runtime=runtime)
    return module


@pytest.fixture
def driver(monkeypatch):
    """Set the NVIDIA driver this machine seems to have: driver(None) for none, driver(12020) ..."""

    def set_driver(version):
        monkeypatch.setattr(backend, "driver_version", lambda: version)

    return set_driver


def test_cpu_is_numpy():
    dev = gpunn.get_device("cpu")
    assert dev.xp is np and dev.name == "cpu" and not dev.is_cuda
    assert gpunn.get_device(dev) is dev
    a = dev.asarray([[1, 2]], dtype=np.float32)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cpu:1", "cuda:-1", "auto:0", ""])
def test_unknown_spec_is_refused(spec):
    with pytest.raises(gpunn.DeviceError, match="unknown device"):
        gpunn.get_device(spec)


def test_cuda_without_cupy_names_the_extra(fresh_backend):
    fresh_backend.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ModuleNotFoundError
    with pytest.raises(gpunn.DeviceError) as info:
        gpunn.get_device("cuda")
    message = str(info.value)
    assert (
        "CuPy, which is not installed" in message
        and "gpunn[cuda12]" in message
        and "gpunn[cuda13]" in message
    )


def test_a_broken_cupy_keeps_its_reason(fresh_backend):
    broken = types.ModuleType("cupy")
    fresh_backend.setitem(sys.modules, "cupy", broken)
    fresh_backend.setattr(
        backend, "_cupy_import_error", "ImportError: libnvrtc.so.12: cannot open shared object"
    )
    with pytest.raises(gpunn.DeviceError, match=r"cannot be imported .*libnvrtc"):
        gpunn.get_device("cuda")


def test_auto_on_a_cpu_install_says_nothing(fresh_backend):
    """A user who installed gpunn without CuPy never asked for a GPU: no notice, every time."""
    fresh_backend.setitem(sys.modules, "cupy", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gpunn.get_device("auto") == gpunn.get_device("cpu")


def test_auto_with_cupy_but_no_gpu_falls_back_once(fresh_backend, driver):
    driver(None)
    fresh_backend.setitem(sys.modules, "cupy", fake_cupy(runtime_error="cudaErrorInsufficientDriver"))
    with pytest.warns(
        gpunn.DeviceFallbackWarning, match="running on the CPU: .*no NVIDIA driver is installed"
    ):
        assert gpunn.get_device("auto") == gpunn.get_device("cpu")
    with pytest.warns() as later:  # no second notice in the same process
        assert gpunn.get_device("auto").name == "cpu"
        warnings.warn("sentinel", UserWarning, stacklevel=1)
    assert [str(w.message) for w in later] == ["sentinel"]


def test_a_driver_too_old_for_cupy_is_named(fresh_backend, driver):
    """CUDA says "insufficient driver" both where there is none and where it is old: tell them apart."""
    driver(12020)
    fresh_backend.setitem(
        sys.modules, "cupy", fake_cupy(runtime_error="cudaErrorInsufficientDriver", runtime_version=13000)
    )
    with pytest.raises(
        gpunn.DeviceError, match=r"driver supports CUDA 12\.2 but this CuPy needs CUDA 13\.0: update"
    ):
        gpunn.get_device("cuda")


def test_cuda_keeps_the_runtime_reason(fresh_backend, driver):
    driver(12090)
    fresh_backend.setitem(
        sys.modules, "cupy", fake_cupy(runtime_error="cudaErrorNoDevice: no CUDA-capable device")
    )
    with pytest.raises(gpunn.DeviceError, match=r"sees no GPU .*cudaErrorNoDevice: no CUDA-capable device"):
        gpunn.get_device("cuda")


def test_cuda_index_beyond_count(fresh_backend):
    fresh_backend.setitem(sys.modules, "cupy", fake_cupy(device_count=2))
    with pytest.raises(
        gpunn.DeviceError, match=r"cuda:5 does not exist; this machine shows 2: cuda:0, cuda:1"
    ):
        gpunn.get_device("cuda:5")


def test_driver_version_reads_libcuda_or_says_none():
    version = backend.driver_version()  # no driver on CI machines; a GPU host's driver elsewhere
    assert version is None or version >= 10000


def test_host_arrays_are_not_device_arrays():
    assert not backend.is_device_array(np.zeros(3))
    assert backend.get_array_module(np.zeros(3)) is np
    assert backend.to_numpy([1, 2]).tolist() == [1, 2]


@pytest.mark.cuda
def test_cuda_device_round_trip(cuda_device):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = cuda_device.asarray(a)
    assert backend.is_device_array(d) and backend.get_array_module(d) is cuda_device.xp
    np.testing.assert_array_equal(gpunn.to_numpy(d), a)
    assert gpunn.get_device("cpu").asarray(d).tolist() == a.tolist()
    assert "cuda:0" in cuda_device.description()
