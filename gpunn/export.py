"""Export a trained network to ONNX, so it can be served by any ONNX runtime without gpunn.

    from gpunn.export import export_onnx
    export_onnx(net, "mnist.onnx")              # needs the optional extra: pip install 'gpunn[onnx]'

The graph is the forward pass of model.py, one Gemm per layer (Algorithm 6.1 lines 4–5):

    X (n, U_0)                                              the input, one data point per row
    Z^(l) = Q^(l-1) W^(l)ᵀ + b^(l)ᵀ   Gemm(transB=1)         (n, U_l), W^(l) stored as (U_l, U_{l-1})
    Q^(l) = h(Z^(l))                  Relu | Sigmoid | Tanh  (n, U_l), none for the identity and layer L

and, from the logits Z^(L), the outputs of the task:

    classification  logits (n, M), probabilities (n, M) = softmax by rows (6.15), label int64 (n,)
    binary          logits (n, 1), probabilities (n, 2) = [1 − σ(z), σ(z)], label int64 (n,)
    regression      prediction (n, U_L)

The batch dimension is symbolic ("n"), so one file serves any number of rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy

from .backend import to_numpy
from .errors import GpunnError
from .files import write_atomic

# Opset 13 is the oldest in which every operator emitted here has its present definition (Softmax over
# one axis rather than over a flattened 2-D view, Squeeze taking its axes as an input), and it is
# old enough for the runtimes still in service: onnxruntime has run it since 1.6 (2020), as do
# TensorRT 8 and onnxruntime-web. A newer opset would add nothing this graph uses.
DEFAULT_OPSET = 13
MIN_OPSET = 13
_ACTIVATION_OPS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "identity": None}
_MISSING_ONNX = "exporting to ONNX needs the onnx package: pip install 'gpunn[onnx]'"


def export_onnx(net, path, opset: int | None = None) -> Path:
    """Write ``net`` (an MLP on any device) to ``path`` as an ONNX model; return the path.

    Input "X" (n, U_0) of the network's dtype. Outputs by task: classification "logits" (n, M),
    "probabilities" (n, M) and "label" (n,) int64, the first largest logit as numpy's argmax;
    binary "logits" (n, 1), "probabilities" (n, 2), one column per class, and "label" (n,) int64,
    1 where z > 0; regression "prediction" (n, U_L). The parameters are initializers W1, b1, … in
    the book's shapes, W^(l) (U_l, U_{l-1}) and b^(l) (U_l,).

    ``opset`` defaults to DEFAULT_OPSET (13); any from 13 to the installed onnx's newest may be asked
    for. The IR version is the oldest that carries that opset (7 for opset 13), so older runtimes load
    the file. The model passes onnx.checker before the file is written, and the file appears whole
    (a temporary file beside it, then renamed) or not at all. GpunnError if onnx is not installed;
    WriteError if the file cannot be written.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise GpunnError(_MISSING_ONNX) from exc
    from . import __version__  # here, not at the top: the package may import this module

    newest = onnx.defs.onnx_opset_version()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be from {MIN_OPSET} to {newest} (the installed onnx's newest); got {opset}"
        )

    sizes, task, act = net.sizes, net.task, net.activation.name
    elem = helper.np_dtype_to_tensor_dtype(net.dtype)
    initializers, nodes = [], []
    Q = "X"
    for l, (W, b) in enumerate(net.params, start=1):
        last = l == net.L
        Z = ("prediction" if task == "regression" else "logits") if last else f"Z{l}"
        for name, value in ((f"W{l}", W), (f"b{l}", b)):
            # C order for the raw bytes: θ's views of W are column-major
            initializers.append(numpy_helper.from_array(numpy.ascontiguousarray(to_numpy(value)), name))
        nodes.append(helper.make_node("Gemm", [Q, f"W{l}", f"b{l}"], [Z], name=f"gemm{l}", transB=1))
        Q = Z
        if not last and _ACTIVATION_OPS[act] is not None:
            Q = f"Q{l}"
            nodes.append(helper.make_node(_ACTIVATION_OPS[act], [Z], [Q], name=f"{act}{l}"))

    U_L = sizes[-1]
    if task == "classification":
        nodes += [
            helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
            helper.make_node(
                "ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0, select_last_index=0
            ),
        ]
        outputs = [("logits", elem, U_L), ("probabilities", elem, U_L), ("label", TensorProto.INT64, None)]
    elif task == "binary":
        initializers += [
            numpy_helper.from_array(numpy.zeros((), net.dtype), "zero"),
            numpy_helper.from_array(numpy.ones((), net.dtype), "one"),
            numpy_helper.from_array(numpy.array([1], numpy.int64), "column_axis"),
        ]
        nodes += [
            helper.make_node("Sigmoid", ["logits"], ["p1"], name="sigmoid"),
            # 1 − σ(z) rather than σ(−z): onnxruntime's Sigmoid is accurate in absolute terms only (it
            # flushes σ(−30) to 0 in float32), so σ(−z) would cost a second pass and gain nothing
            helper.make_node("Sub", ["one", "p1"], ["p0"], name="complement"),
            helper.make_node("Concat", ["p0", "p1"], ["probabilities"], name="concat", axis=1),
            helper.make_node("Greater", ["logits", "zero"], ["positive"], name="greater"),
            helper.make_node("Squeeze", ["positive", "column_axis"], ["positive_rows"], name="squeeze"),
            helper.make_node("Cast", ["positive_rows"], ["label"], name="cast", to=TensorProto.INT64),
        ]
        outputs = [("logits", elem, 1), ("probabilities", elem, 2), ("label", TensorProto.INT64, None)]
    else:
        outputs = [("prediction", elem, U_L)]

    arch = "-".join(map(str, sizes))
    graph = helper.make_graph(
        nodes,
        f"gpunn_mlp_{arch.replace('-', '_')}",
        [helper.make_tensor_value_info("X", elem, ["n", sizes[0]], "inputs, one data point per row")],
        [helper.make_tensor_value_info(name, t, ["n"] if u is None else ["n", u]) for name, t, u in outputs],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="gpunn",
        producer_version=__version__,
        doc_string=(
            f"gpunn MLP {arch}: {net.L} dense layer(s), hidden activation {act}, task {task}, "
            f"{net.dtype.name}; outputs {', '.join(name for name, _, _ in outputs)}"
        ),
    )
    helper.set_model_props(model, {"gpunn.sizes": arch, "gpunn.activation": act, "gpunn.task": task})
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    data = model.SerializeToString()
    write_atomic(path, lambda f: f.write(data))
    return path
