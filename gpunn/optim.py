"""Stochastic gradient descent (6.21)/(6.23), updating the network's parameters in place.

    θ ← θ − γ d,   with d = ∇J                    plain SGD, (6.23a–b)
                   d = g with g = ∇J + λ W        weight decay λ (on the weights W only, not on b)
                   v ← μ v + g,  d = v            momentum μ (PyTorch's convention, no dampening)

and the learning-rate schedules that pick γ for each iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import MLP, flatten, param_views

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """γ_t for iteration t = 0, 1, …, total − 1 (the step that makes iteration t + 1).

    constant  γ_t = γ
    step      γ_t = γ · gamma^⌊t / step_size⌋
    cosine    γ_t = γ · (1 + cos(π t / total)) / 2
    """

    lr: float
    kind: str = "constant"
    total: int = 1
    step_size: int = 1
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose from {list(SCHEDULES)}")

    def __call__(self, t: int) -> float:
        if self.kind == "step":
            return self.lr * self.gamma ** (t // max(1, self.step_size))
        if self.kind == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, self.total) / max(1, self.total)))
        return self.lr


class SGD:
    """SGD with optional momentum and weight decay for the parameters of ``net``, in one flat pass.

    ``step(grads)`` takes the gradients as ``backprop`` returns them ([(dW1, db1), …]) or as one flat
    vector laid out like ``net.theta`` (6.17), which is what the fused training step produces.
    """

    def __init__(self, net: MLP, lr: float = 0.5, momentum: float = 0.0, weight_decay: float = 0.0):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight decay must be >= 0; got {weight_decay}")
        self.net, self.lr, self.momentum, self.weight_decay = net, lr, momentum, weight_decay
        self._scratch = net.xp.empty_like(net.theta)
        self.velocity = net.xp.zeros_like(net.theta) if momentum else None

    def step(self, grads, lr=None) -> None:
        """θ ← θ − γ d (see the module docstring); ``lr`` (a number or 0-d array) overrides γ."""
        net, xp, scratch = self.net, self.net.xp, self._scratch
        d = flatten(grads) if isinstance(grads, (list, tuple)) else grads
        if self.weight_decay:
            xp.copyto(scratch, d)
            for (W, _), (sW, _) in zip(net.params, param_views(scratch, net.sizes)):
                sW += self.weight_decay * W
            d = scratch
        if self.momentum:
            self.velocity *= self.momentum
            self.velocity += d
            d = self.velocity
        xp.multiply(d, self.lr if lr is None else lr, out=scratch)
        net.theta -= scratch

    def state(self) -> dict:
        """What a checkpoint must keep: the velocity, when there is momentum."""
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state: dict) -> None:
        if self.velocity is not None:
            if "velocity" not in state:
                raise KeyError("missing velocity")
            v = self.net.device.asarray(state["velocity"], dtype=self.net.dtype)
            if v.shape != self.velocity.shape:
                raise ValueError(f"velocity has shape {v.shape}, needs {self.velocity.shape}")
            self.velocity[...] = v
