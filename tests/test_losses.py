"""The cost functions: values, their normalisation (the mean over the mini-batch), and stability."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn import to_numpy as _host
from gpunn.losses import count_errors, sigmoid_cross_entropy, softmax_cross_entropy, squared_error


def lse64(Z):
    Z = np.asarray(Z, dtype=np.float64)
    m = Z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(Z - m).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_finite_for_huge_logits(device, dtype):
    Z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0], [3.0, 1e4, 1e4], [-1e4, -1e4, -1e4]])
    y = np.array([1, 1, 0, 2])
    J, dZ = softmax_cross_entropy(device.asarray(Z, dtype), device.asarray(y))
    expected = np.mean(lse64(Z) - Z[np.arange(4), y])  # 2e4/4 + 1e4/4 + …: large but exact
    assert np.isfinite(float(J)) and np.all(np.isfinite(_host(dZ)))
    assert float(J) == pytest.approx(expected, rel=1e-6 if dtype == np.float64 else 1e-5)


def test_cross_entropy_value_and_gradient(device, rng):
    Z, y = rng.standard_normal((6, 4)) * 3, rng.integers(0, 4, 6)
    J, dZ = softmax_cross_entropy(device.asarray(Z), device.asarray(y))
    P = np.exp(Z - lse64(Z)[:, None])
    assert float(J) == pytest.approx(np.mean(lse64(Z) - Z[np.arange(6), y]), rel=1e-12)
    np.testing.assert_allclose(_host(dZ), (P - np.eye(4)[y]) / 6, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(_host(dZ).sum(axis=1), 0, atol=1e-15)  # rows of softmax − onehot


def test_normalisation_is_the_mean_over_rows(device, rng):
    """Repeating the mini-batch changes neither J nor the gradient with respect to θ: dZ halves."""
    Z, y, T = rng.standard_normal((5, 3)), rng.integers(0, 3, 5), rng.standard_normal((5, 3))
    for loss, target in ((softmax_cross_entropy, y), (squared_error, T), (sigmoid_cross_entropy, y)):
        ZZ = Z[:, :1] if loss is sigmoid_cross_entropy else Z
        t = target.astype(float) if loss is sigmoid_cross_entropy else target
        J1, d1 = loss(device.asarray(ZZ), device.asarray(t))
        J2, d2 = loss(device.asarray(np.concatenate([ZZ, ZZ])), device.asarray(np.concatenate([t, t])))
        assert float(J2) == pytest.approx(float(J1), rel=1e-12)
        np.testing.assert_allclose(_host(d2)[:5] * 2, _host(d1), rtol=1e-12)


def test_squared_error_matches_the_lecture(device, rng):
    Z, y = rng.standard_normal((8, 1)), rng.standard_normal(8)
    J, dZ = squared_error(device.asarray(Z), device.asarray(y))
    assert float(J) == pytest.approx(np.mean((y - Z[:, 0]) ** 2), rel=1e-12)  # (6.19), mean
    np.testing.assert_allclose(_host(dZ)[:, 0], -2 * (y - Z[:, 0]) / 8, rtol=1e-12)  # (6.26a) / n_b
    Z2, Y2 = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    J2, _ = squared_error(device.asarray(Z2), device.asarray(Y2))
    assert float(J2) == pytest.approx(np.sum((Y2 - Z2) ** 2) / 4, rel=1e-12)  # mean over rows only


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_cross_entropy_is_stable(device, dtype):
    Z = np.array([[1e4], [-1e4], [0.0], [30.0], [-30.0]])
    y = np.array([0.0, 1.0, 1.0, 1.0, 0.0])
    J, dZ = sigmoid_cross_entropy(device.asarray(Z, dtype), device.asarray(y, dtype))
    per_row = np.logaddexp(0, Z[:, 0]) - y * Z[:, 0]  # ln(1 + e^z) − y z
    assert float(J) == pytest.approx(per_row.mean(), rel=1e-5)
    sig = 0.5 * (1 + np.tanh(Z[:, 0] / 2))
    np.testing.assert_allclose(_host(dZ)[:, 0], (sig - y) / 5, rtol=1e-5, atol=1e-12)


def test_count_errors(device):
    Z = device.asarray(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]))
    assert int(count_errors(Z, device.asarray(np.array([1, 1, 1])), "classification")) == 1
    logits = device.asarray(np.array([[2.0], [-1.0], [0.5]]))
    assert int(count_errors(logits, device.asarray(np.array([1.0, 1.0, 0.0])), "binary")) == 2
    assert count_errors(Z, None, "regression") is None
