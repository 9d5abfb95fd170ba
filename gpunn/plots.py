"""Figures 6.7/6.8: cost and misclassification against iteration, mini-batch (blue) and validation
(red). Drawn headless through matplotlib's Agg canvas; matplotlib is the optional extra ``plot``."""

from __future__ import annotations

from pathlib import Path

import numpy
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .files import write_atomic


def plot_training_curves(path: Path, batch_loss, batch_error, records: list, title: str) -> None:
    """Write the two-panel training figure to ``path`` (PNG) atomically.

    batch_loss/batch_error: per-iteration mini-batch values (iteration 1, 2, …); records: the
    evaluations, each with iteration, val_loss and val_error.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    its = numpy.arange(1, len(batch_loss) + 1)
    val_its = [r["iteration"] for r in records]
    panels = (
        ("cost J", batch_loss, [r["val_loss"] for r in records], 1.0),
        ("misclassification (%)", batch_error, [r["val_error"] for r in records], 100.0),
    )
    for ax, (label, batch, val, scale) in zip(fig.subplots(1, 2), panels):
        batch = numpy.asarray(batch, dtype=float) * scale
        ax.plot(its, batch, color="tab:blue", lw=0.4, alpha=0.7, label="training mini-batch")
        ax.plot(val_its, numpy.asarray(val, dtype=float) * scale, color="tab:red", lw=1.6, label="validation")
        if batch.size:
            top = numpy.percentile(batch, 99) * 1.15
            ax.set_ylim(0, max(top, 1e-3 * scale))
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    fig.suptitle(title)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
