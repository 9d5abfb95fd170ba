"""Progress of a training run on stderr: tqdm bars for the epochs and the iterations of the current
epoch, with the latest training cost and error and the validation error (a ``train.Callback``)."""

from __future__ import annotations

from .train import Callback


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


class ProgressBars(Callback):
    """Two bars: epochs done, and iterations of the current epoch; the latest evaluation beside them."""

    per_iteration = False  # the bars may move a stretch of iterations at a time

    def __init__(self, total: int, per_epoch: int, start: int):
        from tqdm import tqdm

        self.per_epoch = per_epoch
        epochs = -(-total // per_epoch)
        self.epochs = tqdm(total=epochs, initial=start // per_epoch, desc="epochs", position=0)
        self.iters = tqdm(
            total=per_epoch, initial=start % per_epoch, desc="iterations", position=1, leave=False
        )

    def on_step(self, iteration: int) -> None:
        self.iters.update()
        if iteration % self.per_epoch == 0:
            self.epochs.update()
            self.iters.reset()

    def on_eval(self, r: dict) -> None:
        shown = {"cost": f"{r['train_loss']:.4f}"}
        if r["train_error"] is not None:
            shown["error"] = _percent(r["train_error"])
        if r["val_loss"] is not None:
            shown["val_cost"] = f"{r['val_loss']:.4f}"
        if r["val_error"] is not None:
            shown["val_error"] = _percent(r["val_error"])
        self.epochs.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.iters.close()
        self.epochs.close()
