"""Cost functions of the last layer's output Z^(L): each returns the cost J and dZ^(L) = ∂J/∂Z^(L).

Normalisation, the same for all three: J is the *mean* over the n_b data points of the mini-batch
(6.18), never also over outputs or classes, and dZ^(L) is the gradient of that mean, so it carries the
factor 1/n_b that Algorithm 6.1 applies in lines 18–19. J comes back as a 0-d array on the device of Z
(``float(J)`` fetches it); dZ has the shape of Z and may be written into the optional buffer ``dZ``.
``scale`` multiplies dZ^(L) (and so, through (6.27), every gradient) at no extra cost; the training
step uses it to fold the learning rate into the gradient.
"""

from __future__ import annotations

from .backend import get_array_module


def _rows(xp, n, rows):
    return xp.arange(n) if rows is None else rows


def softmax_cross_entropy(Z, y, dZ=None, rows=None, scale=1.0, grad=True):
    """M-class classification with integer labels, through softmax (6.15).

    J = (1/n_b) Σ_i ( −Z_{i,y_i} + ln Σ_j e^{Z_ij} )         (6.20; Algorithm 6.1 line 12)
    dZ_ij = ( softmax(Z_i)_j − 1{y_i = j} ) / n_b          (6.26b; line 13)

    The log-sum-exp subtracts each row's maximum first, so logits of any size stay finite.
    Z (n_b, M) logits; y (n_b,) integer labels in 0…M−1; ``rows`` an optional cached arange(n_b);
    ``grad=False`` returns (J, None) and skips dZ.
    """
    xp = get_array_module(Z)
    n, M = Z.shape
    picked = _rows(xp, n, rows) * M + y  # the entries (i, y_i) of the flattened rows
    S = xp.subtract(Z, Z.max(axis=1, keepdims=True), out=dZ)  # every S_ij <= 0
    flat = S.reshape(-1)
    S_y = flat.take(picked)
    xp.exp(S, out=S)
    total = S.sum(axis=1, keepdims=True)  # in [1, M]: its log is safe
    J = (xp.log(total).sum() - S_y.sum()) / n
    if not grad:  # the cost alone (evaluation); dZ then holds scratch
        return J, None
    S *= xp.divide(scale / n, total, out=total)  # softmax and the 1/n_b in one pass
    flat[picked] -= scale / n
    return J, S


def squared_error(Z, y, dZ=None, rows=None, scale=1.0, grad=True):
    """Regression: J = (1/n_b) Σ_i ‖y_i − Z_i‖²   (6.19; Algorithm 6.1 line 9)
    dZ = −2 (y − Z) / n_b                                (6.26a; line 10)

    Z (n_b, M); y (n_b,) when M = 1, else (n_b, M).
    """
    xp = get_array_module(Z)
    n = Z.shape[0]
    R = xp.subtract(Z, y.reshape(Z.shape), out=dZ)
    J = xp.vdot(R, R) / n
    R *= 2.0 * scale / n
    return J, R


def sigmoid_cross_entropy(Z, y, dZ=None, rows=None, scale=1.0, grad=True):
    """Two classes, with the logistic sigmoid g = σ(z) as the probability of class 1.

    J = (1/n_b) Σ_i ( ln(1 + e^{z_i}) − y_i z_i ) = (1/n_b) Σ_i −ln g(±z_i)
    dZ = ( σ(Z) − y ) / n_b

    ln(1 + e^z) is evaluated as max(z, 0) + ln(1 + e^{−|z|}), finite for any z.
    Z (n_b, 1) logits; y (n_b,) labels in {0, 1}.
    """
    xp = get_array_module(Z)
    n = Z.shape[0]
    y = y.reshape(Z.shape)
    softplus = xp.maximum(Z, 0) + xp.log1p(xp.exp(-xp.abs(Z)))
    J = (softplus.sum() - xp.vdot(y, Z)) / n
    G = xp.multiply(Z, 0.5, out=dZ)  # σ(z) = (1 + tanh(z/2))/2
    xp.tanh(G, out=G)
    G += 1
    G *= 0.5
    G -= y
    G *= scale / n
    return J, G


LOSSES = {
    "classification": softmax_cross_entropy,
    "regression": squared_error,
    "binary": sigmoid_cross_entropy,
}


def count_errors(Z, y, task: str):
    """Number of misclassified rows of the mini-batch as a 0-d device array (None for regression)."""
    if task == "classification":
        return get_array_module(Z).count_nonzero(Z.argmax(axis=1) != y)
    if task == "binary":
        return ((Z[:, 0] > 0) != (y > 0.5)).sum()
    return None
