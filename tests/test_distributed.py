"""gpunn/distributed.py: MPI detection from the environment, the communicators under a real mpiexec, NCCL's
bootstrap and calls against a fake CuPy, and the thread-group fake (tests/fake_comm.py) the training tests
use to run n ranks in one process."""

from __future__ import annotations

import functools
import importlib.util
import json
import operator
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from gpunn import backend
from gpunn.distributed import (
    MPILaunch,
    NCCLCommunicator,
    SingleProcess,
    get_communicator,
    launched_by_mpi,
    mpi_launch,
)
from gpunn.errors import DataError, DeviceError, DistributedError

from fake_comm import ThreadCommunicator, run_ranks, thread_group

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC_TIMEOUT_S = 30  # one run takes about a second; this only stops a hang

# Every variable a launcher may set that distributed.mpi_launch reads, and GPUNN_COMM.
MPI_VARIABLES = (
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PMIX_RANK",
    "GPUNN_COMM",
)


@pytest.fixture
def no_mpi_env(monkeypatch):
    """This process as if started without mpiexec, and with mpi4py unimportable: a test that would
    start MPI inside pytest fails instead."""
    for name in MPI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    return monkeypatch


def plain_env() -> dict[str, str]:
    """This environment without MPI's variables and GPUNN_COMM, with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in MPI_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# --- detection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        # What the mpich wheel's Hydra mpiexec sets (checked with `mpiexec -n 2 env`).
        (
            {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
            MPILaunch(1, 2, 1, "PMI_SIZE=2"),
        ),
        ({"PMI_RANK": "2", "PMI_SIZE": "3"}, MPILaunch(2, 3, None, "PMI_SIZE=3")),  # mpiexec.gforker
        (
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            MPILaunch(3, 8, 1, "OMPI_COMM_WORLD_SIZE=8"),
        ),
        (
            {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "4"},
            MPILaunch(0, 4, None, "MV2_COMM_WORLD_SIZE=4"),
        ),
        ({"PMIX_RANK": "5"}, MPILaunch(5, None, None, "PMIX_RANK=5")),
        ({"PMI_SIZE": "not a number"}, None),
    ],
)
def test_mpi_launch_reads_the_launchers_variables(environ, expected):
    assert mpi_launch(environ) == expected
    assert launched_by_mpi(environ) is (expected is not None)


def test_mpi_launch_reads_os_environ(no_mpi_env):
    assert mpi_launch() is None
    no_mpi_env.setenv("PMI_RANK", "1")
    no_mpi_env.setenv("PMI_SIZE", "2")
    assert mpi_launch() == MPILaunch(1, 2, None, "PMI_SIZE=2")


def test_auto_is_a_single_process_outside_mpi_and_for_one_rank(no_mpi_env):
    comm = get_communicator()
    assert isinstance(comm, SingleProcess)
    assert (comm.name, comm.rank, comm.size, comm.local_rank, comm.is_root) == ("none", 0, 1, 0, True)
    no_mpi_env.setenv("PMI_RANK", "0")
    no_mpi_env.setenv("PMI_SIZE", "1")  # mpiexec -n 1
    assert isinstance(get_communicator(), SingleProcess)


def test_auto_under_mpi_without_mpi4py_says_so(no_mpi_env):
    no_mpi_env.setenv("PMI_RANK", "0")
    no_mpi_env.setenv("PMI_SIZE", "2")
    with pytest.raises(DistributedError) as info:
        get_communicator()
    assert str(info.value) == (
        "running under MPI (PMI_SIZE=2) but mpi4py is not installed: pip install 'gpunn[mpi]'"
    )


def test_gpunn_comm_none_keeps_each_rank_alone(no_mpi_env):
    no_mpi_env.setenv("PMI_RANK", "1")
    no_mpi_env.setenv("PMI_SIZE", "2")
    no_mpi_env.setenv("MPI_LOCALRANKID", "1")
    no_mpi_env.setenv("GPUNN_COMM", "none")
    comm = get_communicator()
    assert isinstance(comm, SingleProcess) and comm.local_rank == 1
    assert isinstance(get_communicator("none"), SingleProcess)


def test_unknown_kinds_are_refused(no_mpi_env):
    with pytest.raises(DistributedError, match=r"unknown communicator 'gloo'; use 'auto', 'none', 'mpi'"):
        get_communicator("gloo")
    no_mpi_env.setenv("GPUNN_COMM", "horovod")
    with pytest.raises(DistributedError, match=r"GPUNN_COMM='horovod' is not a communicator"):
        get_communicator()


def test_an_explicit_kind_wins_over_gpunn_comm(no_mpi_env):
    no_mpi_env.setenv("GPUNN_COMM", "mpi")
    assert isinstance(get_communicator("none"), SingleProcess)
    with pytest.raises(
        DistributedError, match=r"^communicator 'mpi' was asked for but mpi4py is not installed"
    ):
        get_communicator()


def test_nccl_without_cupy_says_why_before_starting_mpi(no_mpi_env):
    def no_cupy():
        raise DeviceError(
            "CUDA needs CuPy, which cannot be imported (ModuleNotFoundError: No module named 'cupy')"
        )

    no_mpi_env.setattr(backend, "import_cupy", no_cupy)
    with pytest.raises(DistributedError, match=r"^communicator 'nccl' needs CuPy: CUDA needs CuPy, which"):
        get_communicator("nccl")


def test_outside_mpi_gpunn_never_imports_mpi4py():
    code = (
        "import json, sys; import gpunn.distributed as d; c = d.get_communicator(); "
        "print(json.dumps([c.name, c.size, 'mpi4py' in sys.modules]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=plain_env(), timeout=60, check=True
    )
    assert json.loads(run.stdout) == ["none", 1, False]


# --- SingleProcess -------------------------------------------------------------------------------------


def test_single_process_leaves_everything_as_it_is():
    comm = SingleProcess()
    a = np.arange(6.0).reshape(2, 3)
    obj = {"seed": 1}
    assert comm.allreduce(a) is a and comm.broadcast(a) is a and comm.broadcast_object(obj) is obj
    assert np.array_equal(a, np.arange(6.0).reshape(2, 3))
    comm.barrier()
    assert comm.all_agree(True) and not comm.all_agree(False)
    comm.check_all(None)
    with comm.guard():
        pass


def test_single_process_failures_keep_their_own_type():
    comm = SingleProcess()
    error = DataError("no such file: train-images")
    with pytest.raises(DataError) as info:
        comm.check_all(error)
    assert info.value is error
    with pytest.raises(DataError, match="no such file"), comm.guard():
        raise DataError("no such file")
    with pytest.raises(DistributedError, match=r"^bad flag$"):
        comm.check_all("bad flag")
    with pytest.raises(SystemExit):
        comm.abort(3)


# --- real MPI ------------------------------------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, types
    from pathlib import Path
    import numpy as np
    from gpunn import backend
    from gpunn.distributed import get_communicator
    from gpunn.errors import DataError

    comm = get_communicator()
    r, n, last = comm.rank, comm.size, comm.size - 1
    out = {"rank": r, "size": n, "name": comm.name, "local_rank": comm.local_rank, "is_root": comm.is_root}
    out["f64"] = comm.allreduce(np.array([1.0, 0.5, -2.0]) * (r + 1)).tolist()
    out["f32"] = comm.allreduce(np.arange(6, dtype=np.float32).reshape(2, 3) + r).tolist()
    out["i64"] = comm.allreduce(np.array([2**40 + r, -r], dtype=np.int64)).tolist()
    out["broadcast"] = comm.broadcast(np.full(4, float(r)), root=last).tolist()
    out["object"] = comm.broadcast_object({"from": r, "seed": 7} if r == last else None, root=last)
    out["agree_all"] = comm.all_agree(True)
    out["agree_one_bad"] = comm.all_agree(r != last)
    try:
        with comm.guard():
            if r == last:
                raise DataError("no such file: train-images")
        out["guard"] = "passed"
    except Exception as exc:
        out["guard"] = f"{type(exc).__name__}: {exc}"
    comm.barrier()

    class FakeDeviceArray:
        # A host array posing as a CuPy one: get(out=) and set() as in CuPy, recording the host buffers.
        hosts = set()

        def __init__(self, a):
            self.a, self.shape, self.dtype, self.size, self.flags = a, a.shape, a.dtype, a.size, a.flags

        def get(self, out):
            FakeDeviceArray.hosts.add(out.ctypes.data)
            out[...] = self.a
            return out

        def set(self, host):
            self.a[...] = host

    FakeDeviceArray.__module__ = "cupy"
    backend.import_cupy = lambda: types.SimpleNamespace(ndarray=FakeDeviceArray)
    big, small = FakeDeviceArray(np.full(5, r + 1.0)), FakeDeviceArray(np.ones((2, 2)))
    for a in (big, small, big):
        comm.allreduce(a)
    out["staged"] = [big.a.tolist(), small.a.tolist()]
    out["staged_broadcast"] = comm.broadcast(FakeDeviceArray(np.full(3, float(r))), root=last).a.tolist()
    out["staging_buffers"] = len(FakeDeviceArray.hosts)
    out["mpi4py_imported"] = "mpi4py" in sys.modules
    # A file per rank: mpiexec forwards the ranks' stdout in chunks that can run into each other.
    Path(sys.argv[1], f"rank{r}.json").write_text(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel's, in a virtual environment) when mpi4py is there
    too; skipped with the reason otherwise, unless GPUNN_REQUIRE_MPI=1 (CI) makes that a failure."""
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    missing = None
    if found is None:
        missing = f"no mpiexec beside {sys.executable}: pip install 'gpunn[mpi]'"
    elif importlib.util.find_spec("mpi4py") is None:
        missing = f"mpi4py is not installed for {sys.executable}: pip install 'gpunn[mpi]'"
    if missing is None:
        return found
    if os.environ.get("GPUNN_REQUIRE_MPI") == "1":
        pytest.fail(f"GPUNN_REQUIRE_MPI=1 but {missing}")
    pytest.skip(missing)


def run_mpiexec(mpiexec: str, n: int, script: Path, folder: Path) -> tuple[int, str]:
    """(exit status, stdout and stderr) of ``mpiexec -n n python script folder``."""
    command = [mpiexec, "-n", str(n), sys.executable, str(script), str(folder)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=plain_env(),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=MPIEXEC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and the ranks it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpiexec -n {n} hung for {MPIEXEC_TIMEOUT_S} s:\n{stdout}\n{stderr}")
    return proc.returncode, f"{stdout}\n{stderr}"


@pytest.mark.parametrize("n", [1, 2, 3])
def test_collectives_under_mpiexec(mpiexec, tmp_path, n):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    status, output = run_mpiexec(mpiexec, n, script, tmp_path)
    assert status == 0, f"mpiexec -n {n} failed ({status}):\n{output}"
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert [out["rank"] for out in ranks] == list(range(n))
    total = n * (n + 1) // 2  # 1 + 2 + … + n
    last = n - 1
    for out in ranks:
        r = out["rank"]
        # mpiexec -n 1 runs like a plain run: no MPI, no mpi4py (see get_communicator).
        assert out["name"] == ("none" if n == 1 else "mpi")
        assert out["mpi4py_imported"] is (n > 1)
        assert (out["size"], out["local_rank"], out["is_root"]) == (n, r, r == 0)
        assert out["f64"] == [1.0 * total, 0.5 * total, -2.0 * total]
        assert out["f32"] == (np.arange(6).reshape(2, 3) * n + n * (n - 1) // 2).tolist()
        assert out["i64"] == [n * 2**40 + n * (n - 1) // 2, -n * (n - 1) // 2]
        assert out["broadcast"] == [float(last)] * 4
        assert out["object"] == {"from": last, "seed": 7}
        assert out["agree_all"] is True
        assert out["agree_one_bad"] is False
        if r == last:
            assert out["guard"] == "DataError: no such file: train-images"
        else:
            assert out["guard"] == f"DistributedError: rank {last} of {n} failed: no such file: train-images"
        if n > 1:  # SingleProcess stages nothing
            assert out["staged"] == [[float(total * n)] * 5, [[float(n)] * 2] * 2]
            assert out["staged_broadcast"] == [float(last)] * 3
            assert out["staging_buffers"] == 1  # one float64 buffer, kept across calls


def test_abort_ends_every_rank_under_mpiexec(mpiexec, tmp_path):
    script = tmp_path / "abort.py"
    script.write_text(
        "from gpunn.distributed import get_communicator\n"
        "comm = get_communicator()\n"
        "if comm.rank == 1:\n"
        "    comm.abort(3)\n"
        "comm.barrier()  # rank 0 would wait here forever\n"
    )
    status, output = run_mpiexec(mpiexec, 2, script, tmp_path)
    assert status == 3, output


# --- NCCL, against a fake CuPy ------------------------------------------------------------------------


class FakeDeviceArray:
    """A host array posing as a CuPy array: ``data.ptr`` is its address."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.dtype, self.size, self.flags = a, a.shape, a.dtype, a.size, a.flags
        self.data = types.SimpleNamespace(ptr=a.ctypes.data)


FakeDeviceArray.__module__ = "cupy"  # what backend.is_device_array looks for before importing CuPy


class FakeCupy:
    """cupy, cupy.cuda and cupy.cuda.nccl as far as NCCLCommunicator uses them; ``events`` records every
    call, with the rank of the thread that made it."""

    def __init__(self, nccl_available: bool = True):
        self.events: list[tuple] = []
        self.local = threading.local()  # per rank: the CUDA device and stream that are current
        fake = self

        class Device:
            def __init__(self, index: int):
                self.index = index

            def __enter__(self):
                fake.local.device = self.index

            def __exit__(self, *exc):
                fake.local.device = None

        class NcclCommunicator:
            def __init__(self, ndev: int, commId: tuple, rank: int):
                self.rank = rank
                fake.record("NcclCommunicator", ndev, commId, rank, getattr(fake.local, "device", None))

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                fake.record("allReduce", sendbuf, recvbuf, count, datatype, op, stream)

            def bcast(self, buff, count, datatype, root, stream):
                fake.record("bcast", buff, count, datatype, root, stream)

        nccl = types.ModuleType("cupy.cuda.nccl")
        nccl.available = nccl_available
        nccl.NCCL_SUM, nccl.NCCL_INT64, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64 = 0, 4, 7, 8
        nccl.NcclCommunicator = NcclCommunicator
        nccl.get_unique_id = self.get_unique_id
        self.nccl = nccl
        self.module = types.ModuleType("cupy")
        self.module.ndarray = FakeDeviceArray
        self.module.cuda = types.SimpleNamespace(
            nccl=nccl, Device=Device, get_current_stream=lambda: types.SimpleNamespace(ptr=self.local.stream)
        )

    def record(self, *event) -> None:
        self.events.append((threading.current_thread().name, *event))

    def get_unique_id(self) -> tuple:
        self.record("get_unique_id")
        return tuple((len(self.events) * 31 + i) % 256 for i in range(128))  # differs at each call

    def install(self, monkeypatch) -> FakeCupy:
        monkeypatch.setattr(backend, "import_cupy", lambda: self.module)
        monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", self.nccl)
        return self


def test_nccl_bootstraps_over_its_communicator(monkeypatch):
    fake = FakeCupy().install(monkeypatch)
    broadcast_object = ThreadCommunicator.broadcast_object

    def recorded(comm, obj, root=0):
        fake.record("broadcast_object", root)
        return broadcast_object(comm, obj, root)

    monkeypatch.setattr(ThreadCommunicator, "broadcast_object", recorded)
    comms = run_ranks(3, lambda comm: NCCLCommunicator(comm, backend.Device("cuda", comm.rank, fake.module)))
    assert [(c.name, c.rank, c.size, c.local_rank) for c in comms] == [("nccl", r, 3, r) for r in range(3)]
    (draw,) = [event for event in fake.events if event[1] == "get_unique_id"]
    assert draw[0] == "rank 0"
    inits = [event for event in fake.events if event[1] == "NcclCommunicator"]
    unique_id = inits[0][3]
    assert len(unique_id) == 128
    assert sorted(inits) == [(f"rank {r}", "NcclCommunicator", 3, unique_id, r, r) for r in range(3)]
    for r in range(3):
        mine = [event[1] for event in fake.events if event[0] == f"rank {r}"]
        # guard()'s agreement is an allreduce when nothing fails: the unique id is the only object sent.
        expected = ["get_unique_id"] * (r == 0) + ["broadcast_object", "NcclCommunicator"]
        assert mine == expected


def test_nccl_reduces_device_arrays_in_place_on_the_current_stream(monkeypatch):
    fake = FakeCupy().install(monkeypatch)

    def rank(comm):
        nccl = NCCLCommunicator(comm)
        fake.local.stream = 0x5000 + comm.rank  # made current after set-up: read at each call
        arrays = {
            dtype: FakeDeviceArray(np.zeros((2, 3), dtype=dtype)) for dtype in ("float32", "float64", "int64")
        }
        for array in arrays.values():
            assert nccl.allreduce(array) is array
        nccl.broadcast(arrays["float32"], root=1)
        with pytest.raises(ValueError, match="float32, float64 or int64; got int32"):
            nccl.allreduce(FakeDeviceArray(np.zeros(3, dtype=np.int32)))
        host = np.full(2, comm.rank + 1.0)
        assert nccl.allreduce(host) is host  # host arrays go over the bootstrap communicator
        return {dtype: a.data.ptr for dtype, a in arrays.items()}, host.tolist()

    results = run_ranks(2, rank)
    for r, (pointers, host) in enumerate(results):
        stream, thread = 0x5000 + r, f"rank {r}"
        calls = [
            event[1:] for event in fake.events if event[0] == thread and event[1] in ("allReduce", "bcast")
        ]
        assert calls == [
            ("allReduce", pointers["float32"], pointers["float32"], 6, 7, 0, stream),
            ("allReduce", pointers["float64"], pointers["float64"], 6, 8, 0, stream),
            ("allReduce", pointers["int64"], pointers["int64"], 6, 4, 0, stream),
            ("bcast", pointers["float32"], 6, 7, 1, stream),
        ]
        assert host == [3.0, 3.0]


def test_nccl_failing_on_one_rank_fails_every_rank(monkeypatch):
    fake = FakeCupy().install(monkeypatch)

    def cupy_on_rank_0_only():
        if threading.current_thread().name != "rank 0":
            raise DeviceError("CuPy cannot reach a GPU: no CUDA-capable device is detected")
        return fake.module

    monkeypatch.setattr(backend, "import_cupy", cupy_on_rank_0_only)

    def rank(comm):
        with pytest.raises(DistributedError) as info:
            NCCLCommunicator(comm)
        return str(info.value)

    reason = "communicator 'nccl' needs CuPy: CuPy cannot reach a GPU: no CUDA-capable device is detected"
    assert run_ranks(3, rank) == [f"rank 1 of 3 failed: {reason} (ranks 1, 2 failed)", reason, reason]
    assert not [event for event in fake.events if event[1] == "NcclCommunicator"]


def test_nccl_refuses_a_cpu_device_and_a_cupy_without_nccl(monkeypatch):
    FakeCupy(nccl_available=False).install(monkeypatch)
    with pytest.raises(DistributedError, match="needs the NCCL library, which CuPy cannot load: pip install"):
        NCCLCommunicator(SingleProcess())
    with pytest.raises(DistributedError, match=r"^communicator 'nccl' needs a CUDA device; got cpu$"):
        NCCLCommunicator(SingleProcess(), backend.CPU)


# --- the thread-group fake -----------------------------------------------------------------------------


def test_thread_group_sums_in_rank_order():
    # In floating point the order of a sum matters: 1e16 + 1 == 1e16. In rank order this is
    # ((1e16 + 1) − 1e16) + 1 = 1; adding the two 1e16s first would give 2.
    values = [1e16, 1.0, -1e16, 1.0]
    in_rank_order = functools.reduce(operator.add, values)
    results = run_ranks(4, lambda comm: comm.allreduce(np.array([values[comm.rank]]))[0])
    assert results == [in_rank_order] * 4 == [1.0] * 4


def test_thread_group_collectives():
    def rank(comm):
        a = comm.allreduce(np.arange(6, dtype=np.float32).reshape(2, 3) + comm.rank)
        b = comm.broadcast(np.full(2, comm.rank, dtype=np.int64), root=2)
        sent = {"rank": comm.rank}
        got = comm.broadcast_object(sent if comm.rank == 1 else None, root=1)
        comm.barrier()
        return a.tolist(), b.tolist(), got, got is sent, comm.all_agree(comm.rank != 0), comm.is_root

    results = run_ranks(3, rank)
    a = (np.arange(6).reshape(2, 3) * 3 + 3).tolist()
    # As with mpi4py, every rank, the root too, gets an unpickled copy of the object.
    assert results == [(a, [2, 2], {"rank": 1}, False, False, r == 0) for r in range(3)]
    assert [(c.rank, c.size, c.local_rank) for c in thread_group(2)] == [(0, 2, 0), (1, 2, 1)]


def test_thread_group_agreement_names_the_failing_ranks():
    def rank(comm):
        try:
            with comm.guard():
                if comm.rank in (1, 2):
                    raise DataError(f"rank {comm.rank} cannot read train-images")
            return "passed"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    message = "DistributedError: rank 1 of 4 failed: rank 1 cannot read train-images (ranks 1, 2 failed)"
    assert run_ranks(4, rank) == [
        message,
        "DataError: rank 1 cannot read train-images",
        "DataError: rank 2 cannot read train-images",
        message,
    ]
    assert run_ranks(2, lambda comm: comm.check_all(None)) == [None, None]


def test_run_ranks_reraises_the_first_failure_and_releases_the_others():
    def rank(comm):
        if comm.rank == 1:
            raise KeyError("rank 1 alone")
        comm.barrier()  # would wait forever for rank 1

    with pytest.raises(KeyError, match="rank 1 alone"):
        run_ranks(3, rank)
