"""The package's build: pyproject.toml holds everything but the optional CPU kernels.

engines/kernels.cu, compiled as C++ for the CPU (engines/cpu_kernels.cpp) once per float type and stored
input type that the CPU engine uses most, as extension modules gpunn.engines._cpu_<real>_<input>. They
are optional: where no C++ compiler is found the build goes on without them and the CPU engine does
the same passes with NumPy.
"""

from setuptools import Extension, setup

VARIANTS = [("float", "uint8", "unsigned char"), ("double", "uint8", "unsigned char")]
VARIANTS += [("float", "float32", "float"), ("double", "float64", "double")]


def extension(real: str, name: str, c_type: str) -> Extension:
    module = f"_cpu_{real}_{name}"
    return Extension(
        f"gpunn.engines.{module}",
        sources=["gpunn/engines/cpu_kernels.cpp"],
        depends=[f"gpunn/engines/{f}" for f in ("kernels.cu", "cpu_team.h", "cpu_train.h", "cpu_sparse.h")],
        include_dirs=["gpunn/engines"],
        define_macros=[("REAL", real), ("INPUT", c_type), ("MODULE", module)],
        extra_compile_args=["-O3", "-std=c++14", "-pthread", "-Wno-psabi"],
        extra_link_args=["-pthread"],
        language="c++",
        optional=True,
    )


setup(ext_modules=[extension(*variant) for variant in VARIANTS])
