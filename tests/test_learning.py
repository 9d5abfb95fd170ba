"""SGD (6.21)/(6.23) learns: a few hundred steps drive the cost of small problems well down."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn.optim import Schedule


def regression_problem(rng, n=128):
    x = rng.uniform(-1, 1, (n, 1))
    return x, np.sin(3 * x[:, 0]) + 0.05 * rng.standard_normal(n)


def blobs(rng, n=150):
    centres = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = rng.integers(0, 3, n)
    return centres[y] + 0.6 * rng.standard_normal((n, 2)), y


def run_sgd(net, X, y, steps, opt, batch=32, seed=0):
    order = np.random.default_rng(seed)
    for _ in range(steps):
        rows = order.choice(len(X), batch, replace=False)
        _, grads = gpunn.backprop(net, X[rows], y[rows])
        opt.step(grads)
    return float(net.loss(X, y)[0])


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_sgd_fits_a_regression(device, rng, activation):
    X, y = regression_problem(rng)
    net = gpunn.MLP([1, 16, 1], activation, "regression", device, seed=0)
    before = float(net.loss(X, y)[0])
    after = run_sgd(net, X, y, 400, gpunn.SGD(net, lr=0.1, momentum=0.9))
    assert after < 0.1 * before and after < 0.05  # var(sin 3x) on (−1, 1) is ~0.45


def test_sgd_fits_a_classification(device, rng):
    X, y = blobs(rng)
    net = gpunn.MLP([2, 16, 3], "relu", "classification", device, seed=0)
    before, _ = net.loss(X, y)
    after = run_sgd(net, X, y, 300, gpunn.SGD(net, lr=0.2))
    accuracy = float((gpunn.to_numpy(net.predict(X)) == y).mean())
    assert after < 0.3 * float(before) and accuracy > 0.95


def test_plain_step_is_equation_6_23(device, rng):
    net = gpunn.MLP([3, 4, 2], device=device, seed=0, dtype="float64")
    X, y = rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    before = [(gpunn.to_numpy(W).copy(), gpunn.to_numpy(b).copy()) for W, b in net.params]
    _, grads = gpunn.backprop(net, X, y)
    host_grads = [(gpunn.to_numpy(dW), gpunn.to_numpy(db)) for dW, db in grads]
    gpunn.SGD(net, lr=0.3).step(grads)
    for (W, b), (W0, b0), (dW, db) in zip(net.params, before, host_grads):
        np.testing.assert_allclose(gpunn.to_numpy(W), W0 - 0.3 * dW, rtol=1e-14)
        np.testing.assert_allclose(gpunn.to_numpy(b), b0 - 0.3 * db, rtol=1e-14)


def test_momentum_and_weight_decay(device, rng):
    """v ← μv + (∇J + λW), θ ← θ − γv, with no decay on b; two steps from the same gradient."""
    net = gpunn.MLP([3, 2], device=device, seed=0, dtype="float64")
    X, y = rng.standard_normal((4, 3)), rng.integers(0, 2, 4)
    (W0, b0) = (gpunn.to_numpy(a).copy() for a in net.params[0])
    _, grads = gpunn.backprop(net, X, y)
    dW, db = (gpunn.to_numpy(a).copy() for a in grads[0])
    opt = gpunn.SGD(net, lr=0.5, momentum=0.9, weight_decay=0.1)
    opt.step(grads)
    vW, vb = dW + 0.1 * W0, db
    W1, b1 = W0 - 0.5 * vW, b0 - 0.5 * vb
    np.testing.assert_allclose(gpunn.to_numpy(net.params[0][0]), W1, rtol=1e-14)
    np.testing.assert_allclose(gpunn.to_numpy(net.params[0][1]), b1, rtol=1e-14)
    opt.step(grads)  # the same gradient again: the velocity accumulates
    vW, vb = 0.9 * vW + dW + 0.1 * W1, 0.9 * vb + db
    np.testing.assert_allclose(gpunn.to_numpy(net.params[0][0]), W1 - 0.5 * vW, rtol=1e-13)
    np.testing.assert_allclose(gpunn.to_numpy(net.params[0][1]), b1 - 0.5 * vb, rtol=1e-13)


def test_schedules():
    assert [Schedule(0.5)(t) for t in (0, 10_000)] == [0.5, 0.5]
    step = Schedule(0.5, "step", total=90, step_size=30, gamma=0.1)
    assert [step(t) for t in (0, 29, 30, 59, 60, 89)] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005, 0.005])
    cosine = Schedule(0.5, "cosine", total=100)
    assert cosine(0) == 0.5 and cosine(50) == pytest.approx(0.25) and cosine(100) == pytest.approx(0)
    assert all(cosine(t) >= cosine(t + 1) for t in range(100))
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(0.5, "linear")


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"momentum": 1.0}, "momentum"), ({"weight_decay": -1}, "decay")]
)
def test_bad_optimizer_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpunn.SGD(gpunn.MLP([2, 2]), **kwargs)
