"""Shared fixtures: every numeric test takes ``device`` and runs on NumPy always and on CuPy when a GPU
answers (marked ``cuda``; skipped with the reason otherwise)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import gpunn
from gpunn.data import SPLITS, find_idx_file

from cuda_emulation import EmulatedGemm, EmulatedKernelSets, RecordingGraphs
from helpers import make_digits, write_idx


def _cuda_or_skip() -> gpunn.Device:
    try:
        return gpunn.get_device("cuda")
    except gpunn.DeviceError as exc:
        pytest.skip(f"no CUDA device here: {str(exc).split(';')[0]}")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> gpunn.Device:
    return gpunn.get_device("cpu") if request.param == "cpu" else _cuda_or_skip()


@pytest.fixture
def cuda_device() -> gpunn.Device:
    return _cuda_or_skip()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST from $GPUNN_DATA_DIR (CI points it at ../shared/data/mnist)."""
    folder = os.environ.get("GPUNN_DATA_DIR")
    if not folder:
        pytest.skip("GPUNN_DATA_DIR is not set: no real MNIST to test on")
    try:
        for names in SPLITS.values():
            for name in names:
                find_idx_file(Path(folder), name)
    except gpunn.DataError as exc:
        pytest.skip(f"GPUNN_DATA_DIR={folder} lacks MNIST: {exc}")
    return Path(folder)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A small, learnable MNIST-layout dataset (1200 train / 300 val images, 28x28, 10 classes)."""
    folder = tmp_path_factory.mktemp("digits")
    (Xtr, ytr), (Xva, yva) = make_digits(1200, seed=1), make_digits(300, seed=2)
    write_idx(folder / "train-images-idx3-ubyte.gz", Xtr)
    write_idx(folder / "train-labels-idx1-ubyte.gz", ytr)
    write_idx(folder / "t10k-images-idx3-ubyte", Xva)
    write_idx(folder / "t10k-labels-idx1-ubyte", yva)
    return folder


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def emulated_kernels(tmp_path_factory) -> EmulatedKernelSets:
    """kernels.cu compiled as C++ for the sequential emulation of the grid (tests/cuda_emulation.py)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler for the emulation of the CUDA kernels")
    return EmulatedKernelSets(tmp_path_factory.mktemp("emulated"))


@pytest.fixture
def engine_factory(emulated_kernels):
    """name -> a function (net, optimizer, data, comm=None) -> that engine on the CPU: the CUDA engines
    with emulated kernels, an emulated cuBLAS and a recording "graph"."""
    from gpunn.engines import REGISTRY, fused, graph

    def factory(name):
        def make(net, optimizer, data, comm=None):
            if name == "fused":
                return fused.FusedEngine(net, optimizer, data, comm, kernels=emulated_kernels)
            if name == "graph":
                gemm = EmulatedGemm()
                graphs = RecordingGraphs(emulated_kernels, gemm)
                return graph.GraphEngine(net, optimizer, data, comm, emulated_kernels, gemm, graphs)
            if name == "blas-numpy":  # the CPU engine as it runs where the kernels were not built
                return type("NumpyBlas", (REGISTRY["blas"],), {"use_kernels": False})(
                    net, optimizer, data, comm
                )
            if name == "blas-sparse":  # layer 1 on the nonzero inputs whatever their density
                return type("SparseBlas", (REGISTRY["blas"],), {"use_sparse": True})(
                    net, optimizer, data, comm
                )
            if name == "blas-python":  # the kernels called one by one from Python (cpu_train.h unused)
                return type("PythonBlas", (REGISTRY["blas"],), {"use_native": False})(
                    net, optimizer, data, comm
                )
            return REGISTRY[name](net, optimizer, data, comm)

        return make

    return factory
