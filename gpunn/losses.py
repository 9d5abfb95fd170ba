"""Cost functions of the last layer's output Z^(L): each returns the cost J and dZ^(L) = ∂J/∂Z^(L).

Normalisation, the same for all three: J is the *mean* over the n_b data points of the mini-batch
(6.18), never also over outputs or classes, and dZ^(L) is the gradient of that mean, so it carries the
factor 1/n_b that Algorithm 6.1 applies in lines 18–19. J comes back as a 0-d array on the device of Z
(``float(J)`` fetches it), summed in float64.

Every function here is the one home of its formula; the CPU engine calls these very functions and the
CUDA kernels (engines/kernels.cu) are their only other copy. Common arguments:

    Z      (n_b, M): one data point per row, as everywhere in gpunn; with ``axis=0`` its transpose
           (M, n_b), the layout the CPU engine keeps (NumPy reduces along contiguous rows faster)
    dZ     optional output buffer of Z's shape and layout; it may be Z itself (then Z is overwritten)
    scale  multiplies dZ^(L) (and so, through (6.27), every gradient) at no extra cost
    grad   False: the cost alone (evaluation); returns (J, None)
    work   optional dict in which the function keeps its small per-batch buffers between calls
"""

from __future__ import annotations

import numpy

from .backend import get_array_module


def _buffer(xp, work, name, shape, dtype):
    """work[name] (allocated on first use), or a fresh array where there is no ``work``."""
    if work is None:
        return xp.empty(shape, dtype=dtype)
    array = work.get(name)
    if array is None or array.shape != shape:
        array = work[name] = xp.empty(shape, dtype=dtype)
    return array


def _offsets(xp, work, n: int, step: int):
    """[0, step, 2·step, …] (n,): where each point's entries start in the flattened Z."""
    key = ("offsets", n, step)
    if work is None or key not in work:
        offsets = xp.arange(0, n * step, step)
        if work is None:
            return offsets
        work[key] = offsets
    return work[key]


def _points_and_outputs(Z, axis: int) -> tuple[int, int]:
    return (Z.shape[0], Z.shape[1]) if axis % 2 == 1 else (Z.shape[1], Z.shape[0])


def _reduced_shape(Z, axis: int) -> tuple[int, int]:
    return (Z.shape[0], 1) if axis % 2 == 1 else (1, Z.shape[1])


def _targets_like(y, Z, axis: int):
    """y (n_b,) or (n_b, M) as an array of Z's shape and layout (a view)."""
    n, M = _points_and_outputs(Z, axis)
    Y = y.reshape(n, M)
    return Y if axis % 2 == 1 else Y.T


def softmax_cross_entropy(Z, y, dZ=None, scale=1.0, grad=True, axis=-1, work=None):
    """M-class classification with integer labels y (n_b,) in 0…M−1, through softmax (6.15).

    J = (1/n_b) Σ_i ( −Z_{i,y_i} + ln Σ_j e^{Z_ij} )         (6.20; Algorithm 6.1 line 12)
    dZ_ij = ( softmax(Z_i)_j − 1{y_i = j} ) / n_b          (6.26b; line 13)

    The log-sum-exp subtracts each point's largest logit first, so logits of any size stay finite.
    """
    xp = get_array_module(Z)
    n, M = _points_and_outputs(Z, axis)
    by_rows = axis % 2 == 1
    # the flat index of each entry (i, y_i): i·M + y_i in rows, y_i·n + i transposed
    picked = xp.multiply(y, 1 if by_rows else n, out=_buffer(xp, work, "picked", (n,), numpy.intp))
    picked += _offsets(xp, work, n, M if by_rows else 1)
    top = xp.max(Z, axis=axis, keepdims=True, out=_buffer(xp, work, "top", _reduced_shape(Z, axis), Z.dtype))
    S = xp.subtract(Z, top, out=dZ)  # every S_ij <= 0
    if not S.flags.c_contiguous:  # flat below must be a view of S
        raise ValueError("dZ must be a C-contiguous buffer")
    flat = S.reshape(-1)
    S_y = flat.take(picked).sum(dtype=numpy.float64)
    xp.exp(S, out=S)
    total = xp.sum(S, axis=axis, keepdims=True, out=_buffer(xp, work, "total", top.shape, Z.dtype))
    J = (xp.log(total).sum(dtype=numpy.float64) - S_y) / n  # each total in [1, M]: its log is safe
    if not grad:  # dZ then holds scratch
        return J, None
    S *= xp.divide(scale / n, total, out=total)  # softmax and the 1/n_b in one pass
    flat[picked] -= scale / n
    return J, S


def squared_error(Z, y, dZ=None, scale=1.0, grad=True, axis=-1, work=None):
    """Regression with targets y (n_b,) when M = 1, else (n_b, M):

    J = (1/n_b) Σ_i ‖y_i − Z_i‖²        (6.19; Algorithm 6.1 line 9)
    dZ = −2 (y − Z) / n_b                (6.26a; line 10)
    """
    xp = get_array_module(Z)
    n, _ = _points_and_outputs(Z, axis)
    R = xp.subtract(Z, _targets_like(y, Z, axis), out=dZ)
    J = xp.vdot(R, R).astype(numpy.float64) / n
    if not grad:
        return J, None
    R *= 2.0 * scale / n
    return J, R


def sigmoid_cross_entropy(Z, y, dZ=None, scale=1.0, grad=True, axis=-1, work=None):
    """Two classes with one logit per point, Z (n_b, 1), the logistic sigmoid σ(z) being the probability
    of class 1, and labels y (n_b,) in {0, 1}:

    J = (1/n_b) Σ_i ( ln(1 + e^{z_i}) − y_i z_i ) = (1/n_b) Σ_i −ln σ(±z_i)
    dZ = ( σ(Z) − y ) / n_b

    ln(1 + e^z) is evaluated as max(z, 0) + ln(1 + e^{−|z|}), and σ(z) as (1 + tanh(z/2))/2: finite
    for any z.
    """
    xp = get_array_module(Z)
    n, _ = _points_and_outputs(Z, axis)
    Y = _targets_like(y, Z, axis)
    softplus = xp.maximum(Z, 0) + xp.log1p(xp.exp(-xp.abs(Z)))
    J = (softplus.sum(dtype=numpy.float64) - xp.vdot(Y, Z).astype(numpy.float64)) / n
    if not grad:
        return J, None
    G = xp.multiply(Z, 0.5, out=dZ)
    xp.tanh(G, out=G)
    G += 1
    G *= 0.5
    G -= Y
    G *= scale / n
    return J, G


LOSSES = {
    "classification": softmax_cross_entropy,
    "regression": squared_error,
    "binary": sigmoid_cross_entropy,
}


def count_errors(Z, y, task: str, axis=-1, work=None):
    """Misclassified points of the mini-batch as a 0-d device array (None for regression): the first
    largest logit is not y_i's (classification), or the logit's sign is not the label's (binary)."""
    xp = get_array_module(Z)
    n, _ = _points_and_outputs(Z, axis)
    if task == "classification":
        guess = xp.argmax(Z, axis=axis, out=_buffer(xp, work, "guess", (n,), numpy.intp))
        return xp.count_nonzero(xp.not_equal(guess, y, out=_buffer(xp, work, "wrong", (n,), bool)))
    if task == "binary":
        return xp.count_nonzero((Z.reshape(-1) > 0) != (y.reshape(-1) > 0.5))
    return None
