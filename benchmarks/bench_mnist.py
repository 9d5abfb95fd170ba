"""Example 6.2 with gpunn and with PyTorch on identical float32 work, timed side by side.

    python benchmarks/bench_mnist.py --device cpu --data-dir ../shared/data/mnist --json bench-cpu.json
    python benchmarks/bench_mnist.py --device cuda --data-dir DIR --json bench-cuda.json

The work is the lecture's recipe — 784-200-10 ReLU and 784→10, SGD γ = 0.5, n_b = 100, the real MNIST,
the whole validation set every 100 iterations — and it is identical for both frameworks: the same
initial weights (gpunn's, copied into PyTorch), the same per-epoch permutations (gpunn.data.epoch_order),
the same evaluation points and chunking, the same per-iteration records (mini-batch cost and
misclassification, kept on the device), float32, TF32 off on both.

How the figures are made honest: one warm-up epoch of each before any timing; the device is
synchronised before and after every timed epoch; each framework runs whole epochs (never interleaved
steps, so two BLAS/OpenMP thread pools never spin against each other), the two alternating epoch by
epoch with a pause between blocks; every run starts from the same initial weights; medians over
``--repeats`` runs. The epoch ratio is the median over all epochs of gpunn's epoch time divided by
the PyTorch epoch timed right after it: a shared machine's speed drifts by a factor of two over
minutes, and neighbouring epochs see the same machine. One-time costs (import, data upload, the first
epoch's extra time, which on a GPU includes kernel compilation) are reported apart from the steady
state.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpunn
from gpunn.data import PIXEL_SCALE, DeviceDataset, epoch_order, load_idx_dataset, resolve_data_dir
from gpunn.engines import EVAL_CHUNK, make_engine
from gpunn.model import init_theta, param_views

MODELS = {"784-200-10": [200], "784-10": []}
PAUSE_S = 0.2  # between blocks, so the other framework's idle threads stop spinning before timing


def matmul_flops(hidden, n_train=60000, n_val=10000, batch=100, epochs=15, eval_every=100) -> float:
    """Multiply-add work of one run: training forward + dW + dQ (not for layer 1) + validation."""
    pairs = list(itertools.pairwise([784, *hidden, 10]))
    forward = sum(2 * p * u for p, u in pairs)
    backward = sum(2 * p * u for p, u in pairs) + sum(2 * p * u for p, u in pairs[1:])
    steps = epochs * (n_train // batch)
    return steps * batch * (forward + backward) + (steps // eval_every) * n_val * forward


# --- the two contestants -------------------------------------------------------------------------


class GpunnRun:
    """gpunn's own training loop (gpunn.fit, what train_mnist.py runs), one epoch at a time."""

    def __init__(self, device, train, val, hidden, seed, engine="auto"):
        self.device, self.seed = device, seed
        self.net = gpunn.MLP([784, *hidden, 10], "relu", "classification", device, seed, "float32")
        self.theta0 = self.net.theta.copy()
        t0 = time.perf_counter()
        self.train = DeviceDataset(self.net, train.X, train.y, PIXEL_SCALE)
        self.val = DeviceDataset(self.net, val.X, val.y, PIXEL_SCALE)
        device.synchronize()
        self.upload_s = time.perf_counter() - t0
        # The engine (its buffers, prepared calls and captured CUDA graphs, which hold θ's address) is
        # made once, as a training run makes it once: kernel compilation, prepared calls, trial capture.
        self.optimizer = gpunn.SGD(self.net, lr=0.5)
        t0 = time.perf_counter()
        self.engine = make_engine(engine, self.net, self.optimizer, self.train)
        device.synchronize()
        self.build_s = time.perf_counter() - t0
        self.name = f"gpunn-{self.engine.name}"
        self.reset()

    def reset(self):
        """Back to the initial weights, in place."""
        self.net.theta[...] = self.theta0
        self.history = gpunn.History()
        self.records = self.history.records

    def epoch(self, e):
        gpunn.fit(
            self.net,
            self.train,
            epochs=e + 1,
            batch_size=100,
            optimizer=self.optimizer,
            validation_data=self.val,
            eval_every=100,
            seed=self.seed,
            engine=self.engine,
            progress=False,
            history=self.history,
        )

    def sync(self):
        self.device.synchronize()

    def losses(self):
        return np.asarray(self.history.batch_loss)

    def memory(self):
        return self.device.memory_used()


class TorchRun:
    """The same loop written the way PyTorch users write it: data on the device, no per-step .item()."""

    name = "pytorch"

    def __init__(self, device, train, val, hidden, seed, epochs):
        import torch

        self.torch = torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        self.dev = torch.device("cpu" if not device.is_cuda else f"cuda:{device.index}")
        self.hidden, self.seed = hidden, seed
        self.iterations = max(1, epochs) * -(-train.X.shape[0] // 100)
        host = [
            np.array(a, dtype=t)
            for a, t in ((train.X, None), (train.y, np.int64), (val.X, None), (val.y, np.int64))
        ]
        t0 = time.perf_counter()  # torch.from_numpy wants writable arrays: copied above, untimed
        self.Xtr, self.ytr, self.Xva, self.yva = (torch.from_numpy(a).to(self.dev) for a in host)
        self.sync()
        self.upload_s = time.perf_counter() - t0
        self.reset()

    def reset(self):
        torch, sizes = self.torch, [784, *self.hidden, 10]
        layers = []
        theta = init_theta(sizes, "relu", self.seed, np.float32)  # gpunn's initial weights, exactly
        for l, (W, b) in enumerate(param_views(theta, sizes)):
            lin = torch.nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W)))
                lin.bias.copy_(torch.from_numpy(b.copy()))
            layers += [lin] + ([torch.nn.ReLU()] if l < len(sizes) - 2 else [])
        self.model = torch.nn.Sequential(*layers).to(self.dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.5)
        self.loss_hist = torch.zeros(self.iterations, device=self.dev)
        self.error_hist = torch.zeros(self.iterations, device=self.dev, dtype=torch.int64)
        self.t = 0
        self.records = []

    def evaluate(self):
        torch = self.torch
        cost = torch.zeros((), device=self.dev, dtype=torch.float64)
        errors = torch.zeros((), device=self.dev, dtype=torch.int64)
        with torch.no_grad():
            for s in range(0, self.Xva.shape[0], EVAL_CHUNK):  # gpunn's chunks
                X = self.Xva[s : s + EVAL_CHUNK].float().mul_(1 / 255)
                y = self.yva[s : s + EVAL_CHUNK]
                Z = self.model(X)
                cost += torch.nn.functional.cross_entropy(Z, y, reduction="sum")
                errors += (Z.argmax(1) != y).sum()
        return float(cost) / self.Xva.shape[0], float(errors) / self.Xva.shape[0]

    def epoch(self, e):
        torch, F = self.torch, self.torch.nn.functional
        order = torch.from_numpy(epoch_order(self.seed, e, self.Xtr.shape[0], 100)).to(self.dev)
        for i in range(0, order.shape[0], 100):
            rows = order[i : i + 100]
            X = self.Xtr.index_select(0, rows).float().mul_(1 / 255)
            y = self.ytr.index_select(0, rows)
            Z = self.model(X)
            loss = F.cross_entropy(Z, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.loss_hist[self.t] = loss.detach()  # the lecture's blue curves: cost and errors
            self.error_hist[self.t] = (Z.detach().argmax(1) != y).sum()
            self.t += 1
            if self.t % 100 == 0:
                self.records.append(self.evaluate())

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def losses(self):
        return self.loss_hist[: self.t].cpu().numpy().astype(np.float64)

    def memory(self):
        return int(self.torch.cuda.max_memory_allocated(self.dev)) if self.dev.type == "cuda" else 0


# --- measuring -----------------------------------------------------------------------------------


def timed_epoch(run, e) -> float:
    run.sync()
    t0 = time.perf_counter()
    run.epoch(e)
    run.sync()
    return time.perf_counter() - t0


def measure_model(runs, epochs, repeats, log):
    """Warm-up, then ``repeats`` fresh runs of ``epochs`` epochs, the contestants alternating epochs."""
    first = {}
    pause = 0.0 if runs[0].device.is_cuda else PAUSE_S  # idle CPU thread pools are a CPU matter
    for run in runs:  # warm-up: one epoch each, then start again from the initial weights
        first[run.name] = timed_epoch(run, 0)
        run.reset()
        time.sleep(pause)
    epoch_times = {run.name: [] for run in runs}
    run_times = {run.name: [] for run in runs}
    for rep in range(repeats):
        order = runs if rep % 2 == 0 else runs[::-1]  # who goes first alternates, against drift
        for run in order:
            run.reset()
        for e in range(epochs):
            for run in order:
                epoch_times[run.name].append(timed_epoch(run, e))
                time.sleep(pause)
        for run in runs:
            run_times[run.name].append(sum(epoch_times[run.name][-epochs:]))
        times = ", ".join(f"{r.name} {run_times[r.name][-1]:.2f} s" for r in runs)
        log(f"  run {rep + 1}/{repeats}: {times}")
    out = {}
    for run in runs:
        med_epoch = statistics.median(epoch_times[run.name])
        out[run.name] = {
            "median_epoch_s": med_epoch,
            "median_run_s": statistics.median(run_times[run.name]),
            "epoch_times_s": epoch_times[run.name],
            "run_times_s": run_times[run.name],
            "first_epoch_extra_s": first[run.name] - med_epoch,
            "upload_s": run.upload_s,
            "engine_build_s": getattr(run, "build_s", None),
            "final_val_error": run_val_error(run),
            "device_memory_bytes": run.memory(),
        }
    return out


def run_val_error(run):
    last = run.records[-1]
    return last["val_error"] if isinstance(last, dict) else last[1]


def agreement(a, b, n=100) -> float:
    """Largest relative difference of the first n mini-batch costs: proof the work is the same."""
    x, y = a.losses()[:n], b.losses()[:n]
    return float(np.max(np.abs(x - y) / np.abs(y)))


def sgemm_rate(device, torch_mod=None, n=2048, repeats=7) -> dict:
    """GFLOP/s of a large float32 matrix product through NumPy/CuPy and through PyTorch."""
    rates = {}
    xp = device.xp
    A = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    B, C = A.copy(), xp.empty_like(A)
    rates["gpunn-xp"] = _rate(lambda: xp.matmul(A, B, out=C), device.synchronize, n, repeats)
    if torch_mod is not None:
        dev = "cuda" if device.is_cuda else "cpu"
        tA = torch_mod.randn(n, n, device=dev)
        tC = torch_mod.empty_like(tA)
        sync = torch_mod.cuda.synchronize if device.is_cuda else (lambda: None)
        rates["pytorch"] = _rate(lambda: torch_mod.matmul(tA, tA, out=tC), sync, n, repeats)
    return rates


def _rate(f, sync, n, repeats):
    f()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def machine(device, torch_mod) -> dict:
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gpunn": gpunn.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device.description(),
        "blas": _blas(),
        "blas_threads": _blas_threads(),
        "env_threads": {
            k: v for k, v in os.environ.items() if k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        },
    }
    if torch_mod is not None:
        info["torch"] = torch_mod.__version__
        info["torch_threads"] = torch_mod.get_num_threads()
    if device.is_cuda:
        info["cupy"] = device.xp.__version__
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _blas() -> str:
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{deps.get('name')} {deps.get('version')}"
    except Exception:
        return "unknown"


def _blas_threads():
    try:
        from threadpoolctl import threadpool_info

        return {p["internal_api"]: p["num_threads"] for p in threadpool_info()}
    except ImportError:
        return "threadpoolctl not installed (OpenBLAS uses one thread per core unless told otherwise)"


# --- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--data-dir", help="MNIST folder (default: $GPUNN_DATA_DIR, else the download cache)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per framework (median taken)")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run (15 = the lecture's 9000 steps)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="which models")
    p.add_argument(
        "--engines",
        nargs="+",
        choices=["xp", "blas", "fused", "graph"],
        help="gpunn engines to time (default: blas on the CPU; xp, fused and graph on CUDA)",
    )
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run of 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs = 1, 1
    try:
        import torch
    except ImportError:
        print("bench_mnist.py: error: PyTorch is the peer: pip install 'gpunn[bench]'", file=sys.stderr)
        return 1
    try:
        device = gpunn.get_device(args.device)
        train, val = load_idx_dataset(resolve_data_dir(args.data_dir, progress=False))
    except gpunn.GpunnError as exc:
        print(f"bench_mnist.py: error: {exc}", file=sys.stderr)
        return 1
    engines = args.engines or (["xp", "fused", "graph"] if device.is_cuda else ["blas"])

    def log(text):
        print(text, file=sys.stderr, flush=True)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device, torch),
        "settings": {"repeats": args.repeats, "epochs": args.epochs, "tf32": False, "dtype": "float32"},
        "import_s": {"gpunn": import_seconds("gpunn"), "pytorch": import_seconds("torch")},
        "sgemm_gflops": sgemm_rate(device, torch),
        "models": {},
    }
    best_sgemm = max(report["sgemm_gflops"].values())
    for model in args.models:
        hidden = MODELS[model]
        log(f"{model} on {device.description()}: {args.repeats} runs × {args.epochs} epochs each")
        peer = TorchRun(device, train, val, hidden, 0, args.epochs)
        runs = [GpunnRun(device, train, val, hidden, 0, engine) for engine in engines] + [peer]
        result = {"contestants": measure_model(runs, args.epochs, args.repeats, log)}
        flops = matmul_flops(hidden, epochs=args.epochs)
        result["matmul_gflop_per_run"] = flops / 1e9
        result["sgemm_floor_s"] = flops / (best_sgemm * 1e9)
        peer_times = result["contestants"][peer.name]
        for run in runs[:-1]:
            ours = result["contestants"][run.name]
            ours["agreement_first_100_costs"] = agreement(run, peer)
            paired = np.divide(ours["epoch_times_s"], peer_times["epoch_times_s"])
            ours["epoch_ratio"] = float(np.median(paired))  # each epoch against its neighbour
            ours["run_ratio"] = ours["median_run_s"] / peer_times["median_run_s"]
            ours["run_over_sgemm_floor"] = ours["median_run_s"] / result["sgemm_floor_s"]
        report["models"][model] = result
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(report) -> str:
    """The README's table: one row per model and gpunn engine, PyTorch measured in the same run."""
    m, best = report["machine"], max(report["sgemm_gflops"].values())
    lines = [
        f"{m['device']}: {m['cpu']}, {m['cpu_count']} cores, {m['blas']}, torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads); {report['settings']['repeats']} runs × "
        f"{report['settings']['epochs']} epochs, medians; best sgemm {best:.0f} GFLOP/s",
        "",
        "| model | engine | gpunn epoch | PyTorch epoch | paired ratio | gpunn run | PyTorch run | ratio "
        "| run / sgemm floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in report["models"].items():
        peer = r["contestants"]["pytorch"]
        for name, g in r["contestants"].items():
            if name == "pytorch":
                continue
            lines.append(
                f"| {model} | {name} | {g['median_epoch_s']:.3f} s | {peer['median_epoch_s']:.3f} s "
                f"| {g['epoch_ratio']:.2f} | {g['median_run_s']:.2f} s | {peer['median_run_s']:.2f} s "
                f"| {g['run_ratio']:.2f} | {g['run_over_sgemm_floor']:.2f} × {r['sgemm_floor_s']:.2f} s |"
            )
    imports = report["import_s"]
    lines += [
        "",
        f"One-time costs: import gpunn {imports['gpunn']:.2f} s, PyTorch {imports['pytorch']:.2f} s",
    ]
    for model, r in report["models"].items():
        for name, c in r["contestants"].items():
            parts = [f"upload {c['upload_s'] * 1e3:.1f} ms"]
            if c.get("engine_build_s") is not None:
                parts.append(f"engine built in {c['engine_build_s']:.2f} s")
            parts.append(f"first epoch {c['first_epoch_extra_s']:+.3f} s over the median")
            parts.append(f"final validation error {100 * c['final_val_error']:.2f} %")
            if c.get("agreement_first_100_costs") is not None:
                parts.append(f"first 100 costs within {c['agreement_first_100_costs']:.1e} of PyTorch's")
            if c["device_memory_bytes"]:
                parts.append(f"device memory {c['device_memory_bytes'] / 2**20:.0f} MiB")
            lines.append(f"  {model} {name}: " + ", ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
