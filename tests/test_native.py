"""native.gemm, the prepared C ← αAB + βC that the CPU engine is built from, the team of threads that cuts
it, and the choice of how many threads."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from gpunn import native

from helpers import need_cpu_kernels


def test_numpy_blas_is_found_here():
    # NumPy's wheels carry OpenBLAS; if this fails, the CPU engine is not used (make_step says why).
    assert native.available()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["CCC", "FCC", "CFC", "CCF", "FFF"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_matches_numpy(rng, dtype, layout, beta):
    A = rng.standard_normal((7, 5)).astype(dtype)
    B = rng.standard_normal((5, 9)).astype(dtype)
    C = rng.standard_normal((7, 9)).astype(dtype)
    A, B, C = (np.asarray(x, order=o) for x, o in zip((A, B, C), layout))
    call = native.gemm(A, B, C, -0.75, beta)
    for _ in range(2):  # the prepared call reads the arrays' current contents every time
        want = beta * C + (-0.75) * (A @ B)
        call()
        np.testing.assert_allclose(C, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
        A *= 2


def test_transposed_views_and_row_vectors_as_the_engine_passes_them(rng):
    dZ = rng.standard_normal((100, 20)).astype(np.float32)  # (n, U)
    Q = rng.standard_normal((100, 30)).astype(np.float32)  # (n, U_prev)
    W = np.asfortranarray(rng.standard_normal((20, 30)).astype(np.float32))  # a column-major W view
    b = rng.standard_normal(20).astype(np.float32)
    want_W, want_b = W - dZ.T @ Q, b - dZ.sum(axis=0)
    native.gemm(dZ.T, Q, W, -1.0, 1.0)()
    native.gemm(np.ones((1, 100), np.float32), dZ, b[None, :], -1.0, 1.0)()
    np.testing.assert_allclose(W, want_W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, want_b, rtol=1e-5, atol=1e-5)


def test_a_one_unit_layer_takes_blas_whatever_numpy_says_of_its_row_stride(rng):
    """[W b] of a binary output layer is a (1, U + 1) view of θ with NumPy's odd row stride: BLAS
    takes it as the row it is (the native stretch needs every product as a BLAS call)."""
    theta = rng.standard_normal(11)
    Wb = np.lib.stride_tricks.as_strided(theta, (1, 11), (8, 8))
    dZ, Q = rng.standard_normal((20, 1)), rng.standard_normal((20, 11))
    want = Wb - 0.5 * dZ.T @ Q
    assert native.team_gemm_arguments(dZ.T, Q, Wb, -0.5, 1.0) is not None
    native.gemm(dZ.T, Q, Wb, -0.5, 1.0)()
    np.testing.assert_allclose(Wb, want, rtol=1e-12)


def test_the_call_keeps_its_arrays_alive(rng):
    A, B = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    want = A @ B
    C = np.zeros((4, 2))
    call = native.gemm(A.copy(), B.copy(), C)  # the only references to the copies are the call's
    gc.collect()
    clobber = [np.full(n, np.nan) for n in (12, 6, 12, 6)]  # would take over freed blocks of that size
    call()
    del clobber
    np.testing.assert_allclose(C, want)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_falls_back_to_numpy_where_blas_cannot(rng, monkeypatch, beta):
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    C = rng.standard_normal((3, 2))
    want = beta * C + 2.0 * (A @ B)
    strided = np.zeros((3, 4))[:, ::2]  # neither C- nor Fortran-ordered
    strided[...] = C
    native.gemm(A, B, strided, 2.0, beta)()
    np.testing.assert_allclose(strided, want)
    monkeypatch.setattr(native, "_gemm", None)
    monkeypatch.setattr(native, "_searched", True)
    assert not native.available()
    native.gemm(A, B, C, 2.0, beta)()
    np.testing.assert_allclose(C, want)


def test_beta_other_than_zero_or_one_is_refused(rng):
    A = rng.standard_normal((2, 2))
    with pytest.raises(ValueError, match="beta must be 0 or 1"):
        native.gemm(A, A, A.copy(), 1.0, 0.5)


class FakeController:
    def __init__(self, threads):
        self.num_threads = threads
        self.history = []

    def set_num_threads(self, n):
        self.num_threads = n
        self.history.append(n)


@pytest.fixture
def blas_threads(monkeypatch):
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GPUNN_BLAS_THREADS"):
        monkeypatch.delenv(name, raising=False)
    controller = FakeController(2)
    monkeypatch.setattr(native, "_blas_controllers", lambda: ([controller], 2))
    return controller


def feed(threads, cost, blocks):
    """``blocks`` blocks of iterations, each lasting cost[thread count] seconds."""
    for _ in range(blocks * threads.BLOCK):
        threads.record(cost[threads.current])


def test_threads_follow_the_load(blas_threads):
    threads = native.CpuThreads()
    quiet, busy = {2: 0.6e-3, 1: 1.0e-3}, {2: 3.0e-3, 1: 1.1e-3}
    feed(threads, {2: 5e-3}, 1)  # the first block builds the engine: no measure of the threads
    assert threads.estimates == {}
    feed(threads, quiet, 30)
    assert threads.current == 2 and blas_threads.history[:2] == [1, 2]  # one trial of a single thread, lost
    feed(threads, busy, 2)  # another process takes a core: a block far slower than one thread's last
    assert threads.current == 1
    feed(threads, busy, 200)
    assert threads.current == 1 and threads.interval == threads.MAX_INTERVAL  # trials back off
    feed(threads, quiet, threads.MAX_INTERVAL + 1)  # quiet again: the next trial of all cores wins
    assert threads.current == 2 and threads.interval < threads.MAX_INTERVAL
    at_one = blas_threads.history.count(1)
    feed(threads, quiet, 30)
    assert threads.current == 2 and blas_threads.history.count(1) <= at_one + 2  # trials of one thread lose


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GPUNN_BLAS_THREADS"])
def test_threads_leave_a_users_choice_alone(blas_threads, monkeypatch, variable):
    monkeypatch.setenv(variable, "2")
    threads = native.CpuThreads()
    feed(threads, {2: 3.0e-3, 1: 1.0e-3}, 50)
    assert not threads.adaptive and blas_threads.history == ([2] if variable == "GPUNN_BLAS_THREADS" else [])


@pytest.mark.parametrize(
    ("dtype", "inputs"), [(np.float32, np.uint8), (np.float64, np.uint8), (np.float32, np.float32)]
)
def test_the_cpu_kernels_were_built(dtype, inputs):
    """kernels.cu compiled for the CPU by the package's build (setup.py); where no C++ compiler was
    there the CPU engine runs its passes in NumPy (tests/test_engines.py checks both)."""
    kernels = need_cpu_kernels(dtype, inputs)
    assert kernels.input_dtype == np.dtype(inputs)
    assert native.cpu_kernels(np.float32, np.int16) is None  # no module for that pairing: NumPy does it


def test_each_engine_runs_with_its_own_choice_of_threads(blas_threads):
    """The thread count is the process's: an engine that chose one thread leaves it so for another."""
    a, b = native.CpuThreads(), native.CpuThreads()
    a._set(1)
    b.engage()
    assert blas_threads.num_threads == 2 and b.current == 2
    a.engage()
    assert blas_threads.num_threads == 1


class FakeTeam:
    def __init__(self):
        self.widths = []

    def team_threads(self, width):
        self.widths.append(width)


def test_with_the_team_blas_runs_one_thread_while_the_engine_works(blas_threads, monkeypatch):
    """The team cuts the work; BLAS, called by each of its threads, runs one thread per call and gets
    its own count back when the engine is done."""
    monkeypatch.setattr(native, "_cores", lambda: 2)
    monkeypatch.setattr(native, "_threads_now", {})
    team = FakeTeam()
    threads = native.CpuThreads(team)
    threads.engage()
    assert blas_threads.num_threads == 1 and team.widths == [2]
    threads.engage()  # engaged already: nothing changes
    assert blas_threads.history == [1] and team.widths == [2]
    feed(threads, {2: 3.0e-3, 1: 1.0e-3}, 3)  # one core is faster now: the team narrows, BLAS stays at 1
    assert threads.current == 1 and team.widths[-1] == 1 and blas_threads.num_threads == 1
    threads.release()
    assert blas_threads.num_threads == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("m", "n", "k"), [(100, 200, 785), (200, 785, 100), (1000, 200, 785), (100, 10, 201)]
)
def test_the_team_cuts_a_product(rng, dtype, m, n, k):
    """Blocks of C's rows or columns, each one BLAS call: NumPy's product to rounding at every width,
    and the same bits whenever the width is the same. Shapes: Example 6.2's products (the last one
    small enough to run whole)."""
    kernels = need_cpu_kernels(dtype, dtype)
    A = rng.standard_normal((m, k)).astype(dtype)
    Bt = rng.standard_normal((n, k)).astype(dtype)  # B = Btᵀ, as the engine passes [W b]ᵀ
    C0 = rng.standard_normal((m, n)).astype(dtype)
    results = []
    try:
        for width in (1, 2, 3, 2):
            kernels.team_threads(width)
            C = C0.copy()
            native.gemm(A, Bt.T, C, -0.5, 1.0, team=kernels)()
            results.append(C)
    finally:
        kernels.team_threads(1)
    np.testing.assert_array_equal(results[3], results[1])
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    for C in results:
        np.testing.assert_allclose(C, C0 - 0.5 * (A @ Bt.T), rtol=rtol, atol=rtol * np.sqrt(k))


def test_a_forked_child_starts_its_own_team(rng):
    """The workers do not survive a fork: the child's first job starts new ones, and nothing hangs."""
    kernels = need_cpu_kernels(np.float64, np.float64)
    A, B = rng.standard_normal((300, 400)), rng.standard_normal((400, 300))
    want = A @ B
    kernels.team_threads(2)
    try:
        C = np.zeros((300, 300))
        native.gemm(A, B, C, team=kernels)()  # the workers run
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Python 3.12, and JAX where a test imported it: fork of threads
            pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the product is right
            C[:] = 0
            native.gemm(A, B, C, team=kernels)()
            os._exit(0 if np.allclose(C, want) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        kernels.team_threads(1)


def test_the_team_runs_every_piece_once_under_a_stress(tmp_path):
    """engines/cpu_team.h compiled into tests/team_stress.cpp: 200 000 random jobs, posted jobs, joins
    and resizes, each piece counted; a lost wake-up or a miscounted job hangs into the timeout."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler here (the CPU kernels need one at install time too)")
    engines, program = Path(native.__file__).parent / "engines", tmp_path / "team_stress"
    source = Path(__file__).with_name("team_stress.cpp")
    build = [compiler, "-O2", "-std=c++14", "-pthread", f"-I{engines}", str(source), "-o", str(program)]
    subprocess.run(build, check=True, capture_output=True, timeout=120)
    result = subprocess.run([str(program), "200000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
