"""The benchmark's quick mode runs end to end (its figures are not asserted: timing is not a unit test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_mode(mnist_dir, tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        if os.environ.get("GPUNN_REQUIRE_TORCH") == "1":
            pytest.fail("GPUNN_REQUIRE_TORCH=1 but PyTorch is not installed")
        pytest.skip("PyTorch (the benchmark's peer, extra 'bench') is not installed")
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_mnist.py"),
        "--quick",
        "--models",
        "784-10",
        "--peers",
        "pytorch",
        "--device",
        "cpu",
        "--data-dir",
        str(mnist_dir),
        "--json",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    model = report["models"]["784-10"]
    assert set(model["contestants"]) == {"gpunn-blas", "pytorch"}  # the CPU engine by default
    gpunn = model["contestants"]["gpunn-blas"]
    assert gpunn["median_epoch_s"] > 0 and len(gpunn["others_cpu_s"]) == len(gpunn["epoch_times_s"]) == 1
    assert set(gpunn["paired_ratio"]) == {"pytorch"}
    assert gpunn["agreement_first_100_costs"]["pytorch"] < 1e-4  # the two did the same work
    assert abs(gpunn["final_val_error"] - model["contestants"]["pytorch"]["final_val_error"]) < 0.005
    assert "| gpunn-blas | " in result.stdout and "| pytorch | " in result.stdout
    again = subprocess.run([*command[:2], "--table", str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "| pytorch | " in again.stdout  # the tables from the JSON alone


def test_benchmark_help_shows_only_real_defaults():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_mnist.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "(default: None)" not in result.stdout


def test_ab_of_two_checkouts_runs_both_and_pairs_them(mnist_dir):
    """benchmarks/ab_trees.py, here with this checkout against itself on 784→10: both processes run the
    CPU engine, every epoch is timed, and the paired ratio of a checkout to itself is near 1."""
    command = [sys.executable, str(ROOT / "benchmarks" / "ab_trees.py"), str(ROOT), str(ROOT)]
    command += ["--data-dir", str(mnist_dir), "--rounds", "2", "--hidden", ""]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" blas\n") == 2  # each process says which gpunn and engine it runs
    ratio = float(result.stdout.rsplit("paired ratio B / A:", 1)[1])
    assert 0.5 < ratio < 2.0
