"""Test helpers: IDX files written by hand, a small synthetic digit set, and the trainer in a subprocess."""

from __future__ import annotations

import gzip
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def idx_bytes(array: np.ndarray, magic: bytes | None = None, dims=None, extra: bytes = b"") -> bytes:
    """The IDX encoding of a uint8 array; ``magic``/``dims``/``extra`` forge broken files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = bytes([0, 0, 0x08, array.ndim]) if magic is None else magic
    dims = array.shape if dims is None else dims
    header = magic + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return header + array.tobytes() + extra


def write_idx(path: Path, array: np.ndarray, **forge) -> Path:
    data = idx_bytes(array, **forge)
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_digits(n: int, seed: int, size: int = 28, classes: int = 10):
    """(images (n, size, size) uint8, labels (n,) uint8): each class lights its own block of pixels,
    with noise and a random shift, so a small network learns it in a few epochs but not in one step."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.float64)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 4)
        dr, dc = rng.integers(-1, 2, 2)
        r0, c0 = 2 + 7 * r + dr, 2 + 6 * col + dc
        images[i, max(r0, 0) : r0 + 6, max(c0, 0) : c0 + 5] += rng.uniform(40, 100)
    return np.clip(images, 0, 255).astype(np.uint8), labels


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_mnist.py"
SMALL = ["--device", "cpu", "--hidden", "32", "--epochs", "2", "--batch-size", "64", "--lr", "0.3"]
SMALL += ["--eval-every", "10", "--no-progress"]


def run_script(*args, env=None, timeout=120, command=None, **kwargs) -> subprocess.CompletedProcess:
    """``scripts/train_mnist.py ARGS`` (or ``command``) in a subprocess from the repository root, without
    $GPUNN_DATA_DIR unless ``env`` sets it."""
    full_env = {k: v for k, v in os.environ.items() if k != "GPUNN_DATA_DIR"}
    full_env.update(env or {})
    command = command or [sys.executable, str(SCRIPT)]
    return subprocess.run(
        [*command, *map(os.fsdecode, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=kwargs.pop("cwd", ROOT),
        **kwargs,
    )


def need(module: str, variable: str, role: str):
    """``module``, imported; else a skip saying it is missing (``role``: what the tests use it as), or a
    failure where the environment sets ``variable``=1 (CI, which installs it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get(variable) == "1":
            pytest.fail(f"{variable}=1 but {module} is not installed")
        pytest.skip(f"{module} ({role}) is not installed")


def need_cpu_kernels(dtype, inputs):
    """gpunn's CPU kernels for this float type and stored input type; else a skip (the package was
    built without a C++ compiler), or a failure where GPUNN_REQUIRE_CPU_KERNELS=1 (CI, which builds them)."""
    from gpunn import native

    kernels = native.cpu_kernels(dtype, inputs)
    if kernels is None:
        if os.environ.get("GPUNN_REQUIRE_CPU_KERNELS") == "1":
            pytest.fail("GPUNN_REQUIRE_CPU_KERNELS=1 but the package was built without its CPU kernels")
        pytest.skip("the package was built without its CPU kernels (no C++ compiler at install time)")
    return kernels


def assert_one_line_error(result, code, *phrases, prog="train_mnist.py"):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
