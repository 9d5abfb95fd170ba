"""n ranks inside one process, one thread each: the Communicator interface without mpiexec.

    results = run_ranks(3, lambda comm: train(comm))   # train runs on 3 threads, comm.rank 0, 1, 2

allreduce adds the ranks' arrays in rank order 0, 1, …, n−1 on every rank, so a result is the same bits
on every rank and in every run; broadcast_object gives every rank, the root too, an unpickled copy, as
mpi4py does.
"""

from __future__ import annotations

import pickle
import threading

from gpunn.distributed import Communicator

TIMEOUT_S = 60.0  # a rank that never reaches a collective fails the test instead of hanging it


class _Group:
    """What the threads of one group share: a barrier and one slot per rank."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self.slots: list = [None] * size


class ThreadCommunicator(Communicator):
    """Rank ``rank`` of a thread group, all on one node (local_rank = rank); every collective meets the
    other ranks at the group's barrier."""

    name = "threads"

    def __init__(self, group: _Group, rank: int):
        self.group, self.rank, self.size, self.local_rank = group, rank, len(group.slots), rank

    def _exchange(self, value) -> list:
        """Every rank's ``value``, in rank order; the slots are free again when this returns."""
        self.group.slots[self.rank] = value
        self.group.barrier.wait()
        values = list(self.group.slots)
        self.group.barrier.wait()
        return values

    def allreduce(self, array):
        values = self._exchange(array.copy())
        total = values[0].copy()  # values[0] is shared with the other ranks, which are reading it
        for value in values[1:]:
            total += value
        array[...] = total
        return array

    def broadcast(self, array, root: int = 0):
        array[...] = self._exchange(array.copy() if self.rank == root else None)[root]
        return array

    def broadcast_object(self, obj, root: int = 0):
        payload = pickle.dumps(obj) if self.rank == root else None
        return pickle.loads(self._exchange(payload)[root])

    def barrier(self) -> None:
        self.group.barrier.wait()

    def abort(self, code: int = 1):
        self.group.barrier.abort()
        raise SystemExit(code)


def thread_group(n: int) -> list[ThreadCommunicator]:
    """n communicators, ranks 0 … n−1, to be used by n threads at once (see run_ranks)."""
    group = _Group(n)
    return [ThreadCommunicator(group, rank) for rank in range(n)]


def run_ranks(n: int, fn) -> list:
    """[fn(comm) for each rank of a new thread group], each on its own thread. When ranks raise, the
    ranks left waiting at a collective are released, and the exception of the lowest rank that failed
    by itself (not by being released) is raised again."""
    comms = thread_group(n)
    results: list = [None] * n
    errors: list[BaseException | None] = [None] * n

    def run(comm: ThreadCommunicator) -> None:
        try:
            results[comm.rank] = fn(comm)
        except BaseException as exc:
            errors[comm.rank] = exc
            comm.group.barrier.abort()

    threads = [threading.Thread(target=run, args=(comm,), name=f"rank {comm.rank}") for comm in comms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    raised = [exc for exc in errors if exc is not None]
    if raised:
        # The released ranks fail with BrokenBarrierError: a consequence, not the cause.
        causes = [exc for exc in raised if not isinstance(exc, threading.BrokenBarrierError)]
        raise (causes or raised)[0]
    return results
