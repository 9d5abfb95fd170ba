"""The engine contract: what the training loop (``train.fit``) may ask of any engine, and nothing else.

An engine runs stretches of SGD iterations of one network with one optimizer on one device-resident
data set, and evaluates the network. The loop never knows which engine it talks to:

    reason = Engine.supports(net, optimizer, data, comm)   # None, or one line saying why not
    engine = Engine(net, optimizer, data, comm)
    costs, errors = engine.run(order, first, count, batch_size, lrs)   # count <= engine.max_steps
    cost, error_rate = engine.evaluate(data)
    engine.finish()                                                      # fit ends, however it ends

Iteration ``first + k`` of an epoch takes the rows ``order[(first+k)·n_b : (first+k+1)·n_b]`` (the
last of an epoch may be shorter) with learning rate ``lrs[k]``. Under data parallelism (``comm`` of
size N > 1) each rank takes a contiguous slice of those rows (a rank may get none) and the ranks sum
their scaled gradients with one allreduce per iteration, so N processes compute what one computes.
"""

from __future__ import annotations

from typing import ClassVar

import numpy

from ..backend import to_numpy
from ..distributed import SingleProcess

EVAL_CHUNK = 1000  # rows per evaluation product: large enough for BLAS, small enough for any memory


class Engine:
    """Base class of every engine. Eager engines implement ``step``; ``run`` then runs one at a time."""

    name: ClassVar[str] = "?"
    max_steps: int = 1  # the most iterations one ``run`` call takes; the loop never asks for more

    @classmethod
    def supports(cls, net, optimizer, data, comm=None) -> str | None:
        """None where this engine can train ``net`` with ``optimizer`` on ``data`` here; else why not."""
        return None

    def refusal(self, net, optimizer, data, comm) -> str | None:
        """What ``__init__`` checks: ``supports`` (an emulated engine skips the device part)."""
        return self.supports(net, optimizer, data, comm)

    def __init__(self, net, optimizer, data, comm=None):
        reason = self.refusal(net, optimizer, data, comm)
        if reason is not None:
            raise ValueError(reason)
        self.net, self.optimizer, self.data = net, optimizer, data
        self.comm = comm if comm is not None else SingleProcess()
        P = net.num_params
        self.flat = net.xp.zeros(P + 2, dtype=net.dtype)  # [∇J, J, errors]: one allreduce sums all
        self.grad = self.flat[:P]
        self.records = net.xp.zeros((self.max_steps, 2), dtype=numpy.float64)  # (J, errors) per step

    def run(self, order, first: int, count: int, batch_size: int, lrs):
        """Iterations first … first + count − 1 of the epoch whose permutation is ``order`` (see the
        module). Returns (costs, errors): (count,) device arrays of each mini-batch's J and number of
        misclassified rows (NaN for regression), valid until the next call."""
        return self.run_steps(order, first, count, batch_size, lrs)

    def run_steps(self, order, first: int, count: int, batch_size: int, lrs, done: int = 0):
        """``run`` by ``step``, from its iteration ``done`` on (an engine ran those before itself and
        recorded them)."""
        for k in range(done, count):
            start = (first + k) * batch_size
            upcoming = order[start + batch_size : start + 2 * batch_size]
            J, errors = self.step(order[start : start + batch_size], lrs[k], upcoming)
            self.records[k, 0] = J
            self.records[k, 1] = numpy.nan if errors is None else errors
        return self.records[:count, 0], self.records[:count, 1]

    def step(self, rows, lr, next_rows=None):
        """One iteration on ``rows`` (the whole mini-batch, every rank's) with learning rate ``lr``:
        returns (J, misclassified rows or None) of the whole mini-batch. ``next_rows``, the following
        mini-batch's rows where known, is a hint an engine may use to fetch them early."""
        raise NotImplementedError

    def finish(self) -> None:
        """``fit`` is done with the engine for now (it may call ``run`` again later): wait for anything
        still running and give back what the engine holds process-wide. Nothing by default."""

    def evaluate(self, data, chunk: int = EVAL_CHUNK) -> tuple[float, float | None]:
        """(mean cost J, misclassification rate or None for regression) of the network on the whole of
        ``data``, in chunks of ``chunk`` rows; under data parallelism each rank takes its share of the
        chunks. One synchronisation at the end."""
        raise NotImplementedError

    # --- for the engines ------------------------------------------------------------------------

    def local_rows(self, rows):
        """(this rank's contiguous slice of the mini-batch ``rows``, its share of the rows m_r / m)."""
        size = self.comm.size
        if size == 1:
            return rows, 1.0
        m, r = rows.shape[0], self.comm.rank
        lo, hi = r * m // size, (r + 1) * m // size
        return rows[lo:hi], (hi - lo) / max(m, 1)

    def sum_over_ranks(self, J, errors, share: float):
        """(J, errors) of the whole mini-batch from this rank's part of it: the gradient (in ``grad``),
        the cost weighted by the rank's ``share`` and the error count (None: regression) travel in
        ``flat`` and are summed over the ranks by one allreduce."""
        P = self.net.num_params
        self.flat[P] = J * share
        self.flat[P + 1] = 0 if errors is None else errors
        self.comm.allreduce(self.flat)
        return self.flat[P], (None if self.net.task == "regression" else self.flat[P + 1])

    def my_chunks(self, n: int, chunk: int) -> list[slice]:
        return my_chunks(n, chunk, self.comm)

    def finish_evaluation(self, totals, n: int) -> tuple[float, float | None]:
        return finish_evaluation(totals, n, self.net.task, self.comm)


def my_chunks(n: int, chunk: int, comm) -> list[slice]:
    """The chunks of rows 0…n−1 this rank evaluates: every size-th, starting at its rank."""
    spans = [slice(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    return spans[comm.rank :: comm.size]


def finish_evaluation(totals, n: int, task: str, comm) -> tuple[float, float | None]:
    """(cost sum, error count) of this rank's chunks, summed over ranks -> (mean cost, error rate or
    None for regression)."""
    comm.allreduce(totals)
    cost, errors = to_numpy(totals).tolist()
    return cost / n, (None if task == "regression" else errors / n)
