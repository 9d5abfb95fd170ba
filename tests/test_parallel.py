"""Data parallelism: N ranks compute what one process computes. Every engine under N ranks simulated
by threads (tests/fake_comm.py), and the command line under a real ``mpiexec -n 2`` and ``-n 3``
(uneven slices of every mini-batch, a partial last batch), in float64, compared with one process:
every recorded value and the final parameters to 1e-10, and a checkpoint written by 2 ranks
continued by 3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpunn
from gpunn.data import DeviceDataset
from gpunn.optim import make_optimizer

from fake_comm import run_ranks

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_mnist.py"
RTOL = 1e-10
VALUES = ("iteration", "epoch", "train_loss", "train_error", "val_loss", "val_error", "lr")


def fit_on_ranks(make_engine, ranks: int, optimizer: str):
    """gpunn.fit on ``ranks`` simulated ranks (None: no communicator): each rank's (history, θ)."""
    rng = np.random.default_rng(3)
    X, y = rng.integers(0, 256, (230, 12), dtype=np.uint8), rng.integers(0, 4, 230)

    def train(comm):
        net = gpunn.MLP([12, 9, 4], "tanh", device="cpu", seed=2, dtype="float64")
        opt = make_optimizer(net, optimizer, lr=0.05)
        data, val = DeviceDataset(net, X, y, 1 / 255), DeviceDataset(net, X[:130], y[:130], 1 / 255)
        engine = make_engine(net, opt, data, comm)
        history = gpunn.fit(
            net, data, epochs=2, batch_size=40, optimizer=opt, validation_data=val, eval_every=4,
            engine=engine, comm=comm, progress=False,
        )  # fmt: skip
        return history, net.theta.copy()

    return run_ranks(ranks, train) if ranks else [train(None)]


def assert_same(history, theta, ref_history, ref_theta):
    np.testing.assert_allclose(history.batch_loss, ref_history.batch_loss, rtol=RTOL)
    np.testing.assert_array_equal(history.batch_error, ref_history.batch_error)
    for key in VALUES:
        np.testing.assert_allclose(
            [r[key] for r in history.records], [r[key] for r in ref_history.records], rtol=RTOL, err_msg=key
        )
    np.testing.assert_allclose(theta, ref_theta, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("engine", ["xp", "blas", "fused"])
@pytest.mark.parametrize("ranks", [2, 3, 7])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_n_ranks_train_like_one_process(engine_factory, engine, ranks, optimizer):
    """40 rows a mini-batch and 30 in the last: 3 ranks take 13, 13, 14 (and 10 each); 7 ranks 5 or 6."""
    make = engine_factory(engine)
    [(ref_history, ref_theta)] = fit_on_ranks(make, 0, optimizer)
    results = fit_on_ranks(make, ranks, optimizer)
    for history, theta in results:
        assert_same(history, theta, ref_history, ref_theta)
    for _, theta in results[1:]:
        np.testing.assert_array_equal(theta, results[0][1])  # every rank holds the same network


def test_ranks_with_no_rows_take_part_and_add_nothing(engine_factory):
    """A mini-batch of 2 rows on 3 ranks: one rank gets none in every iteration."""
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((10, 3)), rng.standard_normal(10)

    def train(comm):
        net = gpunn.MLP([3, 5, 1], task="regression", device="cpu", seed=0, dtype="float64")
        gpunn.fit(net, X, y, epochs=3, batch_size=2, lr=0.05, comm=comm, progress=False)
        return net.theta.copy()

    ref = train(None)
    for theta in run_ranks(3, train):
        np.testing.assert_allclose(theta, ref, rtol=RTOL, atol=1e-14)


# --- the command line under a real mpiexec ---------------------------------------------------------


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        if os.environ.get("GPUNN_REQUIRE_MPI") == "1":
            pytest.fail("GPUNN_REQUIRE_MPI=1 but no mpiexec was found (pip install 'gpunn[mpi]')")
        pytest.skip("no mpiexec here (pip install 'gpunn[mpi]' brings MPICH's)")
    return found


FLAGS = ["--device", "cpu", "--hidden", "16", "--batch-size", "64", "--eval-every", "7", "--lr", "0.2"]
FLAGS += ["--dtype", "float64", "--no-progress", "--optimizer", "sgd", "--momentum", "0.5"]


def train_cli(ranks: int, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *FLAGS, "--data-dir", str(data), "--out", str(out), *extra]
    if ranks:
        command = [mpiexec(), "-n", str(ranks), *command]
    env = {k: v for k, v in os.environ.items() if k != "GPUNN_DATA_DIR"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, ref: Path, extra_evaluations=()) -> None:
    got, want = metrics(out), metrics(ref)
    assert [r["iteration"] for r in got if r["iteration"] not in extra_evaluations] == [
        r["iteration"] for r in want
    ]
    got = [r for r in got if r["iteration"] not in extra_evaluations]
    # train_loss/train_error average the iterations since the previous evaluation: an extra one moves
    # the window of the next (the per-iteration values themselves are compared in the checkpoint below)
    for key in [k for k in VALUES if not (extra_evaluations and k.startswith("train"))]:
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=RTOL, err_msg=key)
    with np.load(out / "checkpoint.npz") as a, np.load(ref / "checkpoint.npz") as b:
        for name in ("W1", "b1", "W2", "b2", "velocity", "batch_loss", "batch_error"):
            np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpiexec_trains_like_one_process(digits_dir, tmp_path, ranks):
    """1200 rows in mini-batches of 64: 18 full and one of 48; 3 ranks take 21, 21, 22 (and 16 each)."""
    mpiexec()
    train_cli(0, digits_dir, tmp_path / "one", "--epochs", "2")
    result = train_cli(ranks, digits_dir, tmp_path / "many", "--epochs", "2")
    assert f"on {ranks} ranks" in result.stdout and result.stdout.count("done:") == 1  # rank 0 speaks
    assert json.loads((tmp_path / "many" / "config.json").read_text())["ranks"] == ranks
    assert_same_run(tmp_path / "many", tmp_path / "one")


def test_a_checkpoint_of_2_ranks_continues_on_3(digits_dir, tmp_path):
    mpiexec()
    train_cli(0, digits_dir, tmp_path / "one", "--epochs", "3")
    train_cli(2, digits_dir, tmp_path / "many", "--epochs", "1")
    train_cli(3, digits_dir, tmp_path / "many", "--epochs", "3", "--resume")
    assert_same_run(tmp_path / "many", tmp_path / "one", extra_evaluations=[19])  # where the first run ended


def test_a_failure_on_every_rank_is_one_line_and_ends_every_rank(tmp_path):
    mpiexec()
    command = [
        mpiexec(),
        "-n",
        "2",
        sys.executable,
        str(SCRIPT),
        *FLAGS,
        "--data-dir",
        str(tmp_path / "none"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "train_mnist.py" in line]
    assert len(lines) == 1 and "is not a folder" in lines[0], result.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["xp", "fused", "graph"])
def test_nccl_on_one_rank_trains_like_one_process(cuda_device, engine):
    """NCCL's single-rank path (a real NCCL allreduce of every gradient, on the compute stream, inside
    the graph for ``graph``) computes what no communicator computes."""
    pytest.importorskip(
        "mpi4py", reason="the NCCL communicator bootstraps over MPI: pip install 'gpunn[mpi]'"
    )
    from gpunn.distributed import get_communicator
    from gpunn.engines import make_engine as make

    comm = get_communicator("nccl", cuda_device)
    rng = np.random.default_rng(5)
    X, y = rng.integers(0, 256, (500, 784), dtype=np.uint8), rng.integers(0, 10, 500)
    results = []
    for communicator in (None, comm):
        net = gpunn.MLP([784, 64, 10], device=cuda_device, seed=0, dtype="float64")
        opt = make_optimizer(net, "sgd", lr=0.1, momentum=0.5)
        data = DeviceDataset(net, X, y, 1 / 255)
        chosen = make(engine, net, opt, data, communicator)
        history = gpunn.fit(
            net,
            data,
            epochs=2,
            batch_size=64,
            optimizer=opt,
            engine=chosen,
            comm=communicator,
            progress=False,
        )
        results.append((np.array(history.batch_loss), gpunn.to_numpy(net.theta)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=RTOL)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=RTOL, atol=1e-14)
