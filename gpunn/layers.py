"""Dense layers and activation functions, in the lecture's notation (rows are data points).

A layer l holds W^(l) of shape (U_l, U_{l-1}) and b^(l) of shape (U_l,). For a mini-batch Q^(l-1) of
shape (n_b, U_{l-1}) it computes

    Z^(l) = Q^(l-1) W^(l)ᵀ + b^(l)ᵀ      (6.14, Algorithm 6.1 line 4)     (n_b, U_l)
    Q^(l) = h(Z^(l))                     (Algorithm 6.1 line 5)            (n_b, U_l)

and, going back, from dQ^(l) = ∂J/∂Q^(l):

    dZ^(l)   = dQ^(l) ⊙ h'(Z^(l))        (6.27a, line 16)
    dQ^(l-1) = dZ^(l) W^(l)              (6.27b, line 17)
    dW^(l)   = dZ^(l)ᵀ Q^(l-1)           (6.27c, line 18)
    db^(l)   = Σ_i dZ^(l)_i              (6.27d, line 19)

gpunn's dZ^(L) already carries the 1/n_b of the mean cost (see losses.py), so lines 18–19 need no
further 1/n_b: every dZ^(l) here is exactly ∇_{Z^(l)} J.

``forward`` takes optional output buffers (without them it allocates); ``backward`` writes into the
buffers it is given (model.Workspace holds them), so no array of the mini-batch's size is allocated per
step. NumPy still makes a few small temporaries (the ReLU mask Z > 0, for one).
"""

from __future__ import annotations


class Activation:
    """An element-wise h with its derivative, written through what forward has cached.

    ``backward`` receives Z and Q = h(Z) and uses whichever gives h'(Z) without evaluating h again:
    ReLU reads the sign of Z, the logistic sigmoid and tanh read Q. Both survive h running in place
    (Z and Q one array, as in a Workspace): max(0, z) keeps the sign that matters.
    """

    name = "identity"

    def forward(self, xp, Z, out=None):
        """Q = h(Z); for the identity, Q is Z itself (no copy)."""
        if out is None or out is Z:
            return Z
        xp.copyto(out, Z)
        return out

    def backward(self, xp, dQ, Z, Q, out=None):
        """dZ = dQ ⊙ h'(Z) (6.27a). ``out`` may be ``dQ`` itself."""
        return self.forward(xp, dQ, out)

    def __repr__(self) -> str:
        return self.name


class ReLU(Activation):
    """h(z) = max(0, z); h'(z) = 1 for z > 0, else 0."""

    name = "relu"

    def forward(self, xp, Z, out=None):
        return xp.maximum(Z, 0, out=out)

    def backward(self, xp, dQ, Z, Q, out=None):
        return xp.multiply(dQ, Z > 0, out=out)


class Sigmoid(Activation):
    """The logistic function h(z) = 1/(1 + e^{-z}); h'(z) = h(z)(1 − h(z)).

    Evaluated as (1 + tanh(z/2))/2, which never overflows.
    """

    name = "sigmoid"

    def forward(self, xp, Z, out=None):
        Q = xp.multiply(Z, 0.5, out=out)
        xp.tanh(Q, out=Q)
        Q += 1
        Q *= 0.5
        return Q

    def backward(self, xp, dQ, Z, Q, out=None):
        return xp.multiply(dQ, Q * (1 - Q), out=out)


class Tanh(Activation):
    """h(z) = tanh(z); h'(z) = 1 − tanh²(z)."""

    name = "tanh"

    def forward(self, xp, Z, out=None):
        return xp.tanh(Z, out=out)

    def backward(self, xp, dQ, Z, Q, out=None):
        return xp.multiply(dQ, 1 - Q * Q, out=out)


ACTIVATIONS = {a.name: a for a in (ReLU(), Sigmoid(), Tanh(), Activation())}


def get_activation(name: str | Activation) -> Activation:
    if isinstance(name, Activation):
        return name
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


class Dense:
    """Layer l: the live parameters W (U_l, U_{l-1}) and b (U_l,), an activation, and its cache.

    ``forward`` caches exactly what ``backward`` needs (Q^(l-1), Z^(l), Q^(l)); ``backward`` never
    re-evaluates the forward pass.
    """

    def __init__(self, W, b, activation: Activation, xp):
        self.W, self.b, self.activation, self.xp = W, b, activation, xp
        self.Q_prev = self.Z = self.Q = None

    def forward(self, Q_prev, Z=None, Q=None):
        """Q_prev (n_b, U_{l-1}) -> Q (n_b, U_l); ``Z``/``Q`` are optional output buffers."""
        xp = self.xp
        Z = xp.matmul(Q_prev, self.W.T, out=Z)  # line 4; BLAS reads Wᵀ without a copy
        Z += self.b
        Q = self.activation.forward(xp, Z, out=Q)  # line 5 (the identity for layer L)
        self.Q_prev, self.Z, self.Q = Q_prev, Z, Q
        return Q

    def backward(self, dQ, dW, db, dQ_prev=None) -> None:
        """From dQ^(l) (n_b, U_l), which becomes dZ^(l) in place (6.27a), fill dW^(l) (U_l, U_{l-1})
        by (6.27c), db^(l) (U_l,) by (6.27d) and, when a buffer is given, dQ^(l-1) (n_b, U_{l-1}) by
        (6.27b); layer 1 gets none, since the gradient with respect to the data is not needed."""
        xp = self.xp
        dZ = self.activation.backward(xp, dQ, self.Z, self.Q, out=dQ)
        if dQ_prev is not None:
            xp.matmul(dZ, self.W, out=dQ_prev)  # with the W of this step, before any update
        xp.matmul(dZ.T, self.Q_prev, out=dW)
        xp.sum(dZ, axis=0, out=db)
