"""Runs gpunn/engines/kernels.cu on the CPU: the CUDA source compiled as C++ with a sequential emulation of
the grid (every block, every thread, in order). Valid because the kernels use no shared memory, no
barriers and no atomics. With a column-major "cuBLAS" that reads raw pointers and a "CUDA graph" that
records launches and replays them, the fused and graph engines' kernels and host logic are checked
without a GPU."""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from gpunn import native
from gpunn.engines import fused

_GRID = threading.Lock()  # ranks simulated by threads (tests/fake_comm.py) launch concurrently
HEADER = r"""
#include <cmath>
using std::exp; using std::log; using std::log1p; using std::sqrt; using std::tanh;
struct gpunn_emulated_dim { long long x; };
static gpunn_emulated_dim threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
"""


def build(dtype, input_dtype, folder: Path) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler")
    real = "float" if np.dtype(dtype) == np.float32 else "double"
    input_type = fused.INPUT_TYPES[np.dtype(input_dtype)]
    lines = [HEADER, f'#include "{fused.SOURCE}"']
    for name, types in fused.kernel_signatures().items():
        params = ", ".join(f"{t} a{i}" for i, t in enumerate(types))
        args = ", ".join(f"a{i}" for i in range(len(types)))
        lines.append(
            f'extern "C" void emulate_{name}(long long grid, long long block, {params}) {{\n'
            "  gridDim.x = grid; blockDim.x = block;\n"
            "  for (long long b = 0; b < grid; ++b) for (long long t = 0; t < block; ++t) {\n"
            f"    blockIdx.x = b; threadIdx.x = t; {name}({args});\n  }}\n}}"
        )
    tag = f"{real}_{np.dtype(input_dtype).name}"
    source = folder / f"emulated_{tag}.cpp"
    source.write_text("\n".join(lines))
    library = folder / f"emulated_{tag}.so"
    subprocess.run(
        [
            compiler,
            "-O1",
            "-shared",
            "-fPIC",
            f"-DREAL={real}",
            f"-DINPUT={input_type}",
            "-o",
            str(library),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return ctypes.CDLL(str(library))


class EmulatedKernels:
    """The ``launch`` interface of fused.CudaKernels, running the C++-compiled kernels on NumPy arrays
    (None: a null pointer)."""

    def __init__(self, dtype, input_dtype, folder: Path):
        self.real = np.dtype(dtype).type
        self.lib = build(dtype, input_dtype, folder)
        self.signatures = fused.kernel_signatures()
        self.launches: list[str] = []
        self.recording: list | None = None  # set by RecordingGraphs.capture
        real_ctype = ctypes.c_float if self.real is np.float32 else ctypes.c_double
        for name, types in self.signatures.items():
            f = getattr(self.lib, f"emulate_{name}")
            f.argtypes = [ctypes.c_longlong, ctypes.c_longlong] + [
                native.ctype_of(t, real_ctype) for t in types
            ]
            f.restype = None

    def launch(self, name: str, count: int, *args) -> None:
        recording = getattr(getattr(self, "owner", None), "recording", None) or self.recording
        if recording is not None:  # being captured: run later, with these very arguments
            recording.append(functools.partial(self._run, name, count, *args))
            return
        self._run(name, count, *args)

    def _run(self, name: str, count: int, *args) -> None:
        self.launches.append(name)
        converted = fused.convert_args(self.signatures[name], args, self.real)
        values = []
        for c_type, value in zip(self.signatures[name], converted):
            if c_type.endswith("*"):
                if value is None:
                    values.append(None)
                    continue
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous, (name, c_type)
                values.append(value.ctypes.data)
            else:
                values.append(value.item())
        with _GRID:  # the emulated grid indices are globals of the library: one launch at a time
            getattr(self.lib, f"emulate_{name}")(fused.grid(count), fused.BLOCK, *values)


class EmulatedKernelSets:
    """The ``kernels`` factory of the fused engines: (dtype, input dtype) -> EmulatedKernels, each
    compiled once per test session; ``launches`` records every launch of every set, in order."""

    def __init__(self, folder: Path):
        self.folder, self.sets, self.launches = folder, {}, []
        self.recording: list | None = None

    def __call__(self, dtype, input_dtype) -> EmulatedKernels:
        key = (np.dtype(dtype), np.dtype(input_dtype))
        if key not in self.sets:
            self.sets[key] = EmulatedKernels(dtype, input_dtype, self.folder)
        kernels = self.sets[key]
        kernels.launches = self.launches
        kernels.owner = self
        return kernels


def column_major(pointer: int, rows: int, cols: int, ld: int, dtype) -> np.ndarray:
    """The (rows, cols) column-major matrix with leading dimension ld at a raw address, as cuBLAS sees it."""
    dtype = np.dtype(dtype)
    kind = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    buffer = np.ctypeslib.as_array((kind * (ld * (cols - 1) + rows)).from_address(pointer))
    return np.lib.stride_tricks.as_strided(buffer, (rows, cols), (dtype.itemsize, ld * dtype.itemsize))


def cublas_gemm(dtype, transa, transb, m, n, k, a, lda, b, ldb, c, ldc) -> None:
    """cublas<t>gemm with α = 1, β = 0 on raw addresses: C (m, n) = op(A)·op(B), all column-major."""
    A = column_major(a, *((k, m) if transa else (m, k)), lda, dtype)
    B = column_major(b, *((n, k) if transb else (k, n)), ldb, dtype)
    C = column_major(c, m, n, ldc, dtype)
    C[...] = (A.T if transa else A) @ (B.T if transb else B)


class EmulatedGemm:
    """fused.CublasGemm for NumPy arrays: the same argument mapping, an emulated column-major gemm."""

    def __init__(self):
        self.recording: list | None = None
        self.calls = 0

    def __call__(self, A, B, C) -> None:
        if self.recording is not None:
            self.recording.append(functools.partial(self, A, B, C))
            return
        self.calls += 1
        cublas_gemm(C.dtype, *native.cublas_arguments(A, B, C, lambda x: x.ctypes.data))


class RecordingGraphs:
    """fused.CudaGraphs for the emulation: capture records every launch and product, launch replays them."""

    def __init__(self, kernels: EmulatedKernelSets, gemm: EmulatedGemm, fail_after: int | None = None):
        self.kernels, self.gemm, self.fail_after = kernels, gemm, fail_after
        self.captures = self.launches = 0

    def capture(self, enqueue) -> list:
        if self.fail_after is not None and self.captures >= self.fail_after:
            raise RuntimeError("operation not permitted when stream is capturing (emulated)")
        calls: list = []
        self.kernels.recording = self.gemm.recording = calls
        try:
            enqueue()
        finally:
            self.kernels.recording = self.gemm.recording = None
        self.captures += 1
        return calls

    def launch(self, calls: list) -> None:
        self.launches += 1
        for call in calls:
            call()
