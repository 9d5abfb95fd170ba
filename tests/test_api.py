"""The library as a user brings their own work to it: ``gpunn.fit`` on any arrays (against scikit-learn's
MLPs as oracles), Adam (against torch.optim.Adam), predict_proba, save and load, ONNX."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpunn
from gpunn.checkpoint import save_checkpoint
from gpunn.optim import Adam

from helpers import need

ORACLE = "a test oracle"


def oracle_fit(model, X, y):
    """scikit-learn's fit for a fixed number of epochs, as gpunn.fit runs (no "not converged" warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # ConvergenceWarning: max_iter is the budget
        return model.fit(X, y)


def moons(n, noise, rng):
    """Two interleaving half circles, as scikit-learn's make_moons draws them, with Gaussian noise."""
    t = rng.uniform(0, np.pi, n)
    label = rng.integers(0, 2, n)
    x = np.where(label == 0, np.cos(t), 1 - np.cos(t))
    y = np.where(label == 0, np.sin(t), 0.5 - np.sin(t))
    return np.column_stack([x, y]) + noise * rng.standard_normal((n, 2)), label


def tiny_features(n, rng):
    """Three classes separable in features of magnitude 0.01: what the old loader rounded to zero."""
    centres = np.array([[0.002, 0.002], [0.008, 0.003], [0.005, 0.008]])
    label = rng.integers(0, 3, n)
    return centres[label] + 0.0012 * rng.standard_normal((n, 2)), label


@pytest.mark.parametrize(
    ("make", "classes"), [(lambda n, rng: moons(n, 0.15, rng), 2), (tiny_features, 3)], ids=["moons", "tiny"]
)
def test_fit_classifies_as_well_as_scikit_learn(make, classes):
    sklearn = need("sklearn.neural_network", "GPUNN_REQUIRE_SKLEARN", ORACLE)
    rng = np.random.default_rng(0)
    X, y = make(600, rng)
    X_test, y_test = make(2000, rng)
    net = gpunn.MLP([2, 32, 32, classes], activation="relu", seed=0, dtype="float64")
    history = gpunn.fit(
        net, X, y, epochs=60, batch_size=32, optimizer="adam", lr=3e-3,
        validation_data=(X_test, y_test), seed=0, progress=False,
    )  # fmt: skip
    ours = float(np.mean(gpunn.to_numpy(net.predict(X_test)) == y_test))
    oracle = oracle_fit(sklearn.MLPClassifier(
        hidden_layer_sizes=(32, 32), activation="relu", solver="adam", learning_rate_init=3e-3,
        batch_size=32, max_iter=60, alpha=0.0, random_state=0, n_iter_no_change=60, tol=0,
    ), X, y)  # fmt: skip
    theirs = oracle.score(X_test, y_test)
    assert theirs > 0.9, "the oracle itself must learn the problem"
    assert ours >= theirs - 0.02, f"gpunn {ours:.3f} against scikit-learn {theirs:.3f}"
    assert history.records[-1]["val_error"] == pytest.approx(1 - ours)


def test_fit_regresses_as_well_as_scikit_learn():
    sklearn = need("sklearn.neural_network", "GPUNN_REQUIRE_SKLEARN", ORACLE)
    rng = np.random.default_rng(1)

    def make(n):
        X = rng.uniform(-2, 2, (n, 3))
        return X, np.column_stack([np.sin(X[:, 0]) + X[:, 1] * X[:, 2], np.cos(X[:, 1])])

    X, y = make(800)
    X_test, y_test = make(2000)
    net = gpunn.MLP([3, 64, 64, 2], activation="tanh", task="regression", seed=0, dtype="float64")
    gpunn.fit(net, X, y, epochs=80, batch_size=32, optimizer="adam", lr=2e-3, seed=0, progress=False)
    ours = float(np.mean((gpunn.to_numpy(net.predict(X_test)) - y_test) ** 2))
    oracle = oracle_fit(sklearn.MLPRegressor(
        hidden_layer_sizes=(64, 64), activation="tanh", solver="adam", learning_rate_init=2e-3,
        batch_size=32, max_iter=80, alpha=0.0, random_state=0, n_iter_no_change=80, tol=0,
    ), X, y)  # fmt: skip
    theirs = float(np.mean((oracle.predict(X_test) - y_test) ** 2))
    assert theirs < 0.1 * np.var(y_test), "the oracle itself must fit the function"
    assert ours <= 1.25 * theirs + 1e-3, f"gpunn MSE {ours:.4f} against scikit-learn {theirs:.4f}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_is_torch_adam_step_for_step(weight_decay):
    torch = need("torch", "GPUNN_REQUIRE_TORCH", ORACLE)
    rng = np.random.default_rng(2)
    net = gpunn.MLP([5, 4, 3], seed=0, dtype="float64")
    adam = Adam(net, lr=0.01, weight_decay=weight_decay)
    weights = [torch.tensor(np.array(W), requires_grad=True) for W, _ in net.params]
    biases = [torch.tensor(np.array(b), requires_grad=True) for _, b in net.params]
    reference = torch.optim.Adam(  # gpunn decays the weights W only, as its SGD does
        [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}],
        lr=0.01, betas=(0.9, 0.999), eps=1e-8,
    )  # fmt: skip
    for step in range(25):
        grads = [(rng.standard_normal(W.shape), rng.standard_normal(b.shape)) for W, b in net.params]
        adam.step([(dW.copy(), db.copy()) for dW, db in grads], lr=0.01 * 0.9**step)  # a schedule
        for group in reference.param_groups:
            group["lr"] = 0.01 * 0.9**step
        for (dW, db), W, b in zip(grads, weights, biases):
            W.grad, b.grad = torch.from_numpy(dW), torch.from_numpy(db)
        reference.step()
        for (W_ours, b_ours), W, b in zip(net.params, weights, biases):
            np.testing.assert_allclose(W_ours, W.detach().numpy(), rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(b_ours, b.detach().numpy(), rtol=1e-12, atol=1e-15)
    assert adam.t == 25


def test_adam_state_survives_a_checkpoint(tmp_path):
    net = gpunn.MLP([3, 2], seed=0, dtype="float64")
    adam = Adam(net, lr=0.1)
    for _ in range(3):
        adam.step(gpunn.backprop(net, np.eye(3), np.array([0, 1, 0]))[1])
    save_checkpoint(tmp_path / "c.npz", net, adam, gpunn.History())
    ckpt = gpunn.checkpoint.load_checkpoint(tmp_path / "c.npz")
    twin = ckpt.network("cpu")
    twin_adam = ckpt.make_optimizer(twin)
    assert twin_adam.t == 3 and twin_adam.hyper == adam.hyper
    for optimizer, network in ((adam, net), (twin_adam, twin)):
        optimizer.step(gpunn.backprop(network, np.eye(3), np.array([2, 1, 0]) % 2)[1])
    np.testing.assert_array_equal(twin.theta, net.theta)


@pytest.mark.parametrize("task", ["classification", "binary"])
def test_predict_proba_has_one_column_per_class_summing_to_one(device, task):
    net = gpunn.MLP([4, 6, 3 if task == "classification" else 1], task=task, device=device, seed=1)
    X = np.random.default_rng(3).standard_normal((7, 4))
    P = gpunn.to_numpy(net.predict_proba(X))
    assert P.shape == (7, 3 if task == "classification" else 2) and np.all(P >= 0)
    np.testing.assert_allclose(P.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(P.argmax(axis=1), gpunn.to_numpy(net.predict(X)))
    with pytest.raises(ValueError, match="no class probabilities"):
        gpunn.MLP([4, 2], task="regression").predict_proba(X)


def test_predict_checks_its_inputs():
    net = gpunn.MLP([3, 2])
    with pytest.raises(ValueError, match="X row 2 is not finite"):
        net.predict(np.array([[0, 0, 0], [1, 1, 1], [0, np.inf, 0]]))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        net.predict(np.ones((2, 4)))
    scaled = net.predict(np.full((2, 3), 255, np.uint8), input_scale=1 / 255)
    np.testing.assert_array_equal(scaled, net.predict(np.ones((2, 3))))


@pytest.mark.parametrize("task", ["classification", "regression", "binary"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_predict_gives_identical_outputs(device, tmp_path, task, dtype):
    sizes = [5, 7, 1] if task == "binary" else [5, 7, 3]
    net = gpunn.MLP(sizes, activation="tanh", task=task, device=device, seed=4, dtype=dtype)
    net.theta += net.xp.asarray(np.random.default_rng(0).standard_normal(net.num_params), dtype=dtype)
    net.save(tmp_path / "model.npz")
    loaded = gpunn.load(tmp_path / "model.npz", device="cpu")
    assert loaded.describe() == net.describe()
    X = np.random.default_rng(5).standard_normal((11, 5))
    np.testing.assert_array_equal(gpunn.to_numpy(loaded.forward(X)), gpunn.to_numpy(net.forward(X)))
    np.testing.assert_array_equal(gpunn.to_numpy(loaded.predict(X)), gpunn.to_numpy(net.predict(X)))
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_load_opens_a_checkpoint_as_a_ready_network(tmp_path):
    net = gpunn.MLP([4, 3], seed=2)
    save_checkpoint(tmp_path / "checkpoint.npz", net, gpunn.SGD(net, 0.1, momentum=0.5), gpunn.History())
    loaded = gpunn.load(tmp_path / "checkpoint.npz")
    np.testing.assert_array_equal(loaded.theta, net.theta)


def test_load_refuses_what_is_not_a_gpunn_model(tmp_path):
    np.savez(tmp_path / "other.npz", W1=np.zeros(3))
    with pytest.raises(gpunn.CheckpointError, match=r"other\.npz is damaged or not a gpunn model"):
        gpunn.load(tmp_path / "other.npz")
    with pytest.raises(gpunn.CheckpointError, match="no model at"):
        gpunn.load(tmp_path / "absent.npz")


def test_export_onnx_predicts_like_gpunn(tmp_path):
    need("onnx", "GPUNN_REQUIRE_ONNX", ORACLE)
    onnxruntime = need("onnxruntime", "GPUNN_REQUIRE_ONNX", ORACLE)
    net = gpunn.MLP([6, 8, 4], seed=3)
    X = np.random.default_rng(6).standard_normal((9, 6)).astype(np.float32)
    net.export_onnx(tmp_path / "net.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    logits, probabilities, label = session.run(["logits", "probabilities", "label"], {"X": X})
    np.testing.assert_allclose(logits, gpunn.to_numpy(net.forward(X)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities, gpunn.to_numpy(net.predict_proba(X)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(label, gpunn.to_numpy(net.predict(X)))
