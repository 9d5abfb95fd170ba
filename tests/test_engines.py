"""Every registered engine computes what the reference engine ``xp`` computes, through the contract
(``gpunn.fit`` driving ``run`` and ``evaluate``): the CPU engine ``blas`` for real, the CUDA engines
``fused`` and ``graph`` with their kernels compiled as C++ and run through an emulation of the grid
(on a GPU, the same comparisons run for real in test_fused.py). And ``make_engine`` picks, refuses
and falls back as documented."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpunn
from gpunn import native
from gpunn.data import DeviceDataset
from gpunn.engines import REGISTRY, auto_order, blas, make_engine
from gpunn.engines.blas import BlasEngine
from gpunn.engines.reference import XpEngine
from gpunn.optim import make_optimizer

from helpers import need_cpu_kernels

CPU = gpunn.get_device("cpu")
FAST = [name for name in REGISTRY if name != "xp"] + ["blas-numpy", "blas-python", "blas-sparse"]
SIZES = {"classification": [12, 8, 4], "regression": [12, 8, 3], "binary": [12, 8, 1]}
OPTIMIZERS = {
    "sgd": {"optimizer": "sgd", "lr": 0.3},
    "momentum-decay": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "adam": {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3},
}


def problem(task, inputs="uint8", n=250, seed=0):
    """(X, y, input_scale): 250 rows, so that batches of 20 leave a partial last one of 10."""
    rng = np.random.default_rng(seed)
    p = SIZES[task][0]
    X = rng.integers(0, 256, (n, p), dtype=np.uint8) if inputs == "uint8" else rng.standard_normal((n, p))
    y = {
        "classification": rng.integers(0, 4, n),
        "regression": rng.standard_normal((n, 3)),
        "binary": rng.integers(0, 2, n),
    }[task]
    return X, y, (1 / 255 if inputs == "uint8" else None)


def fit_with(make, task, activation, dtype, options, inputs="uint8", sizes=None, epochs=3, eval_every=5):
    """One fit() with the engine ``make`` builds: (history, final θ, engine)."""
    X, y, scale = problem(task, inputs)
    net = gpunn.MLP(sizes or SIZES[task], activation, task, CPU, seed=1, dtype=dtype)
    options = dict(options)
    optimizer = make_optimizer(net, options.pop("optimizer"), **options)
    train = DeviceDataset(net, X, y, scale)
    val = DeviceDataset(net, X[:60], y[:60], scale)
    engine = make(net, optimizer, train)
    history = gpunn.fit(
        net,
        train,
        epochs=epochs,
        batch_size=20,
        optimizer=optimizer,
        validation_data=val,
        eval_every=eval_every,
        lr_schedule="cosine",  # γ changes every iteration: each must read its own
        engine=engine,
        progress=False,
    )
    return history, net.theta.copy(), engine


def assert_same_run(got, ref, rtol):
    (h, theta, _), (h_ref, theta_ref, _) = got, ref
    np.testing.assert_allclose(h.batch_loss, h_ref.batch_loss, rtol=rtol)
    np.testing.assert_allclose(h.batch_error, h_ref.batch_error, rtol=0, atol=0)
    assert [r["iteration"] for r in h.records] == [r["iteration"] for r in h_ref.records]
    for key in ("val_loss", "train_loss"):
        np.testing.assert_allclose([r[key] for r in h.records], [r[key] for r in h_ref.records], rtol=rtol)
    assert [r["val_error"] for r in h.records] == [r["val_error"] for r in h_ref.records]
    np.testing.assert_allclose(theta, theta_ref, rtol=rtol * 10, atol=rtol * 1e-2)


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize("task", list(SIZES))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "identity"])
def test_every_engine_trains_like_the_reference_in_float64(
    engine_factory, engine, task, optimizer, activation
):
    options = OPTIMIZERS[optimizer]
    got = fit_with(engine_factory(engine), task, activation, "float64", options)
    ref = fit_with(XpEngine, task, activation, "float64", options)
    assert_same_run(got, ref, rtol=1e-10)


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize("inputs", ["uint8", "float64"])
@pytest.mark.parametrize("sizes", [[12, 4], [12, 9, 7, 4]], ids=["L1", "L3"])
def test_every_engine_takes_any_depth_and_stored_inputs(engine_factory, engine, inputs, sizes):
    got = fit_with(
        engine_factory(engine), "classification", "relu", "float64", OPTIMIZERS["sgd"], inputs, sizes
    )
    ref = fit_with(XpEngine, "classification", "relu", "float64", OPTIMIZERS["sgd"], inputs, sizes)
    assert_same_run(got, ref, rtol=1e-10)


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_engine_in_float32(engine_factory, engine, optimizer):
    options = OPTIMIZERS[optimizer]
    (h, theta, _), (h_ref, theta_ref, _) = (
        fit_with(make, "classification", "relu", "float32", options)
        for make in (engine_factory(engine), XpEngine)
    )
    np.testing.assert_allclose(h.batch_loss, h_ref.batch_loss, rtol=2e-4)  # summation orders differ
    np.testing.assert_allclose(theta, theta_ref, rtol=2e-3, atol=2e-4)
    assert np.sum(np.abs(np.subtract(h.batch_error, h_ref.batch_error))) * 20 <= 3  # a near tie may tip


@pytest.mark.parametrize("engine", [*FAST, "xp"])
def test_two_runs_of_one_seed_are_bit_identical(engine_factory, engine):
    make = engine_factory(engine)
    (h1, theta1, _), (h2, theta2, _) = (
        fit_with(make, "binary", "tanh", "float32", OPTIMIZERS["adam"]) for _ in range(2)
    )
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in h1.records + h2.records]
    assert h1.batch_loss == h2.batch_loss and strip[: len(h1.records)] == strip[len(h1.records) :]
    np.testing.assert_array_equal(theta1, theta2)


def test_the_graph_engine_captures_each_stretch_once_and_replays_it(engine_factory):
    history, _, engine = fit_with(
        engine_factory("graph"), "classification", "relu", "float64", OPTIMIZERS["sgd"], eval_every=13
    )
    # 13 iterations an epoch (12 of 20 rows, one of 10): one stretch per epoch, the partial batch inside
    assert list(engine.captured) == [(0, 13, 20)]
    assert engine.graphs.captures == 1 + 1 + 1  # the trial, the stretch, the evaluation
    assert engine.graphs.launches == 3 + len(history.records)


def test_errors_count_the_first_largest_logit_like_argmax(engine_factory):
    for name in FAST:
        net = gpunn.MLP([4, 3], device=CPU, seed=0, dtype="float64")
        net.theta[...] = 0  # every logit 0: argmax says class 0 for every row
        data = DeviceDataset(net, np.zeros((5, 4), np.uint8), np.array([0, 1, 2, 0, 2]))
        engine = engine_factory(name)(net, gpunn.SGD(net, lr=0.1), data)
        costs, errors = engine.run(np.arange(5), 0, 1, 5, [0.1])
        assert float(errors[0]) == 3 and float(costs[0]) == pytest.approx(np.log(3)), name


# --- choosing an engine --------------------------------------------------------------------------


def small(task="classification", optimizer="sgd", **hyper):
    net = gpunn.MLP(SIZES[task], task=task, device=CPU)
    X, y, scale = problem(task, n=30)
    return net, make_optimizer(net, optimizer, **hyper), DeviceDataset(net, X, y, scale)


def test_auto_is_the_blas_engine_on_the_cpu_for_every_task_and_optimizer():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto takes what it can without a word
        for task in SIZES:
            for optimizer in ("sgd", "adam"):
                assert isinstance(make_engine("auto", *small(task, optimizer)), BlasEngine)
        assert isinstance(make_engine("xp", *small()), XpEngine)
    assert auto_order(CPU) == ("blas", "xp")


@pytest.mark.parametrize("name", ["fused", "graph"])
def test_cuda_engines_asked_for_on_the_cpu_say_why_and_the_next_runs(name):
    with pytest.warns(
        gpunn.EngineFallbackWarning, match=f"the {name} engine needs a CUDA device; training with the blas"
    ):
        engine = make_engine(name, *small())
    assert isinstance(engine, BlasEngine)


def test_unknown_engines_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown engine 'turbo'"):
        make_engine("turbo", *small())
    monkeypatch.setenv("GPUNN_AUTO_ENGINES", "graph,warp")
    with pytest.raises(ValueError, match=r"GPUNN_AUTO_ENGINES names unknown engines \['warp'\]"):
        auto_order(CPU)


def test_auto_order_can_be_set_for_a_gpu_check(monkeypatch):
    monkeypatch.setenv("GPUNN_AUTO_ENGINES", "graph,fused")
    assert auto_order(CPU) == ("graph", "fused", "xp")  # xp always last, as the fallback


def test_without_a_blas_library_the_cpu_trains_with_the_reference(monkeypatch):
    monkeypatch.setattr(native, "_gemm", None)
    monkeypatch.setattr(native, "_searched", True)
    assert "no BLAS library" in BlasEngine.supports(*small())
    assert isinstance(make_engine("auto", *small()), XpEngine)


def test_an_engine_that_fails_to_build_warns_and_the_next_runs(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nvrtc: error: invalid value for --gpu-architecture\n(and more lines)")

    monkeypatch.setitem(REGISTRY, "blas", type("Broken", (BlasEngine,), {"__init__": broken}))
    with pytest.warns(
        gpunn.EngineFallbackWarning,
        match=r"blas engine cannot run here \(nvrtc: error: invalid value.*\); training with the xp",
    ):
        engine = make_engine("auto", *small())
    assert isinstance(engine, XpEngine)


class _NewHyper:
    """An optimizer description no fast engine knows."""


def test_an_optimizer_option_no_engine_implements_is_refused_not_ignored():
    from gpunn.engines.fused import FusedEngine
    from gpunn.optim import AdamHyper, SGDHyper, unsupported

    assert unsupported(SGDHyper(lr=0.1), {SGDHyper: {"lr"}}) is None
    assert unsupported(SGDHyper(lr=0.1, momentum=0.5), {SGDHyper: {"lr"}}) == "no update with momentum=0.5"
    assert unsupported(AdamHyper(), {SGDHyper: {"lr"}}) == "no adam update"
    net, optimizer, data = small()
    optimizer.hyper = _NewHyper()
    assert "no _NewHyper update" in FusedEngine.kernel_refusal(net, optimizer, data)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_cpu_engine_cuts_its_work_over_threads_like_the_reference(monkeypatch, threads):
    """Mini-batches large enough for the team of threads to cut the products and the element-wise
    passes (engines/cpu_team.h), the next mini-batch gathered by a worker meanwhile: the reference's
    run to 1e-10 at either width, and one width's run repeats bit for bit."""
    need_cpu_kernels(np.float64, np.uint8)
    monkeypatch.setenv("GPUNN_BLAS_THREADS", threads)
    rng = np.random.default_rng(3)
    X, y = rng.integers(0, 256, (1300, 300), dtype=np.uint8), rng.integers(0, 4, 1300)

    def run(make):
        net = gpunn.MLP([300, 160, 4], "relu", "classification", CPU, seed=1, dtype="float64")
        train, val = DeviceDataset(net, X, y, 1 / 255), DeviceDataset(net, X[:1100], y[:1100], 1 / 255)
        optimizer = make_optimizer(net, "sgd", lr=0.05)
        history = gpunn.fit(
            net, train, epochs=2, batch_size=256, optimizer=optimizer, validation_data=val, eval_every=3,
            engine=make(net, optimizer, train), progress=False,
        )  # fmt: skip
        return history, net.theta.copy(), None

    got, again, ref = run(BlasEngine), run(BlasEngine), run(XpEngine)
    assert_same_run(got, ref, rtol=1e-10)
    assert got[0].batch_loss == again[0].batch_loss
    np.testing.assert_array_equal(got[1], again[1])


@pytest.mark.parametrize("task", list(SIZES))
def test_the_native_stretch_is_the_python_sequence_bit_for_bit(engine_factory, monkeypatch, task):
    """cpu_train.h runs whole stretches of plain SGD (here 12 iterations between evaluations, the
    partial 13th by ``step``) with the calls _Plan makes from Python one by one: the same bits."""
    need_cpu_kernels(np.float64, np.uint8)
    monkeypatch.setenv("GPUNN_BLAS_THREADS", "2")
    sizes = [12, 9, 7, SIZES[task][-1]]
    native_run, python_run = (
        fit_with(
            engine_factory(name),
            task,
            "tanh",
            "float64",
            {"optimizer": "sgd", "lr": 0.05},
            sizes=sizes,
            eval_every=12,
        )
        for name in ("blas", "blas-python")
    )
    engine = native_run[2]
    assert engine.max_steps == 100 and engine.pairs[20] is not None  # the stretches ran natively
    assert python_run[2].max_steps == 1
    assert native_run[0].batch_loss == python_run[0].batch_loss
    assert native_run[0].batch_error == python_run[0].batch_error or task == "regression"
    np.testing.assert_array_equal(native_run[1], python_run[1])


@pytest.mark.parametrize("inputs", ["uint8", "float64"])
def test_layer_one_skips_zero_inputs_like_the_reference_at_any_width(monkeypatch, inputs):
    """Inputs 80 % zero (MNIST's pixels: 81 %): the CPU engine's layer 1 works on the nonzeros
    (engines/cpu_sparse.h), the reference's run to 1e-10, and the same bits with one thread or two."""
    need_cpu_kernels(np.float64, np.uint8 if inputs == "uint8" else np.float64)
    rng = np.random.default_rng(4)
    X = rng.integers(1, 256, (1300, 300)).astype(inputs)
    X[rng.random(X.shape) < 0.8] = 0
    y = rng.integers(0, 4, 1300)
    scale = 1 / 255 if inputs == "uint8" else 1 / 300

    def run(make, threads="2"):
        monkeypatch.setenv("GPUNN_BLAS_THREADS", threads)
        net = gpunn.MLP([300, 70, 4], "relu", "classification", CPU, seed=1, dtype="float64")
        train, val = DeviceDataset(net, X, y, scale), DeviceDataset(net, X[:1100], y[:1100], scale)
        optimizer = make_optimizer(net, "sgd", lr=0.05)
        engine = make(net, optimizer, train)
        history = gpunn.fit(
            net, train, epochs=2, batch_size=100, optimizer=optimizer, validation_data=val, eval_every=5,
            engine=engine, progress=False,
        )  # fmt: skip
        return history, net.theta.copy(), engine

    one, two, ref = run(BlasEngine, "1"), run(BlasEngine), run(XpEngine)
    assert two[2].sparse and two[2].plan(two[2].data, 100).sparse is not None
    assert_same_run(two, ref, rtol=1e-10)
    assert one[0].batch_loss == two[0].batch_loss
    np.testing.assert_array_equal(one[1], two[1])


def test_the_inputs_density_chooses_layer_ones_way_unless_the_user_does(monkeypatch):
    rng = np.random.default_rng(0)
    net = gpunn.MLP([50, 3], seed=0)
    dense = DeviceDataset(
        net, rng.integers(1, 256, (200, 50), dtype=np.uint8), rng.integers(0, 3, 200), 1 / 255
    )
    X = rng.integers(0, 256, (200, 50), dtype=np.uint8) * (rng.random((200, 50)) < 0.1)
    sparse = DeviceDataset(net, X.astype(np.uint8), rng.integers(0, 3, 200), 1 / 255)
    monkeypatch.delenv(blas.SPARSE_VARIABLE, raising=False)
    assert blas.sparse_inputs(sparse, 200) and not blas.sparse_inputs(dense, 200)
    assert not blas.sparse_inputs(sparse, 10)  # too few units to pay for the lists
    assert not blas.sparse_inputs(sparse, 200, False) and blas.sparse_inputs(dense, 10, True)
    monkeypatch.setenv(blas.SPARSE_VARIABLE, "0")
    assert not blas.sparse_inputs(sparse, 200)
    monkeypatch.setenv(blas.SPARSE_VARIABLE, "1")
    assert blas.sparse_inputs(dense, 10)


def test_a_step_from_python_then_a_native_stretch_on_sparse_inputs(monkeypatch):
    """``step`` (whose next mini-batch a worker gathers densely) and then ``run``: the native stretch
    lists the inputs itself instead of taking the dense gather for its lists; as the dense engine."""
    need_cpu_kernels(np.float64, np.uint8)
    monkeypatch.setenv("GPUNN_BLAS_THREADS", "2")
    rng = np.random.default_rng(5)
    X = rng.integers(1, 256, (400, 300), dtype=np.uint8) * (rng.random((400, 300)) < 0.2)
    y, order, lrs = rng.integers(0, 4, 400), rng.permutation(400), [0.05] * 3
    costs = []
    for sparse in (True, False):
        net = gpunn.MLP([300, 70, 4], "relu", "classification", CPU, seed=1, dtype="float64")
        optimizer = make_optimizer(net, "sgd", lr=0.05)
        engine = type("Engine", (BlasEngine,), {"use_sparse": sparse})(
            net, optimizer, DeviceDataset(net, X.astype(np.uint8), y, 1 / 255)
        )
        engine.run(order, 10, 2, 20, lrs)  # the plans have lists of other rows already
        first = engine.step(order[:20], 0.05, order[20:40])[0]
        costs.append([first, *engine.run(order, 1, 3, 20, lrs)[0]])
        engine.finish()
    assert engine.sparse is False
    np.testing.assert_allclose(costs[0], costs[1], rtol=1e-10)


def test_each_data_set_is_evaluated_on_its_own_rows():
    need_cpu_kernels(np.float32, np.uint8)
    rng = np.random.default_rng(0)
    net = gpunn.MLP([20, 8, 3], "relu", "classification", CPU, seed=1)
    optimizer = make_optimizer(net, "sgd", lr=0.05)
    a, b = (
        DeviceDataset(net, rng.integers(0, 256, (50, 20), dtype=np.uint8), rng.integers(0, 3, 50), 1 / 255)
        for _ in range(2)
    )
    engine, reference = BlasEngine(net, optimizer, a), XpEngine(net, optimizer, a)
    for data in (a, b, a):
        np.testing.assert_allclose(engine.evaluate(data), reference.evaluate(data), rtol=1e-5)
