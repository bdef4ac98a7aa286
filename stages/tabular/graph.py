"""One ONNX graph for the network and gradient boosting together (export writes it; serving
runs it with onnxruntime alone, as any other model.onnx).

The boosting model is converted by skl2onnx (onnxruntime's TreeEnsemble operators, opset
`ai.onnx.ml`); its nodes are added to the network's exported graph under a `boosting_`
prefix, reading the same `input`; a few nodes then mix the two (stages/tabular/ensemble.py
`combine`, in float32): a classifier's `output` is
log(max(w_net * softmax(logits) + w_boost * probabilities, eps)) / temperature, a
regressor's w_net * value + w_boost * value. The network's `features` output stays, so the
card's IO contract (input, output, features) is the one a network alone has. Hand-built
rather than onnx.compose.merge_models: that joins one graph's outputs to the next one's
inputs, and here two graphs sit side by side on one input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stages.tabular.ensemble import EPS

PREFIX = "boosting_"


def boosting_graph(boosting, n_features: int, opset: int) -> onnx.ModelProto:
    """skl2onnx's graph of the fitted HistGradientBoosting: input `input` (float32), outputs
    (label, probabilities) without ZipMap (classifier) or `variable` (regressor)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    _ints_not_bools()
    classify = hasattr(boosting, "classes_")
    graph = convert_sklearn(
        boosting,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        target_opset={"": opset, "ai.onnx.ml": 3},
        options={id(boosting): {"zipmap": False, "raw_scores": True}} if classify else None,
    )
    return _probabilities(graph, binary=len(boosting.classes_) == 2) if classify else graph


def _probabilities(graph: onnx.ModelProto, binary: bool) -> onnx.ModelProto:
    """The classifier's raw scores turned into scikit-learn's predict_proba by a Softmax.

    Not TreeEnsembleClassifier's own LOGISTIC transform: onnxruntime computes it as 1 - p in
    float32, so a binary model's small probabilities come out in steps of 6e-8 (1.2e-7 where
    scikit-learn says 6.5e-8), and the served graph's log-probabilities then differ by up to
    0.4. Softmax is exact there. A binary model's raw scores are (-s, s) for the positive
    score s, and softmax(-s/2, s/2) = (1 - sigmoid(s), sigmoid(s)); a multiclass model's
    probabilities are the softmax of its scores."""
    g = graph.graph
    raw = g.output[-1].name  # (label, scores)
    for node in g.node:
        node.output[:] = [raw + "_raw" if o == raw else o for o in node.output]
    scale = numpy_helper.from_array(np.array(0.5 if binary else 1.0, np.float32), raw + "_scale")
    g.initializer.append(scale)
    g.node.extend(
        [
            helper.make_node("Mul", [raw + "_raw", scale.name], [raw + "_scaled"]),
            helper.make_node("Softmax", [raw + "_scaled"], [raw], axis=-1),
        ]
    )
    return graph


def _ints_not_bools() -> None:
    """skl2onnx 1.20 passes Python's False as a leaf's nodes_missing_value_tracks_true, an
    INTS attribute, which onnx 1.23's protobuf refuses ("Expected an int, got a boolean"):
    its HistGradientBoosting converter then fails on every model. Wrap the one function that
    appends it so the value is an int (0/1, as the ONNX spec says). Idempotent."""
    from skl2onnx.common import tree_ensemble

    add_node = tree_ensemble.add_node
    if getattr(add_node, "ints_not_bools", False):
        return

    def patched(*args, nodes_missing_value_tracks_true=0, **kwargs):
        flag = int(nodes_missing_value_tracks_true)
        return add_node(*args, nodes_missing_value_tracks_true=flag, **kwargs)

    patched.ints_not_bools = True
    tree_ensemble.add_node = patched


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def merge(
    net: onnx.ModelProto,
    boosting,
    weights: dict[str, float],
    temperature: float | None,
    classify: bool,
    n_features: int,
    width: int,
) -> onnx.ModelProto:
    """The network's graph (outputs `output`, `features`) with the boosting model beside it:
    `output` becomes the served mix (module docstring), of shape (batch, width)."""
    boost = onnx.compose.add_prefix(boosting_graph(boosting, n_features, _opset(net)), PREFIX)
    g = net.graph
    # The network's output becomes an inner tensor; the mix takes its name.
    for node in g.node:
        node.output[:] = ["network_output" if o == "output" else o for o in node.output]
    for node in boost.graph.node:
        node.input[:] = ["input" if i == PREFIX + "input" else i for i in node.input]
    g.node.extend(boost.graph.node)
    g.initializer.extend(boost.graph.initializer)
    boost_out = boost.graph.output[-1 if classify else 0].name  # (label, probabilities)
    consts = {"w_network": weights.get("network", 0.0), "w_boosting": weights.get("boosting", 0.0)}
    if classify:  # (an unused initializer makes onnxruntime warn at every session start)
        consts.update(eps=EPS, inv_temperature=1.0 / (temperature or 1.0))
    g.initializer.extend(
        numpy_helper.from_array(np.array(v, dtype=np.float32), name=k) for k, v in consts.items()
    )
    net_term = "network_output"
    nodes = []
    if classify:
        nodes.append(helper.make_node("Softmax", ["network_output"], ["network_p"], axis=-1))
        net_term = "network_p"
    nodes += [
        helper.make_node("Mul", [net_term, "w_network"], ["network_part"]),
        helper.make_node("Mul", [boost_out, "w_boosting"], ["boosting_part"]),
        helper.make_node("Add", ["network_part", "boosting_part"], ["mixed"]),
    ]
    if classify:
        nodes += [
            helper.make_node("Max", ["mixed", "eps"], ["clipped"]),
            helper.make_node("Log", ["clipped"], ["log_p"]),
            helper.make_node("Mul", ["log_p", "inv_temperature"], ["output"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["mixed"], ["output"]))
    g.node.extend(nodes)
    # Shapes of the old output are no longer right for an inner tensor: let onnxruntime infer.
    del g.value_info[:]
    out = next(o for o in g.output if o.name == "output")
    out.type.tensor_type.elem_type = TensorProto.FLOAT
    del out.type.tensor_type.shape.dim[:]
    out.type.tensor_type.shape.dim.add().dim_param = "batch"
    out.type.tensor_type.shape.dim.add().dim_value = width
    have = {o.domain for o in net.opset_import}
    net.opset_import.extend(o for o in boost.opset_import if o.domain not in have)
    onnx.checker.check_model(net)
    return net
