"""The reference engine ``xp``: Algorithm 6.1 and the optimizer's own update, through the shared NumPy/CuPy
code of layers.py, losses.py, model.py and optim.py, on any device, for any network and optimizer.
Every other engine is checked against it.
"""

from __future__ import annotations

import numpy

from ..distributed import SingleProcess
from ..losses import LOSSES, count_errors
from ..model import Workspace, backprop
from .base import EVAL_CHUNK, Engine, finish_evaluation, my_chunks


class XpEngine(Engine):
    """One iteration: gather the mini-batch on the device, backprop on a Workspace (one per mini-batch
    size, sharing one gradient vector), the optimizer's ``step``. Under data parallelism the gradient,
    the cost and the error count travel in one flat vector, so one allreduce per iteration sums all."""

    name = "xp"

    def __init__(self, net, optimizer, data, comm=None):
        super().__init__(net, optimizer, data, comm)
        self.batches: dict[int, tuple] = {}
        self.eval_buffers: dict = {}

    def _batch(self, n: int) -> tuple:
        """(Workspace, X, y, staging) for mini-batches of n rows, made once."""
        if n not in self.batches:
            self.batches[n] = (Workspace(self.net, n, grad=self.grad), *self.data.buffers(n))
        return self.batches[n]

    def step(self, rows, lr, next_rows=None):
        net = self.net
        rows, share = self.local_rows(rows)
        errors = None
        if rows.shape[0]:
            ws, X, y, staging = self._batch(rows.shape[0])
            X, y = self.data.batch(rows, X, y, staging)
            J, _ = backprop(net, X, y, ws, scale=share)
            errors = count_errors(ws.Z[-1], y, net.task, work=ws.loss_work)
        else:  # this rank's slice is empty: it adds nothing, but takes part in the allreduce
            J = 0.0
            self.grad.fill(0)
        if self.comm.size > 1:
            J, errors = self.sum_over_ranks(J, errors, share)
        self.optimizer.step(self.grad, lr)
        return J, errors

    def evaluate(self, data, chunk: int = EVAL_CHUNK):
        return evaluate(self.net, data, chunk, self.eval_buffers, self.comm)


def evaluate(net, data, chunk: int = EVAL_CHUNK, cache: dict | None = None, comm=None):
    """(mean cost J, misclassification rate or None for regression) of ``net`` on the whole of the
    DeviceDataset ``data``, ``chunk`` rows at a time (under data parallelism each rank takes its share
    of the chunks); ``cache`` keeps the buffers between calls. One synchronisation at the end."""
    xp, comm = net.xp, comm if comm is not None else SingleProcess()
    cache = {} if cache is None else cache
    totals = xp.zeros(2, dtype=numpy.float64)  # cost sum, error count
    for rows in my_chunks(data.n, chunk, comm):
        m = rows.stop - rows.start
        key = (m, data.X.dtype)  # the buffers depend on the network, the size and the stored inputs
        if key not in cache:
            cache[key] = (Workspace(net, m, forward_only=True), *data.buffers(m))
        ws, X, y, staging = cache[key]
        X, y = data.batch(rows, X, y, staging)
        Z = net.forward(X, ws)
        J, _ = LOSSES[net.task](Z, y, dZ=ws.dZL, grad=False, work=ws.loss_work)
        totals[0] += J * m
        errors = count_errors(Z, y, net.task, work=ws.loss_work)
        if errors is not None:
            totals[1] += errors
    return finish_evaluation(totals, data.n, net.task, comm)
