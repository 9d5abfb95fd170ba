"""The project's promises about itself: the README's two commands, and CI running the same test command."""

from __future__ import annotations

import re
from pathlib import Path

import gpunn

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in first_block.splitlines() if line.strip()]


def test_readme_gives_exactly_two_setup_commands():
    install_and_train, install_and_test = readme_commands()
    assert "pip install" in install_and_train and "scripts/train_mnist.py" in install_and_train
    assert "pip install" in install_and_test and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_version_is_the_package_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{gpunn.__version__}"' in pyproject


def test_only_the_backend_imports_cupy():
    for path in (ROOT / "gpunn").rglob("*.py"):
        text = path.read_text()
        if path.name != "backend.py":
            assert not re.search(r"^\s*(import cupy|from cupy)", text, re.M), path.name


def test_the_readme_starts_on_the_cpu_and_names_no_path_a_user_lacks():
    install_and_train = readme_commands()[0]
    assert "cuda" not in install_and_train  # CuPy's 3 GB of CUDA wheels are the GPU line, not the first
    text = (ROOT / "README.md").read_text()
    assert "../shared" not in text and len(text.encode()) <= 10_000
    assert "gpunn train" in text and "gpunn.fit" in text  # the console command and the library, documented
