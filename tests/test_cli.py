"""scripts/train_mnist.py through a real subprocess: outputs, bad input, interrupt and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import write_idx

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_mnist.py"
SMALL = [
    "--device",
    "cpu",
    "--hidden",
    "32",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--lr",
    "0.3",
    "--eval-every",
    "10",
    "--no-progress",
]
RECORD_KEYS = {"iteration", "epoch", "train_loss", "train_error", "val_loss", "val_error", "lr", "time_s"}


def run(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("GPUNN_DATA_DIR", None) if env is None or "GPUNN_DATA_DIR" not in env else None
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def assert_one_line_error(result, code, *phrases):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("train_mnist.py: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.fixture
def data(digits_dir, tmp_path) -> Path:
    """A private copy of the synthetic digits that tests may break."""
    return Path(shutil.copytree(digits_dir, tmp_path / "data"))


def test_help_shows_every_default():
    result = run("--help")
    assert result.returncode == 0
    for text in (
        "--device",
        "(default: auto)",
        "--epochs",
        "(default: 15)",
        "--batch-size",
        "(default: 100)",
        "--lr",
        "0.5 for sgd, 0.001 for adam",
        "--hidden",
        "(default: [200])",
        "--eval-every",
        "--resume",
        "--eval-only",
        "--dtype",
        "(default: float32)",
        "--lr-schedule",
        "(default: constant)",
    ):
        assert text in result.stdout, text


def test_a_run_writes_every_output(data, tmp_path):
    out = tmp_path / "run"
    result = run(*SMALL, "--data-dir", data, "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".gpunn.lock",  # the run's lock, free again
        "checkpoint.npz",
        "config.json",
        "curves.png",
        "metrics.jsonl",
    ]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [10, 20, 30, 38]  # 19 iterations per epoch, and the end
    for r in records:
        assert set(r) >= RECORD_KEYS
        assert all(isinstance(r[k], (int, float)) for k in RECORD_KEYS)
        assert 0 <= r["val_error"] <= 1 and 0 <= r["train_error"] <= 1 and r["lr"] == 0.3
    assert records[-1]["val_error"] < 0.05
    assert [r["time_s"] for r in records] == sorted(r["time_s"] for r in records)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[1].startswith("iter 10") and "validation error" in lines[-1]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden"] == [32] and config["lr"] == 0.3 and config["device"] == "cpu"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run("--device", "cpu", "--data-dir", data, "--eval-only", out / "checkpoint.npz")
    assert again.returncode == 0 and f"{100 * records[-1]['val_error']:.2f} %" in again.stdout
    redo = run(*SMALL, "--data-dir", data, "--out", out)  # refuses to overwrite a run
    assert_one_line_error(redo, 1, "already holds a run's checkpoint", "--resume")


def test_data_comes_from_the_environment(data, tmp_path):
    result = run(*SMALL, "--epochs", "1", "--out", tmp_path / "run", env={"GPUNN_DATA_DIR": str(data)})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("flags", "phrases"),
    [
        (["--batch-size", "0"], ["--batch-size must be a whole number in 1…16777216; got 0"]),
        (["--epochs", "-2"], ["--epochs must be"]),
        (["--eval-every", "0"], ["--eval-every must be"]),
        (["--hidden", "200", "0"], ["--hidden widths must be"]),
        (["--lr", "nan"], ["--lr must be a finite number > 0; got nan"]),
        (["--lr", "inf"], ["--lr must be a finite number"]),
        (["--lr", "-0.1"], ["--lr must be"]),
        (["--lr", "fast"], ["argument --lr: invalid float value: 'fast'"]),
        (["--momentum", "1"], ["--momentum must be in [0, 1)"]),
        (["--weight-decay", "-1"], ["--weight-decay must be"]),
        (["--lr-gamma", "2"], ["--lr-gamma must be"]),
        (["--num-classes", "1"], ["--num-classes must be"]),
        (["--activation", "softmax"], ["argument --activation: invalid choice"]),
        (["--device", "gpu"], ["unknown device 'gpu'"]),
        (["--resume"], ["--resume needs --out DIR"]),
        (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    ],
)
def test_bad_flags(tmp_path, flags, phrases):
    assert_one_line_error(
        run(*flags, "--out", tmp_path / "o") if "--resume" not in flags else run(*flags), 2, *phrases
    )
    assert not (tmp_path / "o").exists()


def break_file(folder: Path, name: str, array=None, **forge):
    for old in folder.glob(name + "*"):
        old.unlink()
    write_idx(folder / name, np.zeros(300, np.uint8) if array is None else array, **forge)


LABELS = "t10k-labels-idx1-ubyte"
DAMAGE = {
    "missing file": (lambda d: (d / LABELS).unlink(), ["missing t10k-labels-idx1-ubyte"]),
    "broken gzip": (
        lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b no"),
        ["cannot read"],
    ),
    "bad magic": (lambda d: break_file(d, LABELS, magic=b"\x00\x00\x08\x03"), ["bad IDX magic number"]),
    "short file": (lambda d: break_file(d, LABELS, dims=(301,)), ["needs 309 bytes; the file has 308"]),
    "count mismatch": (
        lambda d: break_file(d, LABELS, np.zeros(299, np.uint8)),
        ["300 images but", "299 labels"],
    ),
    "label range": (
        lambda d: break_file(d, LABELS, np.full(300, 10, np.uint8)),
        ["label 10 at index 0 is outside"],
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_bad_data(data, tmp_path, case):
    damage, phrases = DAMAGE[case]
    damage(data)
    assert_one_line_error(run(*SMALL, "--data-dir", data, "--out", tmp_path / "o"), 1, *phrases)
    assert not (tmp_path / "o").exists()  # a run that failed before writing anything leaves nothing


def test_missing_data_dir(tmp_path):
    assert_one_line_error(
        run(*SMALL, "--data-dir", tmp_path / "nope", "--out", tmp_path / "o"), 1, "is not a folder"
    )


def test_cuda_without_a_gpu(data, tmp_path):
    result = run(*SMALL, "--device", "cuda", "--data-dir", data, "--out", tmp_path / "o")
    if result.returncode == 0:
        pytest.skip("a GPU answered here, so the no-GPU error cannot be provoked")
    assert_one_line_error(result, 1)
    assert not (tmp_path / "o").exists()
    assert "CuPy" in result.stderr and ("gpunn[cuda12]" in result.stderr or "GPU" in result.stderr)


def test_auto_without_a_gpu_says_so_once(data, tmp_path):
    result = run(*SMALL, "--epochs", "1", "--device", "auto", "--data-dir", data, "--out", tmp_path / "o")
    if "notice" not in result.stderr:
        pytest.skip("a GPU answered here, so auto did not fall back")
    assert result.returncode == 0
    assert [line for line in result.stderr.splitlines() if "notice" in line] == [
        line for line in result.stderr.splitlines() if "no usable GPU, running on the CPU" in line
    ]


def test_unwritable_out(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(run(*SMALL, "--data-dir", data, "--out", blocker / "run"), 1, "cannot create --out")


def test_damaged_checkpoint_is_reported_and_kept(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"PK\x03\x04 not really a zip")
    before = (out / "checkpoint.npz").read_bytes()
    assert_one_line_error(run(*SMALL, "--data-dir", data, "--out", out, "--resume"), 1, "damaged")
    assert_one_line_error(run("--data-dir", data, "--eval-only", out / "checkpoint.npz"), 1, "damaged")
    assert (out / "checkpoint.npz").read_bytes() == before
    assert_one_line_error(
        run(*SMALL, "--data-dir", data, "--out", tmp_path / "new", "--resume"), 1, "no checkpoint"
    )


def test_divergence_is_one_line(data, tmp_path):
    result = run(*SMALL, "--lr", "1e30", "--data-dir", data, "--out", tmp_path / "o")
    assert_one_line_error(result, 1, "diverged", "iteration", "learning rate 1e+30")
    assert not (tmp_path / "o" / "checkpoint.npz").exists()


def test_without_matplotlib_there_is_one_notice(data, tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('matplotlib is hidden by this test')\n")
    out = tmp_path / "run"
    result = run(
        *SMALL, "--epochs", "1", "--data-dir", data, "--out", out, env={"PYTHONPATH": str(shim.parent)}
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "notice" in line] == [
        "train_mnist.py: notice: matplotlib is not installed, so no curves.png (pip install 'gpunn[plot]')"
    ]
    assert not (out / "curves.png").exists() and (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_ends_like_an_uninterrupted_run(data, tmp_path, sig):
    long = [*SMALL, "--epochs", "12", "--eval-every", "1", "--data-dir", data]  # 228 iterations, ~4 s
    whole = run(*long, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, long), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 30
    ):
        time.sleep(0.02)
    proc.send_signal(sig)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and f"--out {out} --resume" in stderr
    stopped = [json.loads(line) for line in metrics.read_text().splitlines()][-1]["iteration"]
    assert 30 <= stopped < 228

    resumed = run(*long, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ours = [json.loads(line) for line in metrics.read_text().splitlines()]
    theirs = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in ours] == [r["iteration"] for r in theirs] == list(range(1, 229))
    for a, b in zip(ours, theirs):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    with np.load(out / "checkpoint.npz") as a, np.load(tmp_path / "whole" / "checkpoint.npz") as b:
        for name in ("W1", "b1", "W2", "b2"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_resume_refuses_a_changed_recipe(data, tmp_path):
    out = tmp_path / "run"
    assert run(*SMALL, "--epochs", "1", "--data-dir", data, "--out", out).returncode == 0
    result = run("--data-dir", data, "--out", out, "--resume", "--lr", "0.1", "--device", "cpu")
    assert_one_line_error(result, 2, "--lr 0.1 (the run has 0.3)")
    done = run("--data-dir", data, "--out", out, "--resume", "--device", "cpu", "--no-progress")
    assert done.returncode == 0 and "validation error" in done.stdout
