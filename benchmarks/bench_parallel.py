"""Data-parallel Example 6.2: per-iteration compute time and allreduce time on N ranks.

    mpiexec -n 2 python benchmarks/bench_parallel.py --device cpu --data-dir DIR --json cpu-2.json
    GPUNN_COMM=nccl mpiexec -n 1 python benchmarks/bench_parallel.py --device cuda --data-dir DIR

Each rank trains its slice of every mini-batch of the 784-200-10 network (global n_b = 100), with the
engine "auto" picks, and one allreduce per iteration of the gradient θ-vector (159 010 numbers) plus
the cost and error count. Measured on rank 0, after a warm-up: the iteration as a whole (``step``),
the allreduce alone on the same vector (``allreduce``, after a barrier so no rank waits for another),
and ``compute`` = step − allreduce; medians over ``--steps`` iterations. Outside MPI it measures one
process (no allreduce).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpunn
from gpunn.commands import HelpFormatter
from gpunn.data import PIXEL_SCALE, DeviceDataset, load_idx_dataset, resolve_data_dir
from gpunn.distributed import get_communicator, share_cores
from gpunn.engines import make_engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes its node-local GPU)")
    p.add_argument("--data-dir", help="MNIST folder; default: $GPUNN_DATA_DIR, else the download cache")
    p.add_argument("--steps", type=int, default=300, help="timed iterations")
    p.add_argument("--batch-size", type=int, default=100, help="global mini-batch size n_b")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file (rank 0)")
    args = p.parse_args(argv)
    comm = get_communicator("auto")
    spec = f"cuda:{comm.local_rank}" if args.device == "cuda" else args.device
    device = gpunn.get_device(spec)
    threads = share_cores(comm) if comm.size > 1 and not device.is_cuda else None
    train, _ = load_idx_dataset(resolve_data_dir(args.data_dir, progress=False))
    net = gpunn.MLP([784, 200, 10], device=device, seed=0)
    data = DeviceDataset(net, train.X, train.y, PIXEL_SCALE)
    engine = make_engine("auto", net, gpunn.SGD(net, 0.5), data, comm)
    order = data.order(0, 0, args.batch_size)
    per_epoch = data.n // args.batch_size

    def iteration(i: int) -> float:
        device.synchronize()
        t0 = time.perf_counter()
        rows = order[(i % per_epoch) * args.batch_size :][: args.batch_size]
        engine.step(rows, 0.5)
        device.synchronize()
        return time.perf_counter() - t0

    flat = net.xp.zeros(net.num_params + 2, dtype=net.dtype)

    def allreduce() -> float:
        comm.barrier()
        device.synchronize()
        t0 = time.perf_counter()
        comm.allreduce(flat)
        device.synchronize()
        return time.perf_counter() - t0

    for i in range(30):  # warm-up: buffers, prepared calls, thread pools, the communicator's first use
        iteration(i)
        allreduce()
    steps = [iteration(i) for i in range(args.steps)]
    reduces = [allreduce() for _ in range(args.steps)] if comm.size > 1 else [0.0]
    step, reduce = statistics.median(steps), statistics.median(reduces)
    figures = {
        "device": device.description(),
        "ranks": comm.size,
        "communicator": comm.name,
        "engine": engine.name,
        "threads_per_rank": threads,
        "global_batch": args.batch_size,
        "rows_per_rank": -(-args.batch_size // comm.size),
        "gradient_numbers": int(flat.size),
        "step_s": step,
        "allreduce_s": reduce,
        "compute_s": step - reduce,
        "allreduce_bytes": int(flat.nbytes),
    }
    if comm.is_root:
        print(
            f"{comm.size} rank(s), {comm.name}, {figures['device']}, engine {engine.name}: iteration "
            f"{1e6 * step:.0f} µs = compute {1e6 * (step - reduce):.0f} µs + allreduce {1e6 * reduce:.0f} µs "
            f"of {flat.nbytes / 1e6:.2f} MB"
        )
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
