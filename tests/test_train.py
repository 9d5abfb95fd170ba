"""The training loop of Example 6.2 as a library: records, divergence, checkpoints and resuming."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn.data import DeviceDataset, load_idx_dataset
from gpunn.train import (
    Config,
    TrainState,
    TrainStep,
    build,
    fit,
    iterations_per_epoch,
    load_checkpoint,
    restore,
    save_checkpoint,
)

RECORD_KEYS = {"iteration", "epoch", "train_loss", "train_error", "val_loss", "val_error", "lr", "time_s"}


@pytest.fixture
def digits(digits_dir, device):
    train, val = load_idx_dataset(digits_dir)
    return DeviceDataset(train.X, train.y, device), DeviceDataset(val.X, val.y, device)


def small_config(**changes):
    base = {"hidden": [32], "epochs": 3, "batch_size": 64, "lr": 0.3, "eval_every": 7, "seed": 5}
    return Config(**{**base, **changes}).check()


def test_fit_learns_and_reports(digits, device):
    train, val = digits
    cfg = small_config()
    net, opt = build(cfg, train.p, device)
    records, checkpoints = [], []
    state = TrainState()
    assert fit(net, opt, cfg, train, val, state, records.append, lambda s: checkpoints.append(s.iteration))
    per_epoch = iterations_per_epoch(1200, 64)  # 19: 18 full batches and one of 48
    assert per_epoch == 19 and state.iteration == 57 and len(state.batch_loss) == 57
    assert checkpoints == [19, 38, 57]
    assert [r["iteration"] for r in records] == [*range(7, 57, 7), 57]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert records[-1]["val_error"] < 0.05 and records[0]["val_error"] > 0.3  # it learned the digits
    assert all(0 <= r["train_error"] <= 1 and r["time_s"] >= 0 for r in records)
    assert records[1]["train_loss"] == pytest.approx(np.mean(state.batch_loss[7:14]))


def test_every_row_is_visited_once_per_epoch_and_the_last_partial_batch_is_kept(digits, device):
    train, val = digits
    cfg = small_config(epochs=2, eval_every=1000)
    net, opt = build(cfg, train.p, device)
    seen = []
    real = TrainStep(net, opt, train)

    def spy(rows, lr):
        seen.append(gpunn.to_numpy(rows).copy())
        return real(rows, lr)

    fit(net, opt, cfg, train, val, TrainState(), step=spy)
    assert [len(r) for r in seen[:19]] == [64] * 18 + [48]
    for epoch in range(2):
        rows = np.concatenate(seen[19 * epoch : 19 * (epoch + 1)])
        np.testing.assert_array_equal(rows, gpunn.data.epoch_order(cfg.seed, epoch, 1200, 64))


def test_divergence_names_iteration_and_rate(digits, device):
    train, val = digits
    cfg = small_config(lr=1e30, activation="relu")
    net, opt = build(cfg, train.p, device)
    with pytest.raises(gpunn.DivergenceError, match=r"iteration \d+ is (nan|inf).* learning rate 1e\+30"):
        fit(net, opt, cfg, train, val, TrainState())


def test_divergence_keeps_the_last_good_checkpoint(digits, device, tmp_path):
    train, val = digits
    cfg = small_config(epochs=3)
    net, opt = build(cfg, train.p, device)
    real = TrainStep(net, opt, train)
    path = tmp_path / "checkpoint.npz"

    def poisoned(rows, lr):  # the cost turns non-finite in the second epoch
        J, errors = real(rows, lr)
        return (J * np.nan if poisoned.t >= 25 else J), errors

    def count(t):
        poisoned.t = t

    poisoned.t = 0
    with pytest.raises(gpunn.DivergenceError, match="iteration 26 "):
        fit(
            net,
            opt,
            cfg,
            train,
            val,
            TrainState(),
            on_step=count,
            step=poisoned,
            on_checkpoint=lambda s: save_checkpoint(path, net, opt, cfg, s),
        )
    assert load_checkpoint(path)[2].iteration == 19


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_stop_and_resume_ends_where_an_uninterrupted_run_ends(digits, device, tmp_path, momentum):
    train, val = digits
    cfg = small_config(momentum=momentum, lr_schedule="cosine")
    whole, whole_opt = build(cfg, train.p, device)
    whole_state, whole_records = TrainState(), []
    fit(whole, whole_opt, cfg, train, val, whole_state, whole_records.append)

    net, opt = build(cfg, train.p, device)
    path = tmp_path / "checkpoint.npz"
    records = []
    stop_at = iter([False] * 23 + [True])  # stop after iteration 24, mid-epoch and mid-block
    done = fit(
        net,
        opt,
        cfg,
        train,
        val,
        TrainState(),
        records.append,
        lambda s: save_checkpoint(path, net, opt, cfg, s),
        should_stop=lambda: next(stop_at),
    )
    assert not done

    cfg2, arrays, state = load_checkpoint(path)
    assert cfg2 == cfg and state.iteration == 24
    resumed, resumed_opt = build(cfg2, train.p, device)
    restore(resumed, resumed_opt, arrays, path)
    assert fit(resumed, resumed_opt, cfg2, train, val, state, records.append)
    assert state.iteration == whole_state.iteration == 57
    np.testing.assert_allclose(
        gpunn.to_numpy(resumed.theta), gpunn.to_numpy(whole.theta), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(state.batch_loss, whole_state.batch_loss, rtol=1e-5)
    assert [r["iteration"] for r in records] == [r["iteration"] for r in whole_records]
    assert records[3]["train_loss"] == pytest.approx(whole_records[3]["train_loss"], rel=1e-5)


def test_checkpoint_round_trip_and_damage(digits, device, tmp_path):
    train, _ = digits
    cfg = small_config(momentum=0.5)
    net, opt = build(cfg, train.p, device)
    state = TrainState(iteration=2, train_time=1.5, batch_loss=[2.0, 1.0], batch_error=[0.5, 0.25])
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, net, opt, cfg, state)
    cfg2, arrays, state2 = load_checkpoint(path)
    assert cfg2 == cfg and state2 == state
    assert {"W1", "b1", "W2", "b2", "velocity"} <= set(arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary file left

    with pytest.raises(gpunn.CheckpointError, match="does not fit this network"):
        other, other_opt = build(small_config(hidden=[16]), train.p, device)
        restore(other, other_opt, arrays, path)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF
    for damage in (good[: len(good) // 2], b"not a zip", bytes(flipped)):
        path.write_bytes(damage)
        with pytest.raises(gpunn.CheckpointError, match="damaged or not a gpunn checkpoint"):
            load_checkpoint(path)
    np.savez(path, W1=np.zeros(3))  # a valid archive, but not ours
    with pytest.raises(gpunn.CheckpointError, match="damaged or not a gpunn checkpoint"):
        load_checkpoint(path)
    with pytest.raises(gpunn.CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.npz")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs must be"),
        ({"batch_size": -1}, "batch_size must be"),
        ({"hidden": [0]}, "hidden widths"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"activation": "identity"}, "activation"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_config_refuses_impossible_values(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**changes).check()
