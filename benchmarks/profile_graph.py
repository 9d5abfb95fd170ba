"""One replay of the graph engine's captured stretch of Example 6.2 (784-200-10, 100 iterations), for
Nsight Compute:

    ncu --profile-from-start off --print-summary per-kernel python benchmarks/profile_graph.py

The engine is built and warmed up first (capture, compilation); only the replay between
cudaProfilerStart and cudaProfilerStop is profiled. Prints the replay's wall time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpunn
from gpunn.backend import import_cupy
from gpunn.data import PIXEL_SCALE, DeviceDataset
from gpunn.engines import make_engine


def main() -> int:
    device = gpunn.get_device("cuda")
    cupy = import_cupy()
    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 256, (60000, 784), dtype=np.uint8), rng.integers(0, 10, 60000)
    net = gpunn.MLP([784, 200, 10], device=device, seed=0)
    data = DeviceDataset(net, X, y, PIXEL_SCALE)
    engine = make_engine("graph", net, gpunn.SGD(net, 0.5), data)
    order = data.order(0, 0, 100)
    for _ in range(3):  # capture once, then replay
        engine.run(order, 0, 100, 100, [0.5] * 100)
    device.synchronize()
    cupy.cuda.profiler.start()
    t0 = time.perf_counter()
    engine.run(order, 0, 100, 100, [0.5] * 100)
    device.synchronize()
    seconds = time.perf_counter() - t0
    cupy.cuda.profiler.stop()
    each = 1e6 * seconds / 100
    print(f"one replay of 100 iterations ({engine.name} engine): {1e3 * seconds:.3f} ms, {each:.1f} µs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
