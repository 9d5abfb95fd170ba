"""Training engines: every way gpunn runs its iterations, behind one contract (``base.Engine``), found
by name in one registry.

    engine = make_engine("auto", net, optimizer, data)   # the fastest engine that supports this work
    costs, errors = engine.run(order, first, count, batch_size, lrs)
    cost, error_rate = engine.evaluate(val)

| name    | device | what |
|---------|--------|------|
| `xp`    | any    | the reference: layers.py, losses.py, model.py and optim.py through NumPy/CuPy |
| `blas`  | CPU    | the same arithmetic as prepared BLAS calls, offsets and input scale inside the products |
| `fused` | CUDA   | about ten fused kernels and cuBLAS products per iteration |
| `graph` | CUDA   | the fused iterations replayed as CUDA graphs, a hundred per launch |

"auto" takes, for the network's device, the first engine of ``auto_order`` whose ``supports`` says yes.
An engine asked for by name that cannot run gives one EngineFallbackWarning with its reason, and the
next engine of that order runs.
"""

from __future__ import annotations

import os
import warnings

from ..errors import EngineFallbackWarning
from .base import EVAL_CHUNK, Engine
from .blas import BlasEngine
from .fused import FusedEngine
from .graph import GraphEngine
from .reference import XpEngine

REGISTRY: dict[str, type[Engine]] = {
    cls.name: cls for cls in (XpEngine, BlasEngine, FusedEngine, GraphEngine)
}
ENGINE_NAMES = ("auto", *REGISTRY)

# Fastest first. On CUDA the fused engines become the default once they have passed the whole CUDA
# suite on a real GPU as the default (GPUNN_AUTO_ENGINES=graph,fused,xp runs it that way); until then
# "auto" is the reference there.
AUTO_ORDER = {"cpu": ("blas", "xp"), "cuda": ("xp",)}
FALLBACK_ORDER = {"cpu": ("blas", "xp"), "cuda": ("graph", "fused", "xp")}


def auto_order(device) -> tuple[str, ...]:
    """The engines "auto" tries on ``device``, fastest first (GPUNN_AUTO_ENGINES overrides, e.g.
    "graph,fused,xp" for a GPU check)."""
    override = os.environ.get("GPUNN_AUTO_ENGINES")
    if override:
        names = tuple(name.strip() for name in override.split(",") if name.strip())
        unknown = [name for name in names if name not in REGISTRY]
        if unknown:
            raise ValueError(f"GPUNN_AUTO_ENGINES names unknown engines {unknown}; known: {list(REGISTRY)}")
        return (*names, "xp") if "xp" not in names else names
    return AUTO_ORDER[device.kind]


def make_engine(name: str, net, optimizer, data, comm=None) -> Engine:
    """The engine ``name`` ("auto" or one of REGISTRY) for this work. A named engine that cannot run
    warns once (EngineFallbackWarning: its reason) and the next that can runs; so does an engine that
    fails to build (kernels that do not compile). ValueError for an unknown name."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose from {list(ENGINE_NAMES)}")
    device = net.device
    if name == "auto":
        candidates = auto_order(device)
    else:
        candidates = (name, *(n for n in FALLBACK_ORDER[device.kind] if n != name))
    refused = None
    for candidate in candidates:
        cls = REGISTRY[candidate]
        reason = cls.supports(net, optimizer, data, comm)
        if reason is None:
            try:
                engine = cls(net, optimizer, data, comm)
            except Exception as exc:  # NVRTC or CuPy refusing the kernels: train with the next engine
                lines = str(exc).strip().splitlines()
                reason = (
                    f"the {candidate} engine cannot run here ({lines[0] if lines else type(exc).__name__})"
                )
                refused = refused or reason
                continue
            if refused is not None:
                warnings.warn(
                    f"{refused}; training with the {candidate} engine", EngineFallbackWarning, stacklevel=2
                )
            return engine
        if name != "auto" and refused is None:
            refused = reason
    raise AssertionError("the xp engine supports everything")  # every order ends with xp


__all__ = ["ENGINE_NAMES", "EVAL_CHUNK", "REGISTRY", "Engine", "auto_order", "make_engine"]
