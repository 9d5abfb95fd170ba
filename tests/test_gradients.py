"""Backprop (Algorithm 6.1) against central finite differences, in float64, on every device."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn.model import flatten

ACTIVATIONS = ["relu", "sigmoid", "tanh", "identity"]
DEPTHS = {  # L = 1, 2, 3 and 4 layers; the input width 4 and hidden widths vary
    1: [4],
    2: [4, 5],
    3: [4, 6, 5],
    4: [4, 5, 3, 4],
}
TASKS = {  # task -> output width
    "classification": 3,
    "regression": 2,
    "regression-scalar": 1,
    "binary": 1,
}


def make_problem(sizes_in, task, activation, device, seed=0, n=7):
    rng = np.random.default_rng(seed)
    width = TASKS[task]
    real_task = task.split("-")[0]
    net = gpunn.MLP([*sizes_in, width], activation, real_task, device, seed=seed, dtype="float64")
    for W, b in net.params:  # a generic point: nonzero biases keep every Z^(l) off ReLU's kink at 0
        b[...] = device.asarray(rng.uniform(-0.5, 0.5, b.shape))
        W *= 1.5
    X = rng.standard_normal((n, sizes_in[0]))
    if real_task == "classification":
        y = rng.integers(0, width, n)
    elif real_task == "binary":
        y = rng.integers(0, 2, n)
    else:
        y = rng.standard_normal(n) if width == 1 else rng.standard_normal((n, width))
    return net, X, y


def numerical_gradient(net, X, y, eps=1e-6):
    theta = net.theta
    g = np.zeros(theta.size)
    for i in range(theta.size):
        old = float(theta[i])
        theta[i] = old + eps
        plus = float(net.loss(X, y)[0])
        theta[i] = old - eps
        minus = float(net.loss(X, y)[0])
        theta[i] = old
        g[i] = (plus - minus) / (2 * eps)
    return g


def relative_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("depth", sorted(DEPTHS))
@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backprop_matches_finite_differences(device, activation, task, depth):
    net, X, y = make_problem(DEPTHS[depth], task, activation, device)
    J, grads = gpunn.backprop(net, X, y)
    assert [(dW.shape, db.shape) for dW, db in grads] == [(W.shape, b.shape) for W, b in net.params]
    analytic = gpunn.to_numpy(flatten(grads))
    numeric = numerical_gradient(net, X, y)
    assert np.all(np.isfinite(analytic))
    assert relative_error(analytic, numeric) < 1e-6
    assert float(J) == pytest.approx(float(net.loss(X, y)[0]), rel=1e-12)


def test_gradient_check_catches_a_wrong_gradient(device):
    """The check above is not vacuous: a backprop that drops h' (6.27a) fails it."""
    net, X, y = make_problem(DEPTHS[2], "classification", "tanh", device)
    layer = net.layers[0]
    real_backward = layer.activation.backward
    layer.activation = type(layer.activation)()
    layer.activation.backward = lambda xp, dQ, Z, Q, out=None: dQ  # h'(z) := 1, wrong for tanh
    try:
        analytic = gpunn.to_numpy(flatten(gpunn.backprop(net, X, y)[1]))
    finally:
        layer.activation.backward = real_backward
    assert relative_error(analytic, numerical_gradient(net, X, y)) > 1e-3
