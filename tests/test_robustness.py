"""Nothing a user or a file can throw at gpunn ends in a traceback, a hang, a memory blow-up or lost
work: damaged checkpoints and saved models (fuzzed), absurd flags, paths of any bytes, two runs in one
folder, a killed run's leftovers, an exploding cost, a full disk, an unusable cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpunn
from gpunn.checkpoint import load_checkpoint, read_saved, save_checkpoint
from gpunn.train import Config, History

from helpers import ROOT, SCRIPT, SMALL, assert_one_line_error, run_script

FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A real checkpoint of a small run with momentum and history."""
    folder = tmp_path_factory.mktemp("ckpt")
    net = gpunn.MLP([6, 5, 3], seed=0)
    optimizer = gpunn.SGD(net, 0.1, momentum=0.9)
    history = History(3, 0.5, [2.0, 1.5, 1.2], [0.5, 0.4, 0.3], [], start_cost=2.1)
    save_checkpoint(
        folder / "c.npz", net, optimizer, history, Config(hidden=[5], num_classes=3), {"device": "cpu"}
    )
    return (folder / "c.npz").read_bytes()


def assert_refused_cleanly(path: Path) -> None:
    """Loading ``path`` as a checkpoint and as a model ends in CheckpointError and nothing else, and
    leaves the file as it was."""
    before = path.read_bytes()
    for load in (load_checkpoint, read_saved):
        try:
            load(path)
        except gpunn.CheckpointError as exc:
            assert "\n" not in str(exc)
    assert path.read_bytes() == before


def central_directory_entries(data: bytes) -> list[int]:
    """Offsets of the zip's central directory headers (PK\\x01\\x02)."""
    offsets, at = [], data.find(b"PK\x01\x02")
    while at >= 0:
        offsets.append(at)
        at = data.find(b"PK\x01\x02", at + 1)
    return offsets


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [(8, 0x01, "encrypted"), (10, 0x63, "compression method")],  # general-purpose flag; method
)
def test_one_flipped_field_in_the_zip_directory_is_a_clean_error(
    checkpoint_bytes, tmp_path, field, value, reason
):
    """Were `File 'W1.npy' is encrypted, password required` and `That compression method is not
    supported` tracebacks."""
    data = bytearray(checkpoint_bytes)
    data[central_directory_entries(bytes(data))[0] + field] |= value
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(gpunn.CheckpointError, match=reason):
        load_checkpoint(path)
    assert_refused_cleanly(path)


def rewrite_meta(checkpoint_bytes: bytes, path: Path, change) -> None:
    """The checkpoint with its meta JSON passed through ``change``."""
    path.write_bytes(checkpoint_bytes)
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.asarray(json.dumps(change(meta)))
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: [], "meta is not a JSON object"),  # valid JSON of the wrong shape: was AttributeError
        (lambda m: {**m, "model": 5}, "model is not a JSON object"),
        (lambda m: {**m, "history": {**m["history"], "iteration": 10**400}}, "history iteration must be"),
        (lambda m: {**m, "history": {**m["history"], "train_time": "long"}}, "train_time must be"),
        (lambda m: {**m, "model": {**m["model"], "sizes": [6, 10**30, 3]}}, "every model size"),
        (lambda m: {**m, "optimizer": {**m["optimizer"], "momentum": 2.0}}, "momentum must be in"),
        (lambda m: {**m, "config": {**m["config"], "batch_size": 10**20}}, "batch_size must be"),
        (lambda m: {**m, "history": {**m["history"], "records": [{"iteration": 1}]}}, "every history record"),
        (lambda m: {**m, "format": "gpunn-checkpoint-9"}, "meta format must be"),
    ],
)
def test_metadata_of_the_wrong_shape_or_range_is_a_clean_error(checkpoint_bytes, tmp_path, change, reason):
    path = tmp_path / "checkpoint.npz"
    rewrite_meta(checkpoint_bytes, path, change)
    with pytest.raises(gpunn.CheckpointError, match=reason):
        load_checkpoint(path)
    assert_refused_cleanly(path)


@FUZZ
@given(data=st.data())
def test_fuzz_damaged_checkpoints(checkpoint_bytes, tmp_path_factory, data):
    damaged = bytearray(checkpoint_bytes)
    kind = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if kind == "flip":
        for position in data.draw(st.lists(st.integers(0, len(damaged) - 1), min_size=1, max_size=4)):
            damaged[position] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1))]
    else:
        damaged = bytearray(data.draw(st.binary(max_size=2048)))
    path = tmp_path_factory.mktemp("fuzz") / "checkpoint.npz"
    path.write_bytes(bytes(damaged))
    assert_refused_cleanly(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(section=st.sampled_from(["model", "optimizer", "history", "config", "run", "format"]), value=JSON)
def test_fuzz_metadata_values(checkpoint_bytes, tmp_path_factory, section, value):
    path = tmp_path_factory.mktemp("meta") / "checkpoint.npz"
    rewrite_meta(checkpoint_bytes, path, lambda m: {**m, section: value})
    assert_refused_cleanly(path)


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--batch-size", str(10**20)], "--batch-size must be a whole number in 1…"),
        (["--batch-size", "1e20"], "argument --batch-size: invalid int value"),
        (["--eval-every", str(10**30)], "--eval-every must be a whole number in 1…"),
        (["--hidden", str(10**20)], "--hidden widths must be whole numbers in 1…"),
        (["--epochs", str(10**12)], "--epochs must be a whole number in 1…"),
        (["--num-classes", str(10**9)], "--num-classes must be a whole number in 2…"),
        (["--seed", "-1"], "--seed must be a whole number in 0…"),
        (["--lr", "1e400"], "--lr must be a finite number"),
        (["--divergence-factor", "0.5"], "--divergence-factor must be a finite number > 1"),
    ],
)
def test_absurd_sizes_are_refused_before_anything_is_made(digits_dir, tmp_path, flags, phrase):
    result = run_script(*SMALL, *flags, "--data-dir", digits_dir, "--out", tmp_path / "o")
    assert_one_line_error(result, 2, phrase)
    assert not (tmp_path / "o").exists()


def test_paths_of_any_bytes_are_printed_safely(digits_dir, tmp_path):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/run-\xff\xfe"))
    result = run_script(*SMALL, "--epochs", "1", "--data-dir", digits_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "run-\\xff\\xfe" in result.stdout and (out / "checkpoint.npz").is_file()
    missing = Path(os.fsdecode(bytes(tmp_path) + b"/data-\xff"))
    result = run_script(*SMALL, "--data-dir", missing, "--out", tmp_path / "o")
    assert_one_line_error(result, 1, "data-\\xff is not a folder")
    assert not (tmp_path / "o").exists()  # nothing made before the inputs are known good


def start_run(out: Path, data: Path, epochs: int = 60) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT), *SMALL, "--epochs", str(epochs), "--data-dir", str(data)]
    return subprocess.Popen(
        [*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_one_run_per_folder_and_a_killed_run_leaves_nothing_in_the_way(digits_dir, tmp_path):
    out = tmp_path / "run"
    first = start_run(out, digits_dir)
    try:
        wait_for(out / "checkpoint.npz")
        second = run_script(*SMALL, "--data-dir", digits_dir, "--out", out)
        assert_one_line_error(second, 1, "is in use by another gpunn run", f"pid {first.pid}")
        resumed = run_script("--out", out, "--resume")
        assert_one_line_error(resumed, 1, "is in use by another gpunn run")
        assert first.poll() is None  # the first run goes on untouched
        first.send_signal(signal.SIGKILL)  # no chance to clean up: the lock dies with it
        first.wait(timeout=30)
    finally:
        first.kill()
        first.wait()
    leftover = out / ".checkpoint.npz.0123abcd.tmp"  # as a write cut by SIGKILL leaves it
    leftover.write_bytes(b"\0" * 100_000)
    resumed = run_script("--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not leftover.exists()


def test_an_exploding_cost_ends_the_run_with_one_line(digits_dir, tmp_path):
    result = run_script(*SMALL, "--lr", "1e6", "--data-dir", digits_dir, "--out", tmp_path / "o")
    assert_one_line_error(result, 1, "training diverged", "over 10 × the starting cost")
    off = run_script(
        *SMALL, "--lr", "1e6", "--no-divergence-check", "--data-dir", digits_dir, "--out", tmp_path / "p"
    )
    assert off.returncode == 0, off.stderr


def test_a_full_disk_names_the_file(digits_dir, tmp_path):
    """RLIMIT_FSIZE makes the checkpoint's write fail as a full disk would (EFBIG; Python ignores
    SIGXFSZ), after the small files are written."""

    limited = (  # the limit set inside the child: a preexec_fn would fork this (threaded) process
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    out = tmp_path / "run"
    command = [sys.executable, "-c", limited, str(SCRIPT)]
    result = run_script(*SMALL, "--data-dir", digits_dir, "--out", out, command=command)
    assert_one_line_error(result, 1, f"cannot write {out / 'checkpoint.npz'}: File too large")
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_an_unusable_cache_is_one_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = run_script(*SMALL, "--out", tmp_path / "o", env={"XDG_CACHE_HOME": str(blocker)})
    assert_one_line_error(result, 1, "cannot download into", "--data-dir")


def test_a_damaged_checkpoint_leaves_resume_and_eval_with_one_line(checkpoint_bytes, digits_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    data = bytearray(checkpoint_bytes)
    data[central_directory_entries(bytes(data))[0] + 8] |= 1
    (out / "checkpoint.npz").write_bytes(bytes(data))
    assert_one_line_error(run_script("--out", out, "--resume", "--data-dir", digits_dir), 1, "is encrypted")
    assert_one_line_error(run_script("--eval-only", out, "--data-dir", digits_dir), 1, "is encrypted")
    assert (out / "checkpoint.npz").read_bytes() == bytes(data)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("W1.npy", b"not an array")
    assert_one_line_error(
        run_script("--eval-only", tmp_path / "other.zip"), 1, "damaged or not a gpunn model"
    )


def test_a_checkpoint_of_gpunn_0_1_is_named_as_such(checkpoint_bytes, tmp_path):
    path = tmp_path / "checkpoint.npz"
    rewrite_meta(checkpoint_bytes, path, lambda m: {**m, "format": "gpunn-checkpoint-1"})
    with pytest.raises(gpunn.CheckpointError, match=r"written by gpunn 0\.1"):
        load_checkpoint(path)


def test_a_working_folder_that_takes_no_writes_is_one_line(digits_dir):
    """The default --out is runs/… below the working folder; /proc takes no new folders (as a read-only
    mount does: running as root, this test cannot make one by permissions)."""
    result = run_script(*SMALL, "--epochs", "1", "--data-dir", digits_dir, cwd="/proc")
    assert_one_line_error(result, 1, "cannot create --out runs/")
