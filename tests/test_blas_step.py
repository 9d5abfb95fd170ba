"""The CPU engine (blas_step.BlasStep) computes the same updates, costs and evaluations as the xp reference
(train.TrainStep, train.evaluate), and make_step picks it, or says why not."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpunn
from gpunn import blas
from gpunn.blas_step import BlasStep, support
from gpunn.data import DeviceDataset
from gpunn.train import Config, EngineFallbackWarning, TrainState, TrainStep, evaluate, fit, make_step

CPU = gpunn.get_device("cpu")


def dataset(rng, n, p, classes=10):
    return DeviceDataset(rng.integers(0, 256, (n, p), dtype=np.uint8), rng.integers(0, classes, n), CPU)


def twin_steps(sizes, activation, dtype, data):
    """A BlasStep and a TrainStep on two identical networks."""
    nets = [gpunn.MLP(sizes, activation, device=CPU, seed=3, dtype=dtype) for _ in range(2)]
    return BlasStep(nets[0], gpunn.SGD(nets[0], lr=0.1), data), TrainStep(
        nets[1], gpunn.SGD(nets[1], lr=0.1), data
    )


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("sizes", [[48, 10], [48, 24, 10], [48, 24, 16, 7]], ids=["L1", "L2", "L3"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_same_updates_as_the_xp_engine_over_many_steps(rng, activation, sizes, dtype):
    data = dataset(rng, 230, sizes[0], sizes[-1])
    fast, ref = twin_steps(sizes, activation, dtype, data)
    order = np.random.default_rng(1).permutation(230)
    costs, errors = [], []
    for t in range(30):
        rows = order[(t * 50) % 250 : (t * 50) % 250 + 50]  # batches of 50, 30 and (wrapping) 50
        lr = 0.5 / (1 + t)  # a changing learning rate, as a schedule gives
        (J, e), (J_ref, e_ref) = fast(rows, lr), ref(rows, lr)
        costs.append((float(J), float(J_ref)))
        errors.append((int(e), int(e_ref)))
    tol = {"float64": 1e-11, "float32": 2e-4}[dtype]
    np.testing.assert_allclose(*np.transpose(costs), rtol=tol)
    wrong_by = sum(abs(a - b) for a, b in errors)  # float32 may tip a near tie: a row here or there
    assert wrong_by == 0 if dtype == "float64" else wrong_by <= 2
    np.testing.assert_allclose(fast.net.theta, ref.net.theta, rtol=tol, atol=tol * 1e-2)
    assert sorted(fast.plans) == [(30, True), (50, True)]


def test_float32_error_counts_agree_where_no_logits_are_near_a_tie(rng):
    data = dataset(rng, 200, 48)
    fast, ref = twin_steps([48, 24, 10], "relu", "float32", data)
    for t in range(4):
        rows = np.arange(50 * t, 50 * t + 50)
        assert int(fast(rows, 0.1)[1]) == int(ref(rows, 0.1)[1])


def test_errors_count_the_first_largest_logit_like_argmax():
    net = gpunn.MLP([4, 3], device=CPU, seed=0, dtype="float64")
    net.theta[...] = 0  # every logit 0: argmax says class 0 for every row
    data = DeviceDataset(np.zeros((5, 4), np.uint8), np.array([0, 1, 2, 0, 2]), CPU)
    step = BlasStep(net, gpunn.SGD(net, lr=0.1), data)
    J, errors = step(np.arange(5), 0.1)
    assert int(errors) == 3
    assert float(J) == pytest.approx(np.log(3))


@pytest.mark.parametrize("n", [1000, 999])  # whole chunks, and a last partial one
def test_evaluate_equals_the_reference(rng, n):
    data = dataset(rng, n, 48)
    step, ref = twin_steps([48, 24, 10], "relu", "float64", data)
    for t in range(3):
        step(np.arange(100 * t, 100 * t + 100), 0.5)
        ref(np.arange(100 * t, 100 * t + 100), 0.5)
    cost, error = step.evaluate(data, 300)
    cost_ref, error_ref = evaluate(ref.net, data)
    assert cost == pytest.approx(cost_ref, rel=1e-12)
    assert error == error_ref and 0 < error < 1


def test_fit_with_either_engine_records_the_same_run(rng):
    train, val = dataset(rng, 300, 48), dataset(rng, 120, 48)
    cfg = Config(hidden=[24], epochs=2, batch_size=40, lr=0.3, eval_every=4, dtype="float64")
    runs = []
    for engine in ("blas", "xp"):
        net = gpunn.MLP(cfg.sizes(48), device=CPU, seed=0, dtype="float64")
        opt = gpunn.SGD(net, cfg.lr)
        step = make_step(net, opt, train, engine)
        records, state = [], TrainState()
        fit(net, opt, cfg, train, val, state, records.append, step=step)
        runs.append((type(step).__name__, state, records, net.theta.copy()))
    (name_a, a, rec_a, th_a), (name_b, b, rec_b, th_b) = runs
    assert (name_a, name_b) == ("BlasStep", "TrainStep")
    np.testing.assert_allclose(a.batch_loss, b.batch_loss, rtol=1e-11)
    assert a.batch_error == b.batch_error
    assert [r["val_error"] for r in rec_a] == [r["val_error"] for r in rec_b]
    np.testing.assert_allclose([r["val_loss"] for r in rec_a], [r["val_loss"] for r in rec_b], rtol=1e-11)
    np.testing.assert_allclose(th_a, th_b, rtol=1e-11, atol=1e-14)


def test_auto_is_the_blas_engine_on_the_cpu_where_it_can_run(rng):
    data = dataset(rng, 50, 8)
    net = gpunn.MLP([8, 4, 10], device=CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto falls back without a word
        assert isinstance(make_step(net, gpunn.SGD(net, lr=0.1), data), BlasStep)
        assert isinstance(make_step(net, gpunn.SGD(net, lr=0.1, momentum=0.9), data), TrainStep)
        assert isinstance(make_step(net, gpunn.SGD(net, lr=0.1), data, "xp"), TrainStep)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (gpunn.MLP([8, 2], task="regression"), {}), "classification networks, not regression"),
        (lambda: (gpunn.MLP([8, 1], task="binary"), {}), "not binary"),
        (lambda: (gpunn.MLP([8, 10]), {"momentum": 0.9}), "plain SGD"),
        (lambda: (gpunn.MLP([8, 10]), {"weight_decay": 1e-4}), "plain SGD"),
    ],
)
def test_what_the_blas_engine_cannot_run_falls_back_with_the_reason(rng, make, reason):
    net, opt = make()
    opt = gpunn.SGD(net, lr=0.1, **opt)
    assert reason in support(net, opt)
    with pytest.warns(EngineFallbackWarning, match=reason):
        step = make_step(net, opt, dataset(rng, 20, 8), "blas")
    assert isinstance(step, TrainStep)
    with pytest.raises(ValueError, match=reason):
        BlasStep(net, opt, dataset(rng, 20, 8))


def test_without_a_blas_library_the_cpu_trains_with_the_xp_engine(rng, monkeypatch):
    monkeypatch.setattr(blas, "_gemm", None)
    monkeypatch.setattr(blas, "_searched", True)
    net = gpunn.MLP([8, 10])
    assert "no BLAS library" in support(net, gpunn.SGD(net, lr=0.1))
    assert isinstance(make_step(net, gpunn.SGD(net, lr=0.1), dataset(rng, 20, 8)), TrainStep)
