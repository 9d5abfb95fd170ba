"""The reference engine's iteration (preallocated Workspace, flat optimizer update, on-device gather)
computes the same updates as the plainest path (a temporary workspace per call, host-side batches)."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn.data import DeviceDataset
from gpunn.engines.reference import XpEngine
from gpunn.model import Workspace, flatten


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize(
    ("task", "sizes"),
    [
        ("classification", [6, 5, 4, 3]),
        ("classification", [6, 3]),
        ("regression", [6, 5, 2]),
        ("binary", [6, 4, 1]),
    ],
)
def test_workspace_backprop_equals_reference(device, rng, activation, task, sizes):
    net = gpunn.MLP(sizes, activation, task, device, seed=1, dtype="float64")
    X = rng.standard_normal((9, sizes[0]))
    y = rng.integers(0, sizes[-1], 9) if task == "classification" else rng.integers(0, 2, (9, sizes[-1]))
    J_ref, grads_ref = gpunn.backprop(net, X, y)
    ws = Workspace(net, 9)
    J, grads = gpunn.backprop(net, net.inputs(X), net.targets(y, 9), ws)
    assert grads is ws.grads and grads[0][0].base is not None  # views into ws.grad, nothing new
    assert float(J) == pytest.approx(float(J_ref), rel=1e-13)
    np.testing.assert_allclose(
        gpunn.to_numpy(ws.grad), gpunn.to_numpy(flatten(grads_ref)), rtol=1e-12, atol=1e-15
    )


def reference_run(X8, y, sizes, order, batch, steps, dtype, **opt):
    """Plain Algorithm 6.1 + per-layer SGD on host-prepared mini-batches."""
    net = gpunn.MLP(sizes, device="cpu", seed=0, dtype=dtype)
    sgd = gpunn.SGD(net, **opt)
    losses = []
    for t in range(steps):
        rows = order[(t * batch) % len(order) :][:batch]
        J, grads = gpunn.backprop(net, X8[rows].astype(dtype) / 255, y[rows])
        sgd.step(grads)
        losses.append(float(J))
    return net, losses


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("opt", [{"lr": 0.5}, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}])
def test_train_step_equals_reference_over_many_steps(device, dtype, opt):
    rng = np.random.default_rng(0)
    n, batch, sizes = 250, 50, [64, 32, 10]  # 5 full batches per pass
    X8, y = rng.integers(0, 256, (n, 64), dtype=np.uint8), rng.integers(0, 10, n)
    order = np.random.default_rng(1).permutation(n)
    ref, ref_losses = reference_run(X8, y, sizes, order, batch, 40, dtype, **opt)

    net = gpunn.MLP(sizes, device=device, seed=0, dtype=dtype)
    engine = XpEngine(net, gpunn.SGD(net, **opt), DeviceDataset(net, X8, y, 1 / 255))
    rows_all = device.asarray(order)
    losses = [float(engine.step(rows_all[(t * batch) % n :][:batch], opt["lr"])[0]) for t in range(40)]

    tol = {"float64": 1e-10, "float32": 2e-4}[dtype]  # float32: rounding of 40 steps of updates
    np.testing.assert_allclose(losses, ref_losses, rtol=tol)
    np.testing.assert_allclose(gpunn.to_numpy(net.theta), ref.theta, rtol=tol, atol=tol * 1e-2)


def test_partial_batch_gets_its_own_workspace(device, rng):
    X8, y = rng.integers(0, 256, (130, 16), dtype=np.uint8), rng.integers(0, 10, 130)
    net = gpunn.MLP([16, 10], device=device, seed=0, dtype="float64")
    engine = XpEngine(net, gpunn.SGD(net, lr=0.1), DeviceDataset(net, X8, y, 1 / 255))
    rows = device.asarray(np.arange(130))
    engine.step(rows[:100], 0.1)
    J, errors = engine.step(rows[100:], 0.1)
    assert sorted(engine.batches) == [30, 100]
    assert engine.batches[30][0].grad is engine.batches[100][0].grad
    ref = gpunn.MLP([16, 10], seed=0, dtype="float64")
    gpunn.SGD(ref, lr=0.1).step(gpunn.backprop(ref, X8[:100] / 255, y[:100])[1])
    J_ref, _grads = gpunn.backprop(ref, X8[100:] / 255, y[100:])
    assert float(J) == pytest.approx(float(J_ref), rel=1e-12)
    assert int(errors) == int((gpunn.to_numpy(ref.forward(X8[100:] / 255)).argmax(1) != y[100:]).sum())
