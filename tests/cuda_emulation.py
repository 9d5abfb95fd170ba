"""Runs gpunn/kernels.cu on the CPU: the CUDA source compiled as C++ with a sequential emulation of the
grid (every block, every thread, in order). Valid because the kernels use no shared memory and no
barriers; atomicAdd becomes a plain add. Used to check FusedStep's kernels and host logic without a GPU."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from gpunn import fused

HEADER = r"""
#include <cmath>
using std::exp; using std::log; using std::tanh;
struct gpunn_emulated_dim { long long x; };
static gpunn_emulated_dim threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
static inline double atomicAdd(double* a, double v) { double old = *a; *a += v; return old; }
"""
CTYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "double": ctypes.c_double}


def build(dtype, folder: Path) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler")
    real = "float" if np.dtype(dtype) == np.float32 else "double"
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
    source = folder / f"emulated_{real}.cpp"
    source.write_text("\n".join(lines))
    library = folder / f"emulated_{real}.so"
    subprocess.run(
        [compiler, "-O1", "-shared", "-fPIC", f"-DREAL={real}", "-o", str(library), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    return ctypes.CDLL(str(library))


class EmulatedKernels:
    """The ``launch`` interface of fused.CudaKernels, running the C++-compiled kernels on NumPy arrays."""

    def __init__(self, dtype, folder: Path):
        self.real = np.dtype(dtype).type
        self.lib = build(dtype, folder)
        self.signatures = fused.kernel_signatures()
        self.launches: list[str] = []
        real_ctype = ctypes.c_float if self.real is np.float32 else ctypes.c_double
        for name, types in self.signatures.items():
            f = getattr(self.lib, f"emulate_{name}")
            f.argtypes = [ctypes.c_longlong, ctypes.c_longlong] + [
                ctypes.c_void_p if t.endswith("*") else real_ctype if t == "REAL" else CTYPES[t]
                for t in types
            ]
            f.restype = None

    def launch(self, name: str, count: int, *args) -> None:
        self.launches.append(name)
        grid = max(1, min(fused.MAX_BLOCKS, -(-count // fused.BLOCK)))
        converted = fused.convert_args(self.signatures[name], args, self.real)
        values = []
        for c_type, value in zip(self.signatures[name], converted):
            if c_type.endswith("*"):
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous, (name, c_type)
                values.append(value.ctypes.data)
            else:
                values.append(value.item())
        getattr(self.lib, f"emulate_{name}")(grid, fused.BLOCK, *values)
