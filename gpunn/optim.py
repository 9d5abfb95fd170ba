"""Optimizers, each an immutable description of its hyperparameters plus the reference update of θ,
and the learning-rate schedules.

    opt = SGD(net, lr=0.5, momentum=0.9)      # or Adam(net, lr=1e-3)
    opt.hyper                                 # SGDHyper(lr=0.5, momentum=0.9, weight_decay=0.0): frozen
    opt.step(grads)                           # θ ← θ − γ d, the reference update (6.23)

The description (``opt.hyper``) is what a checkpoint records and what an engine checks: an engine
implements the descriptions it knows, field by field, and refuses any other through its ``supports``
(see ``unsupported``), so a new option or optimizer can never be silently ignored by a fast path.

SGD, (6.21)/(6.23):   θ ← θ − γ d,  d = ∇J + λ W            weight decay λ on the weights W only
                                    v ← μ v + d, d = v      momentum μ (PyTorch's convention)
Adam (Kingma & Ba, 2015), with PyTorch's defaults and its coupled weight decay (on W only, as SGD):
    g = ∇J + λ W,  m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²,  t ← t + 1
    θ ← θ − γ m̂ / (√v̂ + ε),  m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy

from .model import MLP, flatten, weight_mask

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


@dataclass(frozen=True)
class SGDHyper:
    """SGD's hyperparameters: learning rate γ, momentum μ in [0, 1), weight decay λ >= 0."""

    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0

    def check(self) -> None:
        _check_lr(self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        _check_decay(self.weight_decay)


@dataclass(frozen=True)
class AdamHyper:
    """Adam's hyperparameters (PyTorch's defaults): γ, β₁, β₂ in [0, 1), ε > 0, weight decay λ >= 0."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def check(self) -> None:
        _check_lr(self.lr)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0; got {self.eps}")
        _check_decay(self.weight_decay)


def _check_lr(lr) -> None:
    try:
        ok = math.isfinite(lr) and lr > 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")


def _check_decay(weight_decay) -> None:
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be finite and >= 0; got {weight_decay!r}")


def unsupported(hyper, implemented: dict[type, set[str]]) -> str | None:
    """Why an engine that implements, for each description type, the fields ``implemented[type]`` cannot
    run ``hyper``: an optimizer it does not know, or a field it does not implement set away from its
    default. None where it can."""
    fields = implemented.get(type(hyper))
    if fields is None:
        return f"no {OPTIMIZER_NAMES.get(type(hyper), type(hyper).__name__)} update"
    default = type(hyper)()
    unknown = [
        f"{f.name}={getattr(hyper, f.name)}"
        for f in dataclasses.fields(hyper)
        if f.name not in fields and getattr(hyper, f.name) != getattr(default, f.name)
    ]
    return f"no update with {', '.join(unknown)}" if unknown else None


class Optimizer:
    """An update rule for the parameters of ``net``: ``hyper`` (its frozen description), its state
    arrays (θ-shaped, on the network's device), and the reference ``step``."""

    name = "optimizer"
    Hyper: type = SGDHyper

    def __init__(self, net: MLP, **hyper):
        self.net = net
        self.hyper = self.Hyper(**hyper)
        self.hyper.check()
        self.slots: dict = {}  # name -> θ-shaped device array: what a checkpoint keeps
        self._decay = None  # λ · (1 at the weights, 0 at the offsets), θ-shaped, made on first use
        self._scratch = net.xp.empty_like(net.theta)

    @property
    def lr(self) -> float:
        return self.hyper.lr

    def describe(self) -> dict:
        """{"name": …, and every hyperparameter}: JSON for checkpoints and run configs."""
        return {"name": self.name, **dataclasses.asdict(self.hyper)}

    def _gradient(self, grads):
        """The flat gradient d = ∇J + λ W (a new array only when λ > 0)."""
        d = flatten(grads) if isinstance(grads, (list, tuple)) else grads
        if not self.hyper.weight_decay:
            return d
        if self._decay is None:
            mask = weight_mask(self.net.sizes, self.net.dtype) * self.hyper.weight_decay
            self._decay = self.net.device.asarray(mask)
        return d + self._decay * self.net.theta

    def step(self, grads, lr=None) -> None:
        """One update of θ in place from ``grads`` ([(dW1, db1), …] as backprop returns them, or one
        θ-shaped vector); ``lr`` (a number) overrides γ for this step (the schedule's γ_t)."""
        raise NotImplementedError

    def state(self) -> dict:
        """The arrays a checkpoint must keep to continue bit for bit (device arrays; copy to save)."""
        return dict(self.slots)

    def load_state(self, state: dict) -> None:
        """Copy saved state arrays into place, checking names and shapes (KeyError, ValueError)."""
        for name, live in self.slots.items():
            if name not in state:
                raise KeyError(f"missing {name}")
            value = self.net.device.asarray(state[name], dtype=live.dtype)
            if value.shape != live.shape:
                raise ValueError(f"{name} has shape {value.shape}, needs {live.shape}")
            live[...] = value


class SGD(Optimizer):
    """SGD with optional momentum and weight decay, over the flat θ in one pass (see the module)."""

    name = "sgd"
    Hyper = SGDHyper

    def __init__(self, net: MLP, lr: float = 0.5, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(net, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if momentum:
            self.slots["velocity"] = net.xp.zeros_like(net.theta)

    @property
    def momentum(self) -> float:
        return self.hyper.momentum

    @property
    def weight_decay(self) -> float:
        return self.hyper.weight_decay

    def step(self, grads, lr=None) -> None:
        d = self._gradient(grads)
        if self.hyper.momentum:
            v = self.slots["velocity"]
            v *= self.hyper.momentum
            v += d
            d = v
        self.net.theta -= self.net.xp.multiply(d, self.hyper.lr if lr is None else lr, out=self._scratch)


class Adam(Optimizer):
    """Adam with bias correction (see the module); state: m, v (θ-shaped) and the step count t."""

    name = "adam"
    Hyper = AdamHyper

    def __init__(
        self,
        net: MLP,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(net, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        self.slots.update(adam_m=net.xp.zeros_like(net.theta), adam_v=net.xp.zeros_like(net.theta))
        self.t = 0  # updates made so far

    def step(self, grads, lr=None) -> None:
        """θ ← θ − γ m̂ / (√v̂ + ε), arranged as PyTorch does:
        θ ← θ − (γ / (1 − β₁ᵗ)) m / (√v / √(1 − β₂ᵗ) + ε)."""
        h, xp, s = self.hyper, self.net.xp, self._scratch
        g = self._gradient(grads)
        m, v = self.slots["adam_m"], self.slots["adam_v"]
        self.t += 1
        m *= h.beta1
        m += xp.multiply(g, 1 - h.beta1, out=s)
        v *= h.beta2
        xp.multiply(g, g, out=s)
        s *= 1 - h.beta2
        v += s
        xp.sqrt(v, out=s)
        s /= math.sqrt(1 - h.beta2**self.t)
        s += h.eps
        xp.divide(m, s, out=s)
        s *= (h.lr if lr is None else lr) / (1 - h.beta1**self.t)
        self.net.theta -= s

    def state(self) -> dict:
        return {**self.slots, "adam_t": numpy.asarray(self.t, dtype=numpy.int64)}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if "adam_t" not in state:
            raise KeyError("missing adam_t")
        t = numpy.asarray(state["adam_t"])
        if t.shape != () or t.dtype.kind not in "iu" or int(t) < 0:
            raise ValueError(f"adam_t must be a whole number >= 0; got {t!r}")
        self.t = int(t)


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam)}
OPTIMIZER_NAMES = {cls.Hyper: cls.name for cls in (SGD, Adam)}


def make_optimizer(net: MLP, name: str = "sgd", momentum: float = 0.0, **hyper) -> Optimizer:
    """The optimizer called ``name`` ("sgd" or "adam") for ``net`` with these hyperparameters;
    ValueError for anything else, momentum (an SGD option) given to another optimizer among them."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")
    if name == "sgd":
        hyper["momentum"] = momentum
    elif momentum:
        raise ValueError(f"momentum is an SGD option; {name!r} has none")
    return OPTIMIZERS[name](net, **hyper)
