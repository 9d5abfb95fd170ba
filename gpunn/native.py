"""Typed native bindings that no well-kept library offers at the same speed: BLAS gemm on the CPU and
cuBLAS gemm during CUDA graph capture. Each is bound once, checked at first use, and lives here.

CPU: matrix products as prepared BLAS calls, C ← α·A·B + β·C on fixed arrays, one ctypes call each.

NumPy's ``matmul`` can only overwrite its output and takes no α, so an update W ← W − dZᵀQ costs a
product written to memory and a second pass to subtract it, and every call converts its arguments
anew. ``gemm(A, B, C, alpha, beta)`` calls the BLAS library NumPy itself loaded (OpenBLAS in NumPy's
wheels; MKL or another CBLAS elsewhere), found by symbol and checked on a small product before first
use, with every argument converted once: the CPU engine (engines/blas.py) is built from such calls.
Where no BLAS is found, for other layouts, or for CuPy arrays, the same call runs NumPy's/CuPy's
matmul instead, and ``available()`` tells which.

CPU kernels: ``cpu_kernels(dtype, input_dtype)`` loads engines/kernels.cu compiled for the CPU (the
optional extension modules the package's build makes), typed, for the CPU engine, with the team of
threads that cuts products and passes over the cores (engines/cpu_team.h); ``prepare`` binds a call's
arguments once, as ``gemm`` does; ``CpuThreads`` chooses how many threads work.

CUDA: ``CublasGemm`` calls cuBLAS's own cublas<t>gemm_v2 on CuPy's handle, the one product that may
run while a stream is being captured into a CUDA graph (CuPy's matmul and its cuBLAS binding refuse).

Why these stay hand-written (A/B figures in benchmarks/README.md): SciPy's ``scipy.linalg.blas.sgemm``
costs more per call than a prepared ctypes call and drives a second OpenBLAS thread pool beside
NumPy's; NVIDIA's nvmath-python binds cuBLAS too, but is one more CUDA dependency for one function.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy

from .backend import get_array_module, import_cupy
from .errors import DeviceError

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# (single, double, integer type) for the CBLAS flavours NumPy builds ship: NumPy 2's scipy-openblas
# (64-bit integers), older OpenBLAS with the 64_ suffix, and plain 32-bit-integer CBLAS (MKL, ...).
_SYMBOLS = (
    ("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", ctypes.c_int64),
    ("cblas_sgemm64_", "cblas_dgemm64_", ctypes.c_int64),
    ("cblas_sgemm", "cblas_dgemm", ctypes.c_int),
)
_gemm: dict | None = None
_searched = False


def loaded_libraries() -> list[str]:
    """Paths of the files this process has mapped (its shared libraries among them), in load order,
    each once: Linux's /proc/self/maps, empty elsewhere."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = [fields[-1] for fields in map(str.split, lines) if len(fields) >= 6]
    return list(dict.fromkeys(paths))


def _candidate_libraries() -> list[str]:
    """Shared libraries this process has loaded whose name says BLAS (Linux), then NumPy's own."""
    paths = [path for path in loaded_libraries() if "blas" in os.path.basename(path).lower()]
    libs = Path(numpy.__file__).parent.parent / "numpy.libs"
    paths += sorted(str(p) for p in libs.glob("*blas*")) if libs.is_dir() else []
    return paths


def _bind(lib, name: str, integer):
    f = getattr(lib, name, None)
    if f is None:
        return None
    real = ctypes.c_float if "sgemm" in name else ctypes.c_double
    pointer = ctypes.c_void_p  # order, trans A, trans B, m, n, k, α, A, lda, B, ldb, β, C, ldc
    f.argtypes = (
        [ctypes.c_int] * 3
        + [integer] * 3
        + [real, pointer, integer, pointer, integer, real, pointer, integer]
    )
    f.restype = None
    return f


def _find() -> dict | None:
    for path in _candidate_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for single, double, integer in _SYMBOLS:
            s, d = _bind(lib, single, integer), _bind(lib, double, integer)
            if s is not None and d is not None:
                found = {numpy.dtype(numpy.float32): s, numpy.dtype(numpy.float64): d}
                if _self_test(found):
                    return found
    return None


def _self_test(found: dict) -> bool:
    rng = numpy.random.default_rng(0)
    for dtype in found:
        A, B, C = (rng.standard_normal(shape).astype(dtype) for shape in ((3, 2), (2, 4), (3, 4)))
        want = C + 0.5 * (A @ B)
        Cf = numpy.asfortranarray(C)
        if not (_call(found, A, B, C, 0.5) and _call(found, A.T.copy().T, B, Cf, 0.5)):
            return False
        if not (numpy.allclose(C, want, rtol=1e-5) and numpy.allclose(Cf, want, rtol=1e-5)):
            return False
    return True


def _operand(a):
    """(transpose flag, leading dimension) of a 2-D array as row-major BLAS sees it, or None."""
    size, (rows, cols) = a.itemsize, a.shape
    # a single row's (column's) own stride is free: NumPy gives a one-row view of a matrix odd strides
    if (a.strides[1] == size or cols <= 1) and (rows <= 1 or a.strides[0] >= max(1, cols) * size):
        return _NO_TRANS, a.strides[0] // size if rows > 1 else max(1, cols)
    if (a.strides[0] == size or rows <= 1) and (cols <= 1 or a.strides[1] >= max(1, rows) * size):
        return _TRANS, a.strides[1] // size if cols > 1 else max(1, rows)
    return None


def _arguments(found: dict, A, B, C, alpha, beta) -> tuple | None:
    """(gemm, its arguments as numbers) for C ← α·A·B + β·C on these arrays, or None where BLAS cannot."""
    if C.flags.f_contiguous and not C.flags.c_contiguous:  # work on Cᵀ = Bᵀ Aᵀ, which is row-major
        A, B, C = B.T, A.T, C.T
    gemm = found.get(C.dtype)
    ops = [_operand(x) for x in (A, B, C)]
    if gemm is None or None in ops or ops[2][0] != _NO_TRANS or not (A.dtype == B.dtype == C.dtype):
        return None
    (ta, lda), (tb, ldb), (_, ldc) = ops
    m, k, n = A.shape[0], A.shape[1], B.shape[1]
    shape = (_ROW_MAJOR, ta, tb, m, n, k)
    return gemm, (*shape, alpha, A.ctypes.data, lda, B.ctypes.data, ldb, beta, C.ctypes.data, ldc)


def _team_arguments(function, values) -> tuple:
    """team_gemm's arguments for a bound CBLAS call: the function's address, whether its integers are
    64-bit (scipy-openblas), then the call's own."""
    wide = function.argtypes[3] is ctypes.c_int64
    return (ctypes.cast(function, ctypes.c_void_p).value, int(wide), *values)


def _blas_arguments(A, B, C, alpha, beta) -> tuple | None:
    """``_arguments`` with the BLAS this process found, for NumPy arrays; None elsewhere."""
    return _arguments(_gemm, A, B, C, alpha, beta) if isinstance(C, numpy.ndarray) and available() else None


def team_gemm_arguments(A, B, C, alpha: float = 1.0, beta: float = 0.0) -> tuple | None:
    """team_gemm's arguments (address, wide, order, ta, tb, m, n, k, α, A, lda, B, ldb, β, C, ldc) for
    ``gemm(A, B, C, alpha, beta, team=…)``, as numbers (addresses included), or None where BLAS cannot
    take these arrays; a call that ``gemm`` prepared with a team carries them as ``team_arguments``,
    for native code that makes the same call (cpu_train.h). Keep the arrays."""
    bound = _blas_arguments(A, B, C, alpha, beta)
    return None if bound is None else _team_arguments(*bound)


def _call(found: dict, A, B, C, alpha, beta=1.0) -> bool:
    bound = _arguments(found, A, B, C, alpha, beta)
    if bound is not None:
        prepare(bound[0], *bound[1])()
    return bound is not None


def available() -> bool:
    """True where ``gemm`` runs as one BLAS call (the library found and checked once per process)."""
    global _gemm, _searched
    if not _searched:
        _searched = True
        _gemm = _find()
    return _gemm is not None


def gemm(A, B, C, alpha: float = 1.0, beta: float = 0.0, team=None) -> Callable[[], None]:
    """The product C ← α·A·B + β·C on these very arrays, prepared once: returns a function of no
    arguments that runs it. A (m, k), B (k, n), C (m, n) are arrays of one float type, each C- or
    Fortran-ordered (transposed views included); β is 0 (overwrite C) or 1 (accumulate into C).

    Where BLAS takes the arrays, the call is one ctypes call with every argument converted in advance
    (about 1 µs of Python, against ~7 µs for converting them each time); elsewhere (no BLAS found,
    other layouts, CuPy arrays) it is NumPy's matmul. With ``team``, the CPU kernels of the same float
    type (``cpu_kernels``), the product is cut over their team of threads, each block one
    single-threaded call of the same BLAS function (cpu_kernels.cpp, ``team_gemm``). The function holds
    the arrays' addresses: they must stay where they are (it keeps them alive; write into them, never
    rebind them).
    """
    if beta not in (0.0, 1.0):
        raise ValueError(f"beta must be 0 or 1; got {beta}")
    bound = _blas_arguments(A, B, C, alpha, beta)
    arguments = None if bound is None or team is None else _team_arguments(*bound)
    if arguments is not None:
        call = prepare(team.team_gemm, *arguments)
    elif bound is not None:
        call = prepare(bound[0], *bound[1])  # holds addresses only: keep the arrays alive
    elif beta:

        def call():
            C.__iadd__(alpha * (A @ B))

    else:
        xp = get_array_module(C)

        def call():
            xp.matmul(A, B, out=C)
            if alpha != 1.0:
                C.__imul__(alpha)

    call.arrays, call.team_arguments = (A, B, C), arguments
    return call


# --- the CPU kernels ---------------------------------------------------------------------------------

_CPU_MODULES = {  # (float type, stored input type) -> the extension module setup.py builds
    (numpy.dtype(numpy.float32), numpy.dtype(numpy.uint8)): "_cpu_float_uint8",
    (numpy.dtype(numpy.float64), numpy.dtype(numpy.uint8)): "_cpu_double_uint8",
    (numpy.dtype(numpy.float32), numpy.dtype(numpy.float32)): "_cpu_float_float32",
    (numpy.dtype(numpy.float64), numpy.dtype(numpy.float64)): "_cpu_double_float64",
}
_KERNELS = ("gather_rows", "activation_rows", "activation_slope", "loss_rows")
_TEAM = ("team_gemm", "team_gather_rows_post", "team_join", "team_threads", "team_share", "team_train")
_TEAM += ("team_sparse_gather", "team_sparse_forward", "team_sparse_update")
_CPU_FUNCTIONS = (*_KERNELS, "sum_rows", *(f"team_{k}" for k in _KERNELS), *_TEAM)
_cpu_kernels: dict = {}
TEAM_MOST = 64  # the most threads a team has (engines/cpu_team.h, Team::MOST)
_team = ctypes.c_void_p()  # the address of the process's team of threads, once a module has made it
KERNELS = Path(__file__).with_name("engines") / "kernels.cu"
CPU_KERNELS = KERNELS.with_name("cpu_kernels.cpp")  # the CPU build's own functions (the team_ forms)
CPU_TRAIN = KERNELS.with_name("cpu_train.h")  # and its native stretch of iterations
_DECLARATION = re.compile(r'extern "C" (__global__ )?void (\w+)\(([^)]*)\)')


def kernel_signatures(source: str | None = None, host: bool = False) -> dict[str, list[str]]:
    """{function: [parameter C type, …]} as kernels.cu declares them: its CUDA kernels, or with
    ``host=True`` every function the CPU build exports (the kernels and the host functions)."""
    source = KERNELS.read_text() if source is None else source
    return {
        name: [" ".join(param.split()[:-1]) for param in params.split(",") if param.strip()]
        for is_kernel, name, params in _DECLARATION.findall(source)
        if is_kernel or host
    }


def ctype_of(c_type: str, real):
    """The ctypes type of a kernels.cu parameter (``real``: the ctypes type REAL stands for)."""
    if c_type.endswith("*"):
        return ctypes.c_void_p
    kinds = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "double": ctypes.c_double, "REAL": real}
    return kinds[c_type]


def cpu_kernels(dtype, input_dtype):
    """engines/kernels.cu compiled for the CPU for this float type and stored input type: a namespace
    of typed ctypes functions (``.gather_rows``, ``.loss_rows``, …, each kernel's ``team_`` form that
    runs it on the process's team of threads, ``team_gemm`` and ``team_threads(width)``), or None where
    the package was built without them (no C++ compiler) or for another pairing. Loaded once."""
    key = (numpy.dtype(dtype), numpy.dtype(input_dtype))
    if key not in _cpu_kernels:
        _cpu_kernels[key] = _load_cpu_kernels(*key)
    return _cpu_kernels[key]


def _load_cpu_kernels(dtype, input_dtype):
    name = _CPU_MODULES.get((dtype, input_dtype))
    if name is None:
        return None
    try:
        module = importlib.import_module(f"gpunn.engines.{name}")
        library = ctypes.CDLL(module.__file__)
    except (ImportError, OSError):
        return None
    real = ctypes.c_float if dtype == numpy.float32 else ctypes.c_double
    signatures = kernel_signatures(host=True)
    for source in (CPU_KERNELS, CPU_TRAIN):
        signatures.update(kernel_signatures(source.read_text(), host=True))
    functions = {}
    for function in _CPU_FUNCTIONS:
        f = getattr(library, function)
        f.argtypes, f.restype = [ctype_of(t, real) for t in signatures[function]], None
        functions[function] = f
    functions["team_share"](ctypes.addressof(_team))  # one team of threads for every module
    return type(name, (), {**functions, "input_dtype": input_dtype})


def prepare(function, *args) -> Callable[[], None]:
    """``function(*args)`` with every argument converted once (NumPy arrays as their address, None as
    a null pointer; a ctypes value is passed as it is, so that setting its ``.value`` changes the next
    call's argument): a call of no arguments, about 1 µs. ``function`` must have its argtypes; the
    arrays must stay where they are (the call keeps them alive)."""
    values = [a.ctypes.data if isinstance(a, numpy.ndarray) else a for a in args]
    converted = (
        v if isinstance(v, ctypes._SimpleCData) else kind(v) for kind, v in zip(function.argtypes, values)
    )
    call = functools.partial(function, *converted)
    call.arrays = args
    return call


@functools.cache
def train_structures(dtype) -> tuple:
    """(Product, Layer, Plan, Sparse): the ctypes forms of engines/cpu_train.h's and cpu_sparse.h's
    structures for this float type, which the CPU engine fills for ``team_train``."""
    real = ctypes.c_float if numpy.dtype(dtype) == numpy.float32 else ctypes.c_double
    address, number = ctypes.c_void_p, ctypes.c_longlong

    class Product(ctypes.Structure):
        _fields_ = [("gemm", address), *((f, number) for f in ("wide", "ta", "tb", "m", "n", "k"))]
        _fields_ += [("A", address), ("lda", number), ("B", address), ("ldb", number), ("C", address)]
        _fields_ += [("ldc", number), ("alpha", real), ("beta", real)]

        @classmethod
        def of(cls, arguments):
            """From ``team_gemm_arguments``'s tuple (a prepared call's ``team_arguments``)."""
            gemm, wide, _, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc = arguments
            return cls(gemm, wide, ta, tb, m, n, k, A, lda, B, ldb, C, ldc, alpha, beta)

    class Layer(ctypes.Structure):
        _fields_ = [("forward", Product), ("to_dQ_prev", Product), ("descend", Product)]
        _fields_ += [("Z", address), ("dQ", address), ("U", number), ("ldz", number), ("act", number)]

    class Plan(ctypes.Structure):
        _fields_ = [(f, number) for f in ("L", "n", "p", "ldx", "task", "tw", "posted")]
        _fields_ += [(f, address) for f in ("X", "labels", "targets", "rows", "Xb", "yb", "t", "layers")]
        _fields_ += [(f, address) for f in ("sparse", "WT", "ZL", "zeros", "dZL", "cost", "wrong", "out")]

    class Sparse(ctypes.Structure):  # engines/cpu_sparse.h's gpunn_sparse
        _fields_ = [(f, address) for f in ("count", "input", "value", "start", "row", "row_value")]
        _fields_ += [("c", real), ("parts", number)]

    return Product, Layer, Plan, Sparse


# --- the CPU engine's threads ---------------------------------------------------------------------


class CpuThreads:
    """How many threads the CPU engine uses, chosen by measuring, so that a busy machine costs time in
    proportion rather than a collapse.

    With the CPU kernels (``team``: the module from ``cpu_kernels``), they are the kernels' team
    (engines/cpu_team.h): every product and element-wise pass is cut over it, and BLAS runs one thread
    per call while the engine works (``engage``; ``release`` gives BLAS back the count it had).
    Without them, they are the BLAS library's own threads, as threadpoolctl sets them.

    Threads that wait for work spin. On a quiet machine all cores are fastest; when another process
    takes a core, a thread that gets descheduled holds up its peers for a time slice, and one thread
    is faster. The engine passes each iteration's duration to ``record`` (what happens between
    iterations, an evaluation, does not count); after every BLOCK of them (but the first, which pays
    for building the engine's buffers) the mean is kept for the current thread count (the mean, not
    the median: the cost is in the rare iterations that wait), and
    now and then the other count (all cores, or one) is tried for a block and the faster kept. A trial
    that loses waits twice as long before the next (up to MAX_INTERVAL blocks), one that wins resets
    the wait, and a block much slower than the other count's last is tried against it at once.

    Where the user chose (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, or GPUNN_BLAS_THREADS=N), that count is
    used throughout. The team's cut, like OpenBLAS's own threads, sums some products in an order that
    depends on the count, so on a busy machine the last bits of a run can depend on the load: fix the
    count with one of those variables for runs that repeat bit for bit."""

    BLOCK = 24
    FIRST_INTERVAL, MAX_INTERVAL = 8, 64
    SLOWER = 1.3  # a block this much slower than the other count's last estimate tries it at once
    MOST_TEAM = 16  # cutting an n_b = 100 product further costs more than it gains

    def __init__(self, team=None):
        self.team = team
        self.controllers, blas_most = _blas_controllers()
        self.most = min(blas_most, self.MOST_TEAM, _cores()) if team is not None else blas_most
        chosen = any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", GPUNN_THREADS))
        self.adaptive = self.most > 1 and not chosen
        fixed = os.environ.get(GPUNN_THREADS, "")
        fixed = int(fixed) if fixed.isdigit() and int(fixed) > 0 else None
        self.current = fixed or self.most
        self.owner = "blas" if team is None else "team"  # whose count ``_threads_now`` keeps
        self.estimates: dict[int, float] = {}
        self.times: list[float] = []  # of the block so far, and its iterations
        self.iterations, self.warm = 0, False
        self.trial_of = None  # the count a trial left, while one runs
        self.interval, self.blocks = self.FIRST_INTERVAL, 0
        self.restore: list[int] | None = None  # BLAS's counts before ``engage``, while engaged
        if fixed and team is None:
            self._set(self.current)

    def engage(self) -> bool:
        """Before the engine works: its thread count, should another engine in the process have set
        another (the counts are the process's), and BLAS on one thread where the team cuts the work.
        True where this call set BLAS aside (``release`` gives it back)."""
        engaged = self.team is not None and self.restore is None
        if engaged:
            self.restore = [c.num_threads for c in self.controllers]
            for controller in self.controllers:
                controller.set_num_threads(1)
        if _threads_now.get(self.owner) != self.current:
            self._set(self.current)
        return engaged

    def release(self) -> None:
        """After the engine's work: BLAS's own thread count back as ``engage`` found it."""
        if self.restore is not None:
            for controller, count in zip(self.controllers, self.restore):
                controller.set_num_threads(count)
            self.restore = None

    def record(self, seconds: float, iterations: int = 1) -> None:
        """``iterations`` more iterations took ``seconds`` together."""
        if not self.adaptive:
            return
        self.times.append(seconds)
        self.iterations += iterations
        if self.iterations >= self.BLOCK:
            if self.warm:
                self._decide(sum(self.times) / self.iterations)
            self.warm = True  # the first block builds buffers and faults pages in: not a measure
            self.times.clear()
            self.iterations = 0

    def _decide(self, block: float) -> None:
        current = self.current
        other = 1 if current == self.most else self.most
        self.estimates[current] = block
        self.blocks += 1
        if self.trial_of is not None:  # a trial ends: keep the faster
            won = block < self.estimates[self.trial_of]
            self.interval = self.FIRST_INTERVAL if won else min(2 * self.interval, self.MAX_INTERVAL)
            if not won:
                self._set(self.trial_of)
            self.trial_of, self.blocks = None, 0
        elif (
            other not in self.estimates
            or self.blocks >= self.interval
            or block > self.SLOWER * self.estimates[other]
        ):
            self.trial_of = current
            self._set(other)

    def _set(self, threads: int) -> None:
        if self.team is not None:
            self.team.team_threads(threads)
        else:
            for controller in self.controllers:
                controller.set_num_threads(threads)
        self.current = _threads_now[self.owner] = threads


GPUNN_THREADS = "GPUNN_BLAS_THREADS"  # the CPU engine's thread count, where the user fixes it
_threads_now: dict = {}  # the count CpuThreads last set in this process: BLAS's, and each team's


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _blas_controllers():
    """(threadpoolctl's controllers of the BLAS libraries loaded, their thread count)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return [], 1
    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    return controllers, max((c.num_threads for c in controllers), default=1)


# --- cuBLAS --------------------------------------------------------------------------------------


def cublas_library():
    """ctypes handle on the libcublas this process loaded (through CuPy): its C functions, for the
    calls CuPy's binding refuses while a stream is capturing. DeviceError where none is loaded."""
    import_cupy().cuda.device.get_cublas_handle()  # makes CuPy load cuBLAS
    for path in loaded_libraries():
        if "libcublas.so" in Path(path).name:
            return ctypes.CDLL(path)
    raise DeviceError("cannot find the cuBLAS library CuPy loaded (read from /proc/self/maps)")


def cublas_arguments(A, B, C, pointer) -> tuple:
    """The arguments of a column-major cuBLAS gemm that computes the row-major C = A·B.

    A (m, k), B (k, n), C (m, n) are 2-D arrays whose rows or columns are contiguous (transposed views
    included); ``pointer(array)`` gives an array's address. Returns (transa, transb, m', n', k,
    A', lda, B', ldb, C', ldc) for C' = op(A')·op(B') in cuBLAS's column-major terms: an array with
    contiguous columns is itself column-major; one with contiguous rows is its transpose's. When C has
    contiguous rows, Cᵀ = Bᵀ·Aᵀ is what cuBLAS computes.
    """

    def operand(x):  # (op, leading dimension) of x as a column-major matrix, or of xᵀ (then op = T)
        size = x.itemsize
        if x.strides[0] == size and x.strides[1] >= max(1, x.shape[0]) * size:
            return 0, x.strides[1] // size
        if x.strides[1] == size and x.strides[0] >= max(1, x.shape[1]) * size:
            return 1, x.strides[0] // size
        raise ValueError(f"an operand of strides {x.strides} has neither rows nor columns contiguous")

    if C.strides[0] != C.itemsize or C.strides[1] < C.shape[0] * C.itemsize:  # rows contiguous
        A, B, C = B.T, A.T, C.T
    (op_a, lda), (op_b, ldb), (op_c, ldc) = operand(A), operand(B), operand(C)
    if op_c != 0:
        raise ValueError("C must have contiguous rows or columns")
    m, k, n = A.shape[0], A.shape[1], B.shape[1]
    return op_a, op_b, m, n, k, pointer(A), lda, pointer(B), ldb, pointer(C), ldc


class CublasGemm:
    """C = A·B for CuPy arrays by cuBLAS's own C function (cublas<t>gemm_v2 through ctypes), on the
    handle CuPy uses, on whatever stream that handle is bound to: the one call that may run during
    stream capture. α = 1 and β = 0 are read from the host (graph capture sets host pointer mode)."""

    def __init__(self, dtype):
        cupy = import_cupy()
        self.handle = cupy.cuda.device.get_cublas_handle()
        single = numpy.dtype(dtype) == numpy.float32
        self.function = getattr(cublas_library(), "cublasSgemm_v2" if single else "cublasDgemm_v2")
        # handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        operand = [pointer, integer]
        self.function.argtypes = [pointer] + [integer] * 5 + [pointer] + operand * 2 + [pointer] + operand
        self.function.restype = integer
        self.one, self.zero = numpy.ones(1, dtype=dtype), numpy.zeros(1, dtype=dtype)  # kept alive

    def __call__(self, A, B, C) -> None:
        ta, tb, m, n, k, a, lda, b, ldb, c, ldc = cublas_arguments(A, B, C, lambda x: x.data.ptr)
        one, zero = self.one.ctypes.data, self.zero.ctypes.data
        status = self.function(self.handle, ta, tb, m, n, k, one, a, lda, b, ldb, zero, c, ldc)
        if status != 0:
            raise RuntimeError(f"cuBLAS gemm returned status {status}")
