"""ONNX export: the exported graph, run by onnxruntime, computes what gpunn computes.

The tests that need onnx (gpunn's optional extra 'onnx') or onnxruntime skip with the reason where either
is missing; CI sets GPUNN_REQUIRE_ONNX=1, which turns that skip into a failure.

Tolerances (rtol = atol, so small values are held to an absolute bound): 1e-5 in float32, 1e-12 in
float64. gpunn's matmul (NumPy's BLAS) and onnxruntime's Gemm (MLAS) sum in different orders, and
onnxruntime evaluates Sigmoid and Tanh by its own approximations, accurate in absolute terms only
(about 1.7e-7 in float32). Measured over every case here with 200 rows and 5 seeds, the largest
difference relative to 1 + |value| was 3.5e-7 (3 float32 ulp) and 1.0e-15 (5 float64 ulp); the bounds
leave a margin of 30x and 1000x for other BLAS libraries and CPUs, and stay far below what a real
mistake makes (a lost bias, a transposed W or a wrong activation moves values by O(0.1)).
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys

import numpy as np
import pytest

import gpunn
from gpunn.errors import GpunnError, WriteError
from gpunn.export import DEFAULT_OPSET, export_onnx

TOL = {"float32": 1e-5, "float64": 1e-12}
INPUTS = 5
HIDDEN = (7, 6)
OUTPUTS = {"classification": 4, "binary": 1, "regression": 3}
OUTPUT_NAMES = {
    "classification": ["logits", "probabilities", "label"],
    "binary": ["logits", "probabilities", "label"],
    "regression": ["prediction"],
}


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("GPUNN_REQUIRE_ONNX") == "1":
            pytest.fail(f"GPUNN_REQUIRE_ONNX=1 but {module} cannot be imported: {exc}")
        pytest.skip(f"{module} cannot be imported ({exc}): pip install 'gpunn[onnx]' onnxruntime")


@pytest.fixture(scope="session")
def onnx():
    return _require("onnx")


@pytest.fixture(scope="session")
def ort():
    return _require("onnxruntime")


def run_onnx(ort, path, X) -> dict[str, np.ndarray]:
    """Every output of the model at ``path`` for inputs X, by name, from onnxruntime's CPU provider."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # the test machine's cores are shared
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(None, {"X": X})))


def make_net(task, activation, L, dtype, seed=0, device="cpu") -> gpunn.MLP:
    """An MLP [5, 7, 6, …, U_L] with random, non-zero biases (the initial b^(l) are all 0)."""
    sizes = [INPUTS, *HIDDEN[: L - 1], OUTPUTS[task]]
    net = gpunn.MLP(sizes, activation=activation, task=task, dtype=dtype, seed=seed, device=device)
    rng = np.random.default_rng(seed + 1)
    for _, b in net.params:
        b[...] = net.device.asarray(rng.standard_normal(b.shape), dtype=net.dtype)
    return net


def softmax(Z):
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def expected(net, X) -> dict[str, np.ndarray]:
    """gpunn's outputs under the export's names: logits/prediction by net.forward, the rest by NumPy."""
    Z = gpunn.to_numpy(net.forward(X))
    if net.task == "regression":
        return {"prediction": Z}
    if net.task == "classification":
        return {"logits": Z, "probabilities": softmax(Z), "label": Z.argmax(axis=1)}
    t = np.tanh(Z / 2)  # σ(z) = (1 + tanh(z/2))/2 and 1 − σ(z) = (1 − tanh(z/2))/2
    return {"logits": Z, "probabilities": np.hstack([(1 - t) / 2, (1 + t) / 2]), "label": (Z[:, 0] > 0) * 1}


def clear_rows(net, Z, tol) -> np.ndarray:
    """(n,) True where the label is decided by more than rounding: no near-tie at the decision."""
    if net.task == "binary":
        return np.abs(Z[:, 0]) > 100 * tol
    top2 = np.sort(Z, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > 100 * tol * np.maximum(1, np.abs(top2[:, 1]))


CASES = list(itertools.product(OUTPUTS, ["relu", "sigmoid", "tanh", "identity"], [1, 2, 3], TOL))


@pytest.mark.parametrize(
    ("task", "activation", "L", "dtype"), CASES, ids=["-".join(map(str, c)) for c in CASES]
)
def test_onnxruntime_computes_what_gpunn_computes(task, activation, L, dtype, tmp_path, ort):
    net = make_net(task, activation, L, dtype, seed=L)
    path = export_onnx(net, tmp_path / "net.onnx")
    X = (2 * np.random.default_rng(L).standard_normal((37, INPUTS))).astype(dtype)
    tol = TOL[dtype]
    for rows in (X[:1], X):  # one file, any batch size: the batch dimension is symbolic
        got, want = run_onnx(ort, path, rows), expected(net, rows)
        assert list(got) == OUTPUT_NAMES[task]
        for name, value in want.items():
            assert got[name].shape == value.shape, name
            if name == "label":
                assert got[name].dtype == np.int64
                clear = clear_rows(net, want["logits"], tol)
                assert clear.mean() > 0.9  # so that the comparison below is not vacuous
                np.testing.assert_array_equal(got[name][clear], value[clear])
            else:
                assert got[name].dtype == net.dtype, name
                np.testing.assert_allclose(got[name], value, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("task", list(OUTPUTS))
@pytest.mark.parametrize("dtype", list(TOL))
def test_the_model_declares_its_inputs_outputs_and_parameters(task, dtype, tmp_path, onnx, ort):
    net = make_net(task, "tanh", 3, dtype)
    path = export_onnx(net, str(tmp_path / "net.onnx"))
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    M = OUTPUTS[task]

    def declared(value_info):
        t = value_info.type.tensor_type
        return value_info.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    assert [declared(v) for v in model.graph.input] == [("X", elem, ["n", INPUTS])]
    want = {
        "classification": [("logits", elem, ["n", M]), ("probabilities", elem, ["n", M])],
        "binary": [("logits", elem, ["n", 1]), ("probabilities", elem, ["n", 2])],
        "regression": [("prediction", elem, ["n", M])],
    }[task]
    if task != "regression":
        want.append(("label", onnx.TensorProto.INT64, ["n"]))
    assert [declared(v) for v in model.graph.output] == want

    gemms = [node for node in model.graph.node if node.op_type == "Gemm"]
    assert len(gemms) == net.L
    assert all(
        onnx.helper.get_attribute_value(a) == 1 for g in gemms for a in g.attribute if a.name == "transB"
    )
    assert [node.op_type for node in model.graph.node].count("Tanh") == net.L - 1
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, value in net.state().items():  # W^(l) in the book's shape (U_l, U_{l-1}), bit for bit
        assert weights[name].shape == value.shape and weights[name].dtype == value.dtype
        np.testing.assert_array_equal(weights[name], value)

    assert (model.producer_name, model.producer_version) == ("gpunn", gpunn.__version__)
    assert f"MLP 5-7-6-{M}" in model.doc_string and "tanh" in model.doc_string and task in model.doc_string
    assert [(o.domain, o.version) for o in model.opset_import] == [("", DEFAULT_OPSET)]
    assert model.ir_version == 7  # the IR version that introduced opset 13, so older runtimes load it

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_type = {"float32": "tensor(float)", "float64": "tensor(double)"}[dtype]
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [("X", ["n", INPUTS], ort_type)]
    assert [o.name for o in session.get_outputs()] == OUTPUT_NAMES[task]


def test_ties_go_to_the_first_class_as_in_numpy(tmp_path, ort):
    net = make_net("classification", "relu", 2, "float64")
    W, b = net.params[-1]
    W[...] = 0
    b[...] = [0.5, 2.0, 2.0, 2.0]  # classes 1, 2 and 3 tie for every row
    X = np.random.default_rng(0).standard_normal((3, INPUTS))
    got = run_onnx(ort, export_onnx(net, tmp_path / "tie.onnx"), X)
    np.testing.assert_array_equal(got["label"], gpunn.to_numpy(net.predict(X)))
    np.testing.assert_array_equal(got["label"], [1, 1, 1])


def test_a_zero_logit_is_class_0_with_even_odds(tmp_path, ort):
    net = make_net("binary", "sigmoid", 2, "float32")
    W, b = net.params[-1]
    W[...], b[...] = 0, 0
    got = run_onnx(ort, export_onnx(net, tmp_path / "zero.onnx"), np.ones((2, INPUTS), np.float32))
    np.testing.assert_array_equal(got["label"], [0, 0])
    np.testing.assert_array_equal(got["probabilities"], np.full((2, 2), 0.5, np.float32))


@pytest.mark.parametrize("task", ["classification", "binary"])
def test_huge_logits_give_finite_probabilities(task, tmp_path, ort):
    net = make_net(task, "identity", 1, "float32")
    W = net.params[0][0]
    W[...] = 0
    W[:, 0] = 1000 * np.arange(1, OUTPUTS[task] + 1)  # e^1000 overflows: a softmax must shift first
    X = np.array([[1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]], np.float32)
    got = run_onnx(ort, export_onnx(net, tmp_path / "huge.onnx"), X)
    P = got["probabilities"]
    assert np.isfinite(P).all()
    np.testing.assert_allclose(P, expected(net, X)["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(got["label"], gpunn.to_numpy(net.predict(X)))


def test_parameters_come_from_any_device(device, tmp_path, ort):
    net = make_net("regression", "relu", 2, "float32", device=device)
    X = np.random.default_rng(3).standard_normal((4, INPUTS)).astype(np.float32)
    got = run_onnx(ort, export_onnx(net, tmp_path / "net.onnx"), X)
    np.testing.assert_allclose(got["prediction"], expected(net, X)["prediction"], rtol=1e-5, atol=1e-5)


def test_an_asked_for_opset_is_used_and_one_too_old_refused(tmp_path, onnx, ort):
    net = make_net("classification", "sigmoid", 2, "float32")
    model = onnx.load(export_onnx(net, tmp_path / "net17.onnx", opset=17))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.ir_version == 8
    X = np.random.default_rng(4).standard_normal((5, INPUTS)).astype(np.float32)
    got = run_onnx(ort, tmp_path / "net17.onnx", X)
    np.testing.assert_allclose(got["probabilities"], expected(net, X)["probabilities"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="opset must be from 13"):
        export_onnx(net, tmp_path / "net12.onnx", opset=12)
    assert not (tmp_path / "net12.onnx").exists()


def test_the_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, onnx):
    net = make_net("regression", "tanh", 2, "float64")
    path = tmp_path / "net.onnx"
    path.write_bytes(b"the old model")
    assert export_onnx(net, path) == path
    onnx.checker.check_model(onnx.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]  # no temporary file left behind

    new = path.read_bytes()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gpunn.files.os.replace", fail)
    with pytest.raises(WriteError, match=r"cannot write .*net\.onnx: No space left on device"):
        export_onnx(make_net("regression", "relu", 2, "float64", seed=9), path)
    assert path.read_bytes() == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_missing_onnx_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(GpunnError) as info:
        export_onnx(make_net("classification", "relu", 1, "float32"), tmp_path / "net.onnx")
    assert str(info.value) == "exporting to ONNX needs the onnx package: pip install 'gpunn[onnx]'"
    assert not list(tmp_path.iterdir())
