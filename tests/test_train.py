"""The training loop of Example 6.2 as a library: records, divergence, checkpoints and resuming."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn.checkpoint import load_checkpoint, save_checkpoint
from gpunn.data import DeviceDataset, load_idx_dataset
from gpunn.engines.reference import XpEngine
from gpunn.train import Callback, Config, History, iterations_per_epoch

RECORD_KEYS = {"iteration", "epoch", "train_loss", "train_error", "val_loss", "val_error", "lr", "time_s"}
OPTIONS = {"epochs": 3, "batch_size": 64, "lr": 0.3, "eval_every": 7, "seed": 5, "progress": False}


@pytest.fixture
def digits(digits_dir, device):
    train, val = load_idx_dataset(digits_dir)
    return train, val


def network(device, **kwargs):
    return gpunn.MLP([784, 32, 10], device=device, seed=5, **kwargs)


def fit(net, digits, **changes):
    train, val = digits
    options = {**OPTIONS, **changes}
    return gpunn.fit(net, train.X, train.y, validation_data=(val.X, val.y), input_scale=1 / 255, **options)


class Recorder(Callback):
    def __init__(self, stop_after=None):
        self.steps, self.checkpoints, self.stop_after = [], [], stop_after

    def on_step(self, iteration):
        self.steps.append(iteration)

    def on_checkpoint(self, history):
        self.checkpoints.append(history.iteration)

    def should_stop(self):
        return self.stop_after is not None and self.steps[-1] >= self.stop_after


def test_fit_learns_and_reports(digits, device):
    recorder = Recorder()
    history = fit(network(device), digits, callbacks=[recorder])
    per_epoch = iterations_per_epoch(1200, 64)  # 19: 18 full batches and one of 48
    assert per_epoch == 19 and history.iteration == 57 and len(history.batch_loss) == 57
    assert recorder.checkpoints == [19, 38, 57] and recorder.steps == list(range(1, 58))
    records = history.records
    assert [r["iteration"] for r in records] == [*range(7, 57, 7), 57]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert records[-1]["val_error"] < 0.05 and records[0]["val_error"] > 0.3  # it learned the digits
    assert all(0 <= r["train_error"] <= 1 and r["time_s"] >= 0 for r in records)
    assert records[1]["train_loss"] == pytest.approx(np.mean(history.batch_loss[7:14]))
    assert history.start_cost == pytest.approx(np.log(10), rel=0.2)  # the initial network is nearly uniform


def test_every_row_is_visited_once_per_epoch_and_the_last_partial_batch_is_kept(digits, device):
    net = network(device)
    train, _ = digits
    data = DeviceDataset(net, train.X, train.y, 1 / 255)
    seen = []

    class Spy(XpEngine):
        def step(self, rows, lr, next_rows=None):
            seen.append(gpunn.to_numpy(rows).copy())
            return super().step(rows, lr, next_rows)

    optimizer = gpunn.SGD(net, 0.3)
    gpunn.fit(
        net,
        data,
        epochs=2,
        batch_size=64,
        optimizer=optimizer,
        engine=Spy(net, optimizer, data),
        seed=5,
        progress=False,
    )
    assert [len(r) for r in seen[:19]] == [64] * 18 + [48]
    for epoch in range(2):
        rows = np.concatenate(seen[19 * epoch : 19 * (epoch + 1)])
        np.testing.assert_array_equal(rows, gpunn.data.epoch_order(5, epoch, 1200, 64))


def test_without_validation_data_records_have_no_validation_figures(digits, device):
    train, _ = digits
    history = gpunn.fit(
        network(device), train.X, train.y, epochs=1, batch_size=100, input_scale=1 / 255, progress=False
    )
    assert [r["iteration"] for r in history.records] == [12]  # once per epoch by default
    assert history.records[0]["val_loss"] is None and history.records[0]["val_error"] is None


def test_a_non_finite_cost_names_iteration_and_rate(digits, device):
    with pytest.raises(gpunn.DivergenceError, match=r"iteration \d+ is (nan|inf).* learning rate 1e\+30"):
        fit(network(device), digits, lr=1e30, divergence_factor=None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_cost_that_explodes_but_stays_finite_stops_the_run(digits, device, dtype):
    """--lr 1e6 gave costs near 1e36 and 95 % error without ever overflowing, and exited 'done'."""
    with pytest.raises(
        gpunn.DivergenceError,
        match=r"median mini-batch cost of iterations 2…21 is .* over 10 × the starting cost",
    ):
        fit(network(device, dtype=dtype), digits, lr=1e6)
    history = fit(
        network(device, dtype=dtype), digits, lr=1e6, divergence_factor=None
    )  # the check turned off
    assert history.iteration == 57 and max(history.batch_loss) > 1e3 * history.start_cost


def test_the_divergence_rule_leaves_a_healthy_run_alone(digits, device):
    history = fit(network(device), digits, lr=2.0)  # a large rate: noisy, but not diverging
    assert history.iteration == 57 and np.median(history.batch_loss[-20:]) < 10 * history.start_cost


def test_divergence_keeps_the_last_good_checkpoint(digits, device, tmp_path):
    train, _ = digits
    net = network(device)
    optimizer = gpunn.SGD(net, 0.3)
    data = DeviceDataset(net, train.X, train.y, 1 / 255)
    path = tmp_path / "checkpoint.npz"

    class Poisoned(XpEngine):  # the cost turns non-finite in the second epoch
        t = 0

        def step(self, rows, lr, next_rows=None):
            J, errors = super().step(rows, lr, next_rows)
            Poisoned.t += 1
            return (J * np.nan if Poisoned.t > 25 else J), errors

    class Saver(Callback):
        def on_checkpoint(self, history):
            save_checkpoint(path, net, optimizer, history)

    with pytest.raises(gpunn.DivergenceError, match="iteration 26 "):
        gpunn.fit(
            net,
            data,
            epochs=3,
            batch_size=64,
            optimizer=optimizer,
            engine=Poisoned(net, optimizer, data),
            callbacks=[Saver()],
            progress=False,
        )
    assert load_checkpoint(path).history.iteration == 19


@pytest.mark.parametrize(("optimizer", "extra"), [("sgd", {"momentum": 0.9}), ("adam", {"lr": 0.003})])
def test_stop_and_resume_ends_where_an_uninterrupted_run_ends(digits, device, tmp_path, optimizer, extra):
    options = {"optimizer": optimizer, "lr_schedule": "step", "lr_step_epochs": 1, **extra}
    whole = network(device)
    whole_history = fit(whole, digits, **options)

    net = network(device)
    opt = gpunn.optim.make_optimizer(
        net, optimizer, **{k: v for k, v in {**OPTIONS, **options}.items() if k in ("lr", "momentum")}
    )
    path = tmp_path / "checkpoint.npz"

    class Saver(Callback):
        def on_checkpoint(self, history):
            save_checkpoint(path, net, opt, history)

    recorder = Recorder(stop_after=24)  # mid-epoch and mid-evaluation window
    fit(net, digits, callbacks=[recorder, Saver()], **{**options, "optimizer": opt})
    ckpt = load_checkpoint(path)
    assert ckpt.history.iteration == 24 and ckpt.optimizer["name"] == optimizer

    resumed = ckpt.network(device)
    resumed_history = fit(
        resumed, digits, history=ckpt.history, **{**options, "optimizer": ckpt.make_optimizer(resumed)}
    )
    assert resumed_history.iteration == whole_history.iteration == 57
    np.testing.assert_allclose(
        gpunn.to_numpy(resumed.theta), gpunn.to_numpy(whole.theta), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(resumed_history.batch_loss, whole_history.batch_loss, rtol=1e-5)
    assert [r["iteration"] for r in resumed_history.records] == [
        r["iteration"] for r in whole_history.records
    ]
    assert resumed_history.records[3]["train_loss"] == pytest.approx(
        whole_history.records[3]["train_loss"], rel=1e-5
    )


def test_a_finished_run_continues_to_more_epochs_like_a_longer_run(digits, device, monkeypatch):
    monkeypatch.setenv("GPUNN_BLAS_THREADS", "2")  # the CPU's sums depend on the thread count: fix it
    longer = network(device)
    fit(longer, digits, epochs=4)
    net = network(device)
    optimizer = gpunn.SGD(net, 0.3)
    history = fit(net, digits, optimizer=optimizer)
    fit(net, digits, optimizer=optimizer, history=history, epochs=4)
    assert history.iteration == 76 and len(history.batch_loss) == 76
    np.testing.assert_allclose(gpunn.to_numpy(net.theta), gpunn.to_numpy(longer.theta), rtol=1e-6)


def test_checkpoint_round_trip(digits, device, tmp_path):
    net = network(device)
    opt = gpunn.SGD(net, 0.3, momentum=0.5)
    history = History(
        iteration=2, train_time=1.5, batch_loss=[2.0, 1.0], batch_error=[0.5, 0.25], start_cost=2.3
    )
    cfg = Config(hidden=[32], momentum=0.5, lr=0.3).check()
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, net, opt, history, cfg, {"dataset": "mnist", "device": "cpu"})
    ckpt = load_checkpoint(path)
    assert (
        ckpt.config == cfg and ckpt.history == history and ckpt.run == {"dataset": "mnist", "device": "cpu"}
    )
    assert ckpt.optimizer == {"name": "sgd", "lr": 0.3, "momentum": 0.5, "weight_decay": 0.0}
    assert set(ckpt.optimizer_state) == {"velocity"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary file left
    np.testing.assert_array_equal(gpunn.to_numpy(ckpt.network("cpu").theta), gpunn.to_numpy(net.theta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs must be"),
        ({"batch_size": -1}, "batch_size must be"),
        ({"batch_size": 10**20}, "batch_size must be"),
        ({"hidden": [0]}, "hidden widths"),
        ({"hidden": [10**9]}, "hidden widths"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"activation": "identity"}, "activation"),
        ({"num_classes": 1}, "num_classes"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum must be 0 with optimizer 'adam'"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
    ],
)
def test_config_refuses_impossible_values(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**changes).check()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be"),
        ({"batch_size": 2.5}, "batch_size must be"),
        ({"eval_every": -1}, "eval_every must be"),
        ({"lr_schedule": "linear"}, "lr_schedule must be"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum is an SGD option"),
        ({"engine": "turbo"}, "unknown engine 'turbo'"),
        ({"divergence_factor": 0.5}, "divergence_factor must be"),
        ({"validation_data": [1, 2, 3]}, "validation_data must be"),
        ({"input_scale": 0}, "input_scale must be"),
    ],
)
def test_fit_refuses_impossible_arguments(kwargs, message):
    net = gpunn.MLP([2, 3])
    with pytest.raises(ValueError, match=message):
        gpunn.fit(net, np.zeros((4, 2)), np.zeros(4, int), progress=False, **kwargs)


def test_the_progress_bars_show_training_cost_and_error_beside_validation(capsys):
    from gpunn.progress import ProgressBars

    bars = ProgressBars(total=20, per_epoch=10, start=0)
    for t in range(1, 8):
        bars.on_step(t)
    record = {"train_loss": 0.4321, "train_error": 0.125, "val_loss": 0.5, "val_error": 0.25}
    bars.on_eval(record)
    assert bars.epochs.postfix == "cost=0.4321, error=12.50%, val_cost=0.5000, val_error=25.00%"
    bars.on_eval(
        {**record, "train_error": None, "val_loss": None, "val_error": None}
    )  # regression, no validation
    assert bars.epochs.postfix == "cost=0.4321"
    bars.close()


def test_an_engine_made_for_other_work_is_refused():
    net = gpunn.MLP([2, 3])
    data = DeviceDataset(net, np.zeros((4, 2)), np.zeros(4, int))
    engine = XpEngine(net, gpunn.SGD(net), data)
    with pytest.raises(ValueError, match="the engine was made for another network, optimizer or"):
        gpunn.fit(net, np.zeros((4, 2)), np.zeros(4, int), engine=engine, progress=False)


class Quiet(Callback):
    """Counts iterations but needs neither θ after each one nor a stop at one (a progress bar)."""

    per_iteration = False

    def __init__(self):
        self.steps = []

    def on_step(self, iteration):
        self.steps.append(iteration)


@pytest.mark.parametrize("stop_after", [None, 24])
def test_stretches_are_single_iterations_only_for_callbacks_that_need_them(
    digits, device, monkeypatch, stop_after
):
    """The engine's stretches (up to the 7 iterations between evaluations here) with a callback that
    does not need single iterations, one at a time with one that does; the same run either way, and a
    stop after exactly the iteration asked for."""
    monkeypatch.setenv("GPUNN_BLAS_THREADS", "2")  # the CPU's sums depend on the thread count: fix it
    train, _ = digits
    runs = []

    def spied(engine, spans):
        run = engine.run
        engine.run = lambda order, first, count, *rest: spans.append(count) or run(order, first, count, *rest)
        return engine

    for callback in (Quiet(), Recorder(stop_after)):
        net = network(device)
        optimizer = gpunn.SGD(net, 0.3)
        data = DeviceDataset(net, train.X, train.y, 1 / 255)
        spans = []
        engine = spied(gpunn.engines.make_engine("auto", net, optimizer, data), spans)
        options = {k: v for k, v in OPTIONS.items() if k != "lr"}
        history = gpunn.fit(net, data, optimizer=optimizer, engine=engine, callbacks=[callback], **options)
        runs.append((history, net.theta.copy(), spans, callback.steps))
    (quiet, theta, spans, steps), (exact, exact_theta, exact_spans, exact_steps) = runs
    assert set(exact_spans) == {1} and steps == list(range(1, 58))
    assert max(spans) == min(7, gpunn.engines.make_engine("auto", net, optimizer, data).max_steps)
    if stop_after is None:
        assert exact_steps == steps and quiet.batch_loss == exact.batch_loss
        np.testing.assert_array_equal(gpunn.to_numpy(theta), gpunn.to_numpy(exact_theta))
    else:
        assert exact.iteration == 24 and exact_steps == list(range(1, 25))


def test_every_rank_runs_stretches_of_one_length_whatever_its_own_callbacks():
    """A callback that needs single iterations on one rank only (a logger on rank 0): every rank runs
    one iteration at a time, so that all of them ask whether to stop after the same iterations."""
    from gpunn.train import _Loop

    from fake_comm import run_ranks

    def stretch(comm, logger):
        net = gpunn.MLP([4, 3], seed=0)
        engine = type("Engine", (), {"max_steps": 100})()
        data = type("Data", (), {"n": 1000})()
        callbacks = [Recorder()] if logger and comm.rank == 0 else []
        return _Loop(net, engine, data, None, None, 100, 10, 0, History(), callbacks, comm).stretch

    assert run_ranks(2, lambda comm: stretch(comm, logger=True)) == [1, 1]
    assert run_ranks(2, lambda comm: stretch(comm, logger=False)) == [100, 100]
