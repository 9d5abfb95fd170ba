"""Example 6.2 with gpunn and with its peers on identical float32 work, timed side by side.

    python benchmarks/bench_mnist.py --device cpu --data-dir DIR --json benchmarks/results/cpu.json
    python benchmarks/bench_mnist.py --device cuda --data-dir DIR --json benchmarks/results/cuda.json
    python benchmarks/bench_mnist.py --table benchmarks/results/cpu.json     # the markdown tables of a run

The work is the lecture's recipe — 784-200-10 ReLU and 784→10, SGD γ = 0.5, n_b = 100, the real MNIST,
the whole validation set evaluated every 100 iterations — and it is identical for every contestant:
the same initial weights (gpunn's, copied in), the same per-epoch permutations (gpunn.data.epoch_order),
the same evaluation points and chunking, the same per-iteration records (mini-batch cost and
misclassification, kept on the device), the uint8 pixels converted per mini-batch inside each
contestant, float32, TF32 off. The peers: PyTorch eager, PyTorch with the whole step as one
``torch.compile(fullgraph=True)`` graph, JAX with the whole step under ``jax.jit``, and JAX with
``jax.lax.scan`` over the 100 steps between evaluations (benchmarks/peers.py).

How the figures are made honest: one warm-up epoch of each before any timing (compilation happens
there, reported apart); the device is synchronised before and after every timed epoch; each contestant
runs whole epochs (never interleaved steps, so thread pools never spin against each other), all of them
alternating epoch by epoch, the order reversed every run, with a pause between (on the CPU); every run
starts from the same initial weights; medians over ``--repeats`` runs. Each timed epoch records the CPU
seconds other processes used meanwhile (benchmarks/cpuload.py): an epoch is *quiet* when they used
under 5 % of one core, and a *round* (one epoch of every contestant) is quiet when all its epochs are.
The headline ratios pair each gpunn epoch with each peer's epoch of the same round, quiet rounds only,
and take the median. ``--load N`` then repeats the runs with N cores kept busy by other processes and
reports each contestant's loaded/quiet epoch ratio.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuload import BackgroundLoad, OtherProcessesCPU
from peers import JaxJitRun, JaxScanRun, TorchCompiledRun, TorchRun

import gpunn
from gpunn.commands import HelpFormatter
from gpunn.data import PIXEL_SCALE, DeviceDataset, load_idx_dataset, resolve_data_dir
from gpunn.engines import ENGINE_NAMES, REGISTRY, make_engine

MODELS = {"784-200-10": [200], "784-10": []}
# gpunn engines as a user cannot pick them by name: the CPU engine multiplying by every zero input too
# (it skips them on MNIST by default, engines/cpu_sparse.h), for the figure with the peers' arithmetic
VARIANTS = {"blas-dense": ("blas", {"use_sparse": False})}
PAUSE_S = 0.2  # between epochs on the CPU, so the last contestant's idle threads stop spinning
QUIET = 0.25  # an epoch is quiet when other processes used under this share of one core meanwhile


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
        if engine in VARIANTS:
            base, settings = VARIANTS[engine]
            variant = type(engine, (REGISTRY[base],), {**settings, "name": engine})
            self.engine = variant(self.net, self.optimizer, self.train)
        else:
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


# --- measuring -----------------------------------------------------------------------------------


def timed_epoch(run, e) -> tuple[float, float | None]:
    """(seconds, CPU seconds other processes used meanwhile) of epoch ``e`` of ``run``."""
    run.sync()
    meter = OtherProcessesCPU().start()
    t0 = time.perf_counter()
    run.epoch(e)
    run.sync()
    seconds = time.perf_counter() - t0
    return seconds, meter.stop()


def quiet(others: float | None, seconds: float) -> bool:
    return others is not None and others < QUIET * seconds


def measure_phase(runs, epochs, repeats, log, label):
    """``repeats`` fresh runs of ``epochs`` epochs, the contestants alternating epoch by epoch:
    {name: {"epoch_s": [...], "others_cpu_s": [...], "run_s": [...]}} plus the quiet rounds."""
    pause = 0.0 if runs[0].device.is_cuda else PAUSE_S  # idle CPU thread pools are a CPU matter
    out = {run.name: {"epoch_s": [], "others_cpu_s": [], "run_s": []} for run in runs}
    rounds_quiet = []
    for rep in range(repeats):
        order = runs if rep % 2 == 0 else runs[::-1]  # who goes first alternates, against drift
        for run in order:
            run.reset()
        for e in range(epochs):
            calm = True
            for run in order:
                seconds, others = timed_epoch(run, e)
                out[run.name]["epoch_s"].append(seconds)
                out[run.name]["others_cpu_s"].append(others)
                calm = calm and quiet(others, seconds)
                time.sleep(pause)
            rounds_quiet.append(calm)
        for run in runs:
            out[run.name]["run_s"].append(sum(out[run.name]["epoch_s"][-epochs:]))
        times = ", ".join(f"{r.name} {out[r.name]['run_s'][-1]:.2f} s" for r in runs)
        log(f"  {label} run {rep + 1}/{repeats}: {times}")
    return out, rounds_quiet


def measure_model(runs, epochs, repeats, log, load=0):
    """Warm-up, the quiet phase (and with ``load`` a phase beside N busy cores): every figure."""
    first = {}
    for run in runs:  # warm-up: one epoch each (compilation included), then the initial weights again
        first[run.name] = timed_epoch(run, 0)[0]
        run.reset()
        time.sleep(0.0 if run.device.is_cuda else PAUSE_S)
    phase, rounds_quiet = measure_phase(runs, epochs, repeats, log, "quiet")
    loaded = None
    if load:
        with BackgroundLoad(load):
            loaded, _ = measure_phase(runs, epochs, max(1, repeats // 2), log, f"{load} busy core(s)")
    out = {}
    for run in runs:
        times = phase[run.name]["epoch_s"]
        calm = [t for t, q in zip(times, rounds_quiet) if q] or times
        result = {
            "median_epoch_s": statistics.median(calm),
            "median_run_s": statistics.median(phase[run.name]["run_s"]),
            "epoch_times_s": times,
            "others_cpu_s": phase[run.name]["others_cpu_s"],
            "quiet_rounds": rounds_quiet,
            "run_times_s": phase[run.name]["run_s"],
            "first_epoch_extra_s": first[run.name] - statistics.median(times),
            "upload_s": run.upload_s,
            "engine_build_s": getattr(run, "build_s", None),
            "final_val_error": run_val_error(run),
            "device_memory_bytes": run.memory(),
        }
        if loaded is not None:
            result["loaded_epoch_times_s"] = loaded[run.name]["epoch_s"]
            result["loaded_over_quiet"] = (
                statistics.median(loaded[run.name]["epoch_s"]) / result["median_epoch_s"]
            )
        out[run.name] = result
    return out


def paired_ratio(ours: dict, theirs: dict) -> float | None:
    """Median over quiet rounds of our epoch time / their epoch time in the same round."""
    pairs = [
        a / b for a, b, q in zip(ours["epoch_times_s"], theirs["epoch_times_s"], ours["quiet_rounds"]) if q
    ]
    return float(np.median(pairs)) if pairs else None


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
    try:
        import jax

        info["jax"] = jax.__version__
    except ImportError:
        pass
    if device.is_cuda:
        runtime = device.xp.cuda.runtime
        info["cupy"] = device.xp.__version__
        info["cuda_runtime"], info["cuda_driver"] = runtime.runtimeGetVersion(), runtime.driverGetVersion()
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


PEERS = {run.name: run for run in (TorchRun, TorchCompiledRun, JaxJitRun, JaxScanRun)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--data-dir", help="MNIST folder; default: $GPUNN_DATA_DIR, else the download cache")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contestant (medians taken)")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run (15 = the lecture's 9000 steps)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="which models")
    p.add_argument(
        "--engines",
        nargs="+",
        choices=[*ENGINE_NAMES, *VARIANTS],
        default=["auto"],
        help="gpunn engines to time",
    )
    p.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS), help="peers to time")
    p.add_argument("--load", type=int, default=0, help="also time every contestant beside N busy cores")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--table", type=Path, metavar="JSON", help="print the tables of a saved run and stop")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run of 1 epoch")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
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

    def log(text):
        print(text, file=sys.stderr, flush=True)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device, torch),
        "settings": {
            "repeats": args.repeats,
            "epochs": args.epochs,
            "tf32": False,
            "dtype": "float32",
            "quiet": f"others used < {QUIET:.0%} of one core during the epoch",
            "load_cores": args.load,
        },
        "import_s": {"gpunn": import_seconds("gpunn"), "pytorch": import_seconds("torch")},
        "sgemm_gflops": sgemm_rate(device, torch),
        "models": {},
    }
    best_sgemm = max(report["sgemm_gflops"].values())
    for model in args.models:
        hidden = MODELS[model]
        log(f"{model} on {device.description()}: {args.repeats} runs × {args.epochs} epochs each")
        peers = []
        for name in args.peers:
            try:
                peers.append(PEERS[name](device, train, val, hidden, 0, args.epochs))
            except ImportError as exc:
                log(f"  {name} left out: {exc}")
        ours = [GpunnRun(device, train, val, hidden, 0, engine) for engine in args.engines]
        runs = ours + peers
        result = {"contestants": measure_model(runs, args.epochs, args.repeats, log, args.load)}
        flops = matmul_flops(hidden, epochs=args.epochs)
        result["matmul_gflop_per_run"] = flops / 1e9
        result["sgemm_floor_s"] = flops / (best_sgemm * 1e9)
        contestants = result["contestants"]
        for run in ours:
            mine = contestants[run.name]
            mine["run_over_sgemm_floor"] = mine["median_run_s"] / result["sgemm_floor_s"]
            mine["paired_ratio"], mine["agreement_first_100_costs"] = {}, {}
            for peer in peers:
                mine["paired_ratio"][peer.name] = paired_ratio(mine, contestants[peer.name])
                mine["agreement_first_100_costs"][peer.name] = agreement(run, peer)
        report["models"][model] = result
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(report) -> str:
    """The markdown tables of a run: per model, every contestant's epoch and run, and gpunn's paired
    ratio to each peer (quiet rounds); with a load phase, loaded/quiet; then the one-time costs."""
    m, best = report["machine"], max(report["sgemm_gflops"].values())
    settings = report["settings"]
    lines = [
        f"{report['date'][:10]}, {m['device']}: {m['cpu']}, {m['cpu_count']} cores, {m['blas']}, "
        f"torch {m.get('torch')}, jax {m.get('jax', '–')}; {settings['repeats']} runs × "
        f"{settings['epochs']} epochs, medians of quiet rounds; best sgemm {best:.0f} GFLOP/s",
    ]
    for model, r in report["models"].items():
        contestants = r["contestants"]
        ours = [name for name in contestants if name.startswith("gpunn")]
        loaded = any("loaded_over_quiet" in c for c in contestants.values())
        header = "| contestant | epoch | run | " + " | ".join(f"{g} / it" for g in ours)
        header += " | loaded / quiet |" if loaded else " |"
        lines += ["", f"**{model}** (sgemm floor of a run: {r['sgemm_floor_s']:.2f} s)", "", header]
        lines.append("|---" * (3 + len(ours) + loaded) + "|")
        for name, c in contestants.items():
            ratios = [contestants[g]["paired_ratio"].get(name) if name != g else None for g in ours]
            cells = ["–" if x is None else f"**{x:.2f}**" for x in ratios]
            row = f"| {name} | {c['median_epoch_s']:.3f} s | {c['median_run_s']:.2f} s | " + " | ".join(cells)
            row += f" | {c['loaded_over_quiet']:.2f} |" if loaded else " |"
            lines.append(row)
        for g in ours:
            quiet_rounds = sum(contestants[g]["quiet_rounds"])
            lines.append(
                f"\n{g}: run {contestants[g]['run_over_sgemm_floor']:.2f} × the sgemm floor; "
                f"{quiet_rounds} of {len(contestants[g]['quiet_rounds'])} rounds quiet"
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
            for peer, gap in (c.get("agreement_first_100_costs") or {}).items():
                if peer == "pytorch":
                    parts.append(f"first 100 costs within {gap:.1e} of PyTorch's")
            if c["device_memory_bytes"]:
                parts.append(f"device memory {c['device_memory_bytes'] / 2**20:.0f} MiB")
            lines.append(f"- {model} {name}: " + ", ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
