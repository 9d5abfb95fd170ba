"""A/B of two checkouts of gpunn on the CPU: whole epochs of Example 6.2, alternating, each checkout in a
process of its own.

    python benchmarks/ab_trees.py --data-dir ../shared/data/mnist OLD_CHECKOUT NEW_CHECKOUT [--rounds 8]

Why separate processes: two engines in one process leave each other's thread pools behind (OpenBLAS's
threads spin for a while after a call), and whichever runs second pays for them. Here each checkout's
process waits, idle, while the other runs an epoch (600 iterations and 6 evaluations, through
``gpunn.fit`` with the engine ``auto`` makes, built once); a pause separates epochs, the order flips every
round, and the ratio is the median of each round's pair (this VM's speed drifts by up to two times over
minutes). Each checkout must be built in place (``pip install -e`` there, or ``python setup.py
build_ext --inplace``) for its CPU kernels.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import gpunn
from gpunn.data import PIXEL_SCALE, DeviceDataset, load_idx_dataset
from gpunn.engines import make_engine
train, val = load_idx_dataset(__import__("pathlib").Path(sys.argv[2]))
net = gpunn.MLP([784, *map(int, filter(None, sys.argv[3].split(","))), 10], seed=0, dtype="float32")
train, val = DeviceDataset(net, train.X, train.y, PIXEL_SCALE), DeviceDataset(net, val.X, val.y, PIXEL_SCALE)
optimizer = gpunn.SGD(net, 0.5)
engine, history = make_engine("auto", net, optimizer, train), gpunn.History()
print(gpunn.__file__, engine.name, flush=True)
for line in sys.stdin:
    started = time.perf_counter()
    gpunn.fit(net, train, epochs=int(line) + 1, batch_size=100, optimizer=optimizer, validation_data=val,
              eval_every=100, seed=0, engine=engine, progress=False, history=history)
    print(time.perf_counter() - started, flush=True)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkouts", nargs=2, help="the two checkouts' folders (A, then B)")
    p.add_argument("--data-dir", required=True, help="MNIST folder")
    p.add_argument("--rounds", type=int, default=8, help="timed epochs of each (after one to warm up)")
    p.add_argument("--hidden", default="200", help="hidden layer sizes, comma-separated ('' for 784-10)")
    args = p.parse_args(argv)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, tree, args.data_dir, args.hidden],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for tree in args.checkouts
    ]
    for tree, proc in zip(args.checkouts, procs):
        print(f"{tree}: {proc.stdout.readline().strip()}")
    times: list[list[float]] = [[], []]
    for r in range(args.rounds + 1):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            procs[i].stdin.write(f"{r}\n")
            procs[i].stdin.flush()
            seconds = float(procs[i].stdout.readline())
            if r:  # round 0 warms up
                times[i].append(seconds)
            time.sleep(0.3)
    for proc in procs:
        proc.stdin.close()
        proc.wait()
    for tree, t in zip(args.checkouts, times):
        print(f"{tree}: epoch median {statistics.median(t):.3f} s ({', '.join(f'{x:.3f}' for x in t)})")
    ratio = statistics.median(b / a for a, b in zip(*times))
    print(f"paired ratio B / A: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
