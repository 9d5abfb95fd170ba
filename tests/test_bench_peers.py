"""The benchmark's extra peers (benchmarks/peers.py) do the work of its TorchRun, and
benchmarks/cpuload.py sees other processes' CPU use.

The peers run on the real MNIST of $GPUNN_DATA_DIR (skipped where it is unset) and need JAX or
PyTorch (skipped where absent, failed instead under GPUNN_REQUIRE_JAX=1 / GPUNN_REQUIRE_TORCH=1).
Each contestant trains one epoch of the 784-200-10 network: its first 100 mini-batch costs must
agree with TorchRun's to 1e-4 (relative) and its validation error after the epoch to 0.3 points.
No timing is asserted: timing is not a unit test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpunn.data import load_idx_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # scripts, not a package

import cpuload
import peers

from helpers import need

BENCHMARKS = Path(peers.__file__).parent

HIDDEN = [200]
PEERS = {"jax-jit": "JaxJitRun", "jax-scan": "JaxScanRun", "pytorch-compiled": "TorchCompiledRun"}
NEEDS = {"jax-jit": "jax", "jax-scan": "jax", "pytorch-compiled": "torch"}
REQUIRE = {"jax": "GPUNN_REQUIRE_JAX", "torch": "GPUNN_REQUIRE_TORCH"}
PEER = "a benchmark peer"
# Inductor's first import runs a deprecated torch.jit decorator of PyTorch's own: not ours to fix.
INDUCTOR_IMPORT = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_idx_dataset(mnist_dir)


@pytest.fixture(scope="module")
def torch_one_thread():
    """PyTorch on one CPU thread while these tests run: its OpenMP team of one thread per core slows
    down tenfold when another process takes a core of a small shared machine, and the agreement of
    costs does not depend on the thread count."""
    torch = need("torch", REQUIRE["torch"], PEER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_reference(mnist, torch_one_thread):
    """TorchRun's first epoch on each device asked for: (its costs, its last (val_loss, val_error))."""
    done = {}

    def run(device):
        if device.name not in done:
            from peers import TorchRun

            ref = TorchRun(device, *mnist, HIDDEN, 0, 1)
            ref.epoch(0)
            done[device.name] = (ref.losses(), ref.records[-1])
        return done[device.name]

    return run


def make(name, device, train, val, epochs):
    need(NEEDS[name], REQUIRE[NEEDS[name]], PEER)
    try:
        return getattr(peers, PEERS[name])(device, train, val, HIDDEN, 0, epochs)
    except ImportError as exc:  # e.g. a JAX without CUDA on a GPU machine
        if os.environ.get(REQUIRE[NEEDS[name]]) == "1":
            raise
        pytest.skip(str(exc))


@pytest.mark.mnist
@pytest.mark.filterwarnings(INDUCTOR_IMPORT)
@pytest.mark.parametrize("name", list(PEERS))
def test_peer_does_torchruns_work(name, mnist, device, torch_reference):
    ref_costs, (ref_loss, ref_error) = torch_reference(device)
    run = make(name, device, *mnist, epochs=1)
    assert run.name == name and run.upload_s > 0 and run.records == []
    run.epoch(0)
    run.sync()
    costs = run.losses()
    assert costs.dtype == np.float64 and costs.shape == (600,) and len(run.records) == 6
    assert np.max(np.abs(costs[:100] - ref_costs[:100]) / ref_costs[:100]) < 1e-4
    val_loss, val_error = run.records[-1]
    assert abs(val_error - ref_error) < 0.003 and abs(val_loss - ref_loss) < 0.01
    assert isinstance(run.memory(), int) and run.memory() >= 0
    run.reset()
    assert run.records == [] and run.losses().size == 0


@pytest.mark.mnist
def test_jax_scan_cuts_at_evaluations_and_epoch_ends(mnist, device, torch_one_thread):
    """Epochs of 24 steps, the last a partial mini-batch of 45 rows: the scans stop at the epoch's
    last full mini-batch and at the evaluation after 100 iterations (counted over the run, so 4 steps
    into the fifth epoch), and do TorchRun's work all the same."""
    from peers import TorchRun

    train, val = mnist
    subset = SimpleNamespace(X=train.X[:2345], y=train.y[:2345])
    val = SimpleNamespace(X=val.X[:2500], y=val.y[:2500])  # chunks of 1000, 1000 and 500
    scan = make("jax-scan", device, subset, val, epochs=5)
    ref = TorchRun(device, subset, val, HIDDEN, 0, 5)
    for run in (scan, ref):
        for e in range(5):
            run.epoch(e)
    scan.sync()
    assert scan.losses().shape == ref.losses().shape == (120,)
    np.testing.assert_allclose(scan.losses(), ref.losses(), rtol=1e-4)
    assert len(scan.records) == len(ref.records) == 1
    np.testing.assert_allclose(scan.records, ref.records, rtol=1e-4)
    with pytest.raises(RuntimeError, match="past the 120"):
        scan.epoch(5)


def test_importing_peers_imports_neither_jax_nor_torch():
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import peers; " + (
        "print(sorted({'jax', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(PEERS))
def test_a_missing_framework_is_one_line(name, monkeypatch):
    monkeypatch.setitem(sys.modules, NEEDS[name], None)  # "import jax" now raises ImportError
    with pytest.raises(ImportError, match=f"^{name} needs {NEEDS[name]}") as exc:
        getattr(peers, PEERS[name])(SimpleNamespace(is_cuda=False), None, None, HIDDEN, 0, 1)
    assert "\n" not in str(exc.value)


# --- cpuload -------------------------------------------------------------------------------------


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(work, seconds=1.0) -> cpuload.OtherProcessesCPU:
    with cpuload.OtherProcessesCPU() as meter:
        work(seconds)
    return meter


def visible_cpu() -> dict[int, float]:
    """CPU seconds used so far by each process in /proc other than this one, its reaped children
    included: an independent account of what others do, blind only to other PID namespaces."""
    seconds, tick = {}, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        seconds[int(entry.name)] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    return seconds


def visible_since(before: dict[int, float]) -> float:
    """Others' CPU seconds since ``before``, as far as /proc shows them: a process that exited
    meanwhile reappears in its parent's children's time, whole (an overestimate, never an under)."""
    return sum(s - before.get(pid, 0.0) for pid, s in visible_cpu().items())


@pytest.mark.skipif(not cpuload.PROC_STAT.exists(), reason="no /proc/stat: the meter answers None")
def test_other_processes_cpu_sees_a_busy_core_and_not_its_own():
    before = visible_cpu()
    own = measure(spin)  # this process busy for 1 s: none of it is others'
    seen = visible_since(before)
    assert own.own_s > 0.3 and own.wall_s >= 1.0 and own.steal_s >= 0 and own.cpus >= 1
    # ~0 on a quiet machine; on a shared one, no more than the other processes in sight used
    assert own.others_s < 0.2 + 1.2 * seen, (own.others_s, seen)
    with cpuload.BackgroundLoad(cores=1):
        loaded = measure(time.sleep)
    assert loaded.others_s > 0.5  # one busy core for ~1 s
    assert loaded.quiet() is False


def test_background_load_is_killed_on_exit_and_on_interrupt():
    with cpuload.BackgroundLoad(cores=1) as load:
        started = list(load.processes)
        assert len(started) == 1 and started[0].poll() is None
    assert started[0].returncode is not None and load.processes == []
    with pytest.raises(KeyboardInterrupt), cpuload.BackgroundLoad(cores=2) as load:
        started = list(load.processes)
        raise KeyboardInterrupt
    assert len(started) == 2 and all(p.returncode is not None for p in started)


def test_other_processes_cpu_off_linux(monkeypatch, tmp_path):
    monkeypatch.setattr(cpuload, "PROC_STAT", tmp_path / "absent")
    meter = measure(lambda s: None, 0)
    assert meter.others_s is None and meter.quiet() is None and meter.wall_s >= 0
