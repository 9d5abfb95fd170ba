"""Example 6.2 on the real MNIST (from $GPUNN_DATA_DIR): the lecture's recipe reaches its errors."""

from __future__ import annotations

import pytest

from gpunn.data import load_idx_dataset
from gpunn.train import Config

pytestmark = [pytest.mark.mnist, pytest.mark.slow]


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_idx_dataset(mnist_dir)


@pytest.mark.parametrize(
    ("hidden", "bar"),
    [([], 0.085), ([200], 0.022)],  # the lecture reports ≈ 8 % and ≈ 2 % (Figures 6.7 and 6.8)
    ids=["logistic-regression", "784-200-10-relu"],
)
def test_lecture_recipe(mnist, device, hidden, bar):
    train, val = mnist
    assert train.X.shape == (60000, 784) and val.X.shape == (10000, 784)
    cfg = Config(hidden=hidden)  # γ = 0.5, n_b = 100, 15 epochs = 9000 iterations, evaluation every 100
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.eval_every) == (0.5, 100, 15, 100)
    _, history = cfg.train(train, val, device)
    records = history.records
    assert history.iteration == 9000 and len(records) == 90
    assert records[-1]["val_error"] <= bar
    assert records[0]["val_error"] > records[-1]["val_error"]  # and it got there by learning
