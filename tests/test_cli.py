"""scripts/train_mnist.py through a real subprocess: outputs, bad input, interrupt and resume."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, SCRIPT, SMALL, assert_one_line_error, run_script, write_idx

run = run_script

RECORD_KEYS = {"iteration", "epoch", "train_loss", "train_error", "val_loss", "val_error", "lr", "time_s"}


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


def test_auto_on_a_cpu_install_trains_without_a_notice(data, tmp_path):
    """A user who never installed CuPy never asked for a GPU: --device auto says nothing about one."""
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here; test_backend.py covers its notices")
    result = run(*SMALL, "--epochs", "1", "--device", "auto", "--data-dir", data, "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "notice" not in result.stderr and "GPU" not in result.stderr and "CuPy" not in result.stderr


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
    assert "Traceback" not in stderr
    printed = stderr.strip().splitlines()[-1].partition("Resume with: ")[2]
    assert printed == f"python scripts/train_mnist.py --out {out} --resume", stderr
    stopped = [json.loads(line) for line in metrics.read_text().splitlines()][-1]["iteration"]
    assert 30 <= stopped < 228

    # the printed command, exactly: the data folder, the device and the recipe come from the run
    resumed = run_script(command=[sys.executable, *printed.split()[1:]])
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


def test_a_finished_run_continues_to_more_epochs(data, tmp_path):
    out = tmp_path / "run"
    assert run(*SMALL, "--epochs", "1", "--data-dir", data, "--out", out).returncode == 0
    more = run("--out", out, "--resume", "--epochs", "3")  # data, device and recipe as recorded
    assert more.returncode == 0, more.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["iteration"] == 57 and records[-1]["epoch"] == 3.0
    assert_one_line_error(
        run("--out", out, "--resume", "--epochs", "2"), 2, "--epochs 2 is fewer than the run's 3"
    )
    cosine = tmp_path / "cosine"
    assert (
        run(
            *SMALL, "--epochs", "1", "--lr-schedule", "cosine", "--data-dir", data, "--out", cosine
        ).returncode
        == 0
    )
    assert_one_line_error(
        run("--out", cosine, "--resume", "--epochs", "2"), 2, "cosine schedule cannot get more epochs"
    )


def test_eval_only_takes_a_run_folder_and_refuses_what_it_would_ignore(data, tmp_path):
    out = tmp_path / "run"
    assert run(*SMALL, "--epochs", "1", "--data-dir", data, "--out", out).returncode == 0
    by_folder = run("--eval-only", out, "--device", "cpu")  # the run's data folder, from its checkpoint
    assert by_folder.returncode == 0, by_folder.stderr
    assert "(iteration 19): validation cost" in by_folder.stdout
    assert_one_line_error(
        run("--eval-only", out, "--hidden", "64", "--lr", "0.1"),
        2,
        "--eval-only evaluates the saved network",
        "--hidden, --lr",
    )


def test_the_console_command(data, tmp_path):
    gpunn = [sys.executable, "-m", "gpunn"]  # what the installed `gpunn` script runs
    usage = run_script("train", "--help", command=gpunn)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: gpunn train ")
    out = tmp_path / "run"
    trained = run_script("train", *SMALL, "--epochs", "1", "--data-dir", data, "--out", out, command=gpunn)
    assert trained.returncode == 0, trained.stderr
    evaluated = run_script("eval", out, "--device", "cpu", command=gpunn)
    assert evaluated.returncode == 0 and "misclassification" in evaluated.stdout, evaluated.stderr
    assert_one_line_error(run_script("fly", command=gpunn), 2, "unknown command 'fly'", prog="gpunn")
    assert run_script("--help", command=gpunn).stdout.startswith("usage: gpunn {train,eval,export}")
    missing = run_script("eval", tmp_path / "nothing", command=gpunn)
    assert_one_line_error(missing, 1, "no model at", prog="gpunn eval")


def test_config_and_figure_name_the_data_set(data, tmp_path):
    out = tmp_path / "run"
    named = run(
        *SMALL, "--epochs", "1", "--dataset", "mnist", "--out", out, env={"GPUNN_DATA_DIR": str(data)}
    )
    assert named.returncode == 0, named.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["title"]) == ("mnist", "MNIST") and ": MNIST, 1 epochs" in named.stdout
    other = tmp_path / "other"
    assert run(*SMALL, "--epochs", "1", "--data-dir", data, "--out", other).returncode == 0
    config = json.loads((other / "config.json").read_text())
    assert config["dataset"] is None and config["title"] == f"IDX data in {data.name}"


def test_resume_uses_the_recorded_device_not_auto(data, tmp_path):
    """The printed resume command once fell back to --device auto; a run recorded on a GPU must not
    quietly continue on the CPU (here, without a GPU, the recorded cuda is refused in one line)."""
    out = tmp_path / "run"
    assert run(*SMALL, "--epochs", "1", "--data-dir", data, "--out", out).returncode == 0
    with np.load(out / "checkpoint.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["run"]["device"] = "cuda:0"
    arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez(out / "checkpoint.npz", **arrays)
    resumed = run("--out", out, "--resume", "--epochs", "2")
    if resumed.returncode == 0:
        assert "cuda:0" in resumed.stdout  # a GPU answered: the run went on there
    else:
        assert_one_line_error(resumed, 1, "CUDA needs CuPy")
    assert (
        run("--out", out, "--resume", "--epochs", "2", "--device", "cpu").returncode == 0
    )  # a flag overrides
