"""A/B of the CPU engine's gemm binding: gpunn.native's prepared ctypes call into NumPy's own OpenBLAS
against SciPy's well-kept binding, ``scipy.linalg.blas.?gemm`` with ``overwrite_c``.

    python benchmarks/ab_native.py --data-dir ../shared/data/mnist [--rounds 8]

Measures, in one process, (1) the Python cost of one call on a 1×1 product, and (2) whole epochs of
Example 6.2 (784-200-10, n_b = 100) with the blas engine built on each binding, alternating A and B
epoch by epoch, each epoch timed alone; prints medians and the paired ratio B/A. SciPy loads a second
OpenBLAS (its own thread pool) beside NumPy's: that is part of what is measured. Since 2026-12-02 the
ctypes products are cut over the CPU kernels' team of threads and SciPy's are not, so the ratio also
measures the team (benchmarks/README.md has the figures of both).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpunn
from gpunn import native
from gpunn.data import PIXEL_SCALE, DeviceDataset, load_idx_dataset, resolve_data_dir
from gpunn.engines.blas import BlasEngine


def scipy_gemm(A, B, C, alpha: float = 1.0, beta: float = 0.0, team=None):
    """native.gemm's contract through scipy.linalg.blas: C ← αAB + βC in place, prepared once (one call
    on SciPy's own threads: ``team`` is not used)."""
    from scipy.linalg import blas

    if not C.flags.f_contiguous:  # work on Cᵀ = Bᵀ Aᵀ, which is Fortran-ordered
        A, B, C = B.T, A.T, C.T
    if not C.flags.f_contiguous:
        raise ValueError("C must be C- or Fortran-contiguous")
    routine = blas.sgemm if C.dtype == np.float32 else blas.dgemm

    def operand(x):  # (a Fortran-ordered array, its trans flag) that computes x without a copy
        return (x, 0) if x.flags.f_contiguous else (x.T, 1)

    (a, ta), (b, tb) = operand(A), operand(B)

    def call():
        routine(alpha, a, b, beta, C, ta, tb, overwrite_c=1)

    return call


def per_call_seconds(make, repeats=200_000) -> float:
    A, B, C = (np.ones((1, 1), np.float32) for _ in range(3))
    call = make(A, B, C, 1.0, 1.0)
    call()
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="MNIST folder (default: $GPUNN_DATA_DIR)")
    p.add_argument("--rounds", type=int, default=8, help="A/B pairs of epochs")
    args = p.parse_args(argv)
    train, _ = load_idx_dataset(resolve_data_dir(args.data_dir, progress=False))
    print(f"per call: ctypes {per_call_seconds(native.gemm) * 1e6:.2f} µs, "
          f"scipy {per_call_seconds(scipy_gemm) * 1e6:.2f} µs")  # fmt: skip
    engines = {}
    for name, binding in (("ctypes", native.gemm), ("scipy", scipy_gemm)):
        net = gpunn.MLP([784, 200, 10], seed=0)
        data = DeviceDataset(net, train.X, train.y, PIXEL_SCALE)
        original, native.gemm = native.gemm, binding
        try:
            engine = BlasEngine(net, gpunn.SGD(net, 0.5), data)
            engine.plan(data, 100)  # the products are prepared here, with the binding under test
        finally:
            native.gemm = original
        engines[name] = (engine, data)
    times = {name: [] for name in engines}
    for r in range(args.rounds + 1):
        for name, (engine, data) in engines.items() if r % 2 == 0 else reversed(engines.items()):
            order = data.order(0, r, 100)
            t0 = time.perf_counter()
            for i in range(600):
                engine.step(order[i * 100 : (i + 1) * 100], 0.5)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
            time.sleep(0.2)
    ratio = statistics.median(np.divide(times["scipy"], times["ctypes"]))
    for name, t in times.items():
        each = ", ".join(f"{x:.3f}" for x in t)
        print(f"{name}: epoch median {statistics.median(t):.3f} s over {len(t)} ({each})")
    print(f"paired ratio scipy / ctypes: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
