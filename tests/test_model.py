"""The network itself: shapes and counts of Example 6.1, the lecture's XOR network, and the API."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpunn
from gpunn.model import init_theta

XOR_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)


@pytest.mark.parametrize(("sizes", "count"), [([784, 10], 7850), ([784, 200, 10], 159010)])
def test_parameter_counts_of_example_6_1(device, sizes, count):
    net = gpunn.MLP(sizes, device=device)
    assert net.num_params == count
    assert sum(W.size + b.size for W, b in net.params) == count
    assert [W.shape for W, _ in net.params] == [(u, p) for p, u in itertools.pairwise(sizes)]


def xor_network(device):
    """The lecture's hand-set network: W(1) all ones, b(1) = (0, -1), W(2) = (1, -2), b(2) = 0."""
    net = gpunn.MLP([2, 2, 1], activation="relu", task="regression", device=device)
    (W1, b1), (W2, b2) = net.params
    W1[...] = 1
    b1[...] = device.asarray([0.0, -1.0])
    W2[...] = device.asarray([[1.0, -2.0]])
    b2[...] = 0
    return net


def test_xor_network_of_the_lecture(device):
    net = xor_network(device)
    assert gpunn.to_numpy(net.predict(XOR_X)).tolist() == [0, 1, 1, 0]
    q = gpunn.to_numpy(net.layers[0].Q)  # the feature space: (0,1) and (1,0) both map to (1,0)
    assert q.tolist() == [[0, 0], [1, 0], [1, 0], [2, 1]]


def test_params_are_live_views_into_theta(device):
    net = gpunn.MLP([3, 4, 2], device=device, seed=1)
    W1, _ = net.params[0]
    W1[0, 0] = 42.0
    assert float(net.theta[0]) == 42.0  # W^(1) is stored column by column, as vec() in (6.17)
    W1[1, 0] = 7.0
    assert float(net.theta[1]) == 7.0
    net.theta[...] = 0
    assert float(abs(net.forward(np.ones((2, 3)))).sum()) == 0.0


def test_augmented_views_are_w_with_b_as_one_more_column(device):
    net = gpunn.MLP([5, 4, 3], device=device, seed=2)
    views = gpunn.model.augmented_views(net.theta, net.sizes)
    assert [v.shape for v in views] == [(4, 6), (3, 5)]
    for Wb, (W, b) in zip(views, net.params):
        np.testing.assert_array_equal(
            gpunn.to_numpy(Wb), np.column_stack([gpunn.to_numpy(W), gpunn.to_numpy(b)])
        )
    views[1][:, -1] = 7.0  # writing the last column writes b^(2)
    assert float(net.params[1][1].sum()) == 21.0


def test_same_seed_same_network_other_seed_differs(device):
    a = gpunn.MLP([5, 7, 3], device=device, seed=3)
    b = gpunn.MLP([5, 7, 3], device="cpu", seed=3)
    c = gpunn.MLP([5, 7, 3], device="cpu", seed=4)
    np.testing.assert_array_equal(gpunn.to_numpy(a.theta), b.theta)
    assert not np.array_equal(b.theta, c.theta)


def test_initialisation_scales(rng):
    """He for ReLU hidden layers (variance 2/U_{l-1}), LeCun (1/U_{l-1}) for the rest; b = 0."""
    sizes = [400, 300, 10]
    relu = gpunn.model.param_views(init_theta(sizes, "relu", 0, np.float64), sizes)
    tanh = gpunn.model.param_views(init_theta(sizes, "tanh", 0, np.float64), sizes)
    assert relu[0][0].var() == pytest.approx(2 / 400, rel=0.05)
    assert relu[1][0].var() == pytest.approx(1 / 300, rel=0.1)
    assert tanh[0][0].var() == pytest.approx(1 / 400, rel=0.05)
    assert all(float(abs(b).max()) == 0 for _, b in relu + tanh)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_flows_through(device, dtype):
    net = gpunn.MLP([3, 4, 2], device=device, dtype=dtype)
    Z = net.forward(np.ones((5, 3)))
    _J, grads = gpunn.backprop(net, np.ones((5, 3)), np.array([0, 1, 0, 1, 1]))
    assert Z.dtype == dtype and net.theta.dtype == dtype
    assert all(dW.dtype == dtype and db.dtype == dtype for dW, db in grads)


def test_predict_shapes(device):
    X = np.random.default_rng(0).standard_normal((6, 3))
    assert gpunn.MLP([3, 4], task="classification", device=device).predict(X).shape == (6,)
    assert gpunn.MLP([3, 1], task="regression", device=device).predict(X).shape == (6,)
    assert gpunn.MLP([3, 2], task="regression", device=device).predict(X).shape == (6, 2)
    labels = gpunn.to_numpy(gpunn.MLP([3, 1], task="binary", device=device).predict(X))
    assert set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": [3]}, "sizes must be"),
        ({"sizes": [3, 0, 2]}, "sizes must be"),
        ({"sizes": [3, 2], "activation": "softplus"}, "unknown activation"),
        ({"sizes": [3, 2], "task": "ranking"}, "unknown task"),
        ({"sizes": [3, 2], "task": "binary"}, "one output"),
        ({"sizes": [3, 2], "dtype": "float16"}, "dtype"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpunn.MLP(**kwargs)


def test_bad_inputs_are_refused():
    net = gpunn.MLP([3, 2])
    with pytest.raises(ValueError, match=r"X must have shape \(n, 3\)"):
        net.forward(np.ones((4, 5)))
    with pytest.raises(ValueError, match="labels must be integers"):
        gpunn.backprop(net, np.ones((4, 3)), np.ones(4))
    with pytest.raises(ValueError, match=r"targets must be real values of shape \(4, 2\)"):
        gpunn.backprop(gpunn.MLP([3, 2], task="regression"), np.ones((4, 3)), np.ones(4))


def test_state_round_trip(device):
    a = gpunn.MLP([3, 4, 2], device=device, seed=1)
    b = gpunn.MLP([3, 4, 2], device=device, seed=2)
    b.load_state(a.state())
    np.testing.assert_array_equal(gpunn.to_numpy(a.theta), gpunn.to_numpy(b.theta))
    with pytest.raises(ValueError, match="W1 has shape"):
        gpunn.MLP([3, 5, 2], device=device).load_state(a.state())
