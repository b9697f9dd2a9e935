"""BatchNorm folded away: the same network as many exporters ship it, without the statistics.

A BatchNormalization right after a Conv or Gemm (its only consumer) is folded into that
layer's weights and bias; any other (a DenseNet's pre-activation BN on a concatenation) becomes
a per-channel Mul and Add. The folded model computes the same function (to float rounding)
but carries no running statistics, so data-free inversion cannot match them: it is what the
validation zoo's VGG is, and ``--fold-batchnorm`` in bench/validation.py and bench/run.py makes
such a variant of every net, so that evidence for BatchNorm-free nets can be tuned on
``models/`` and checked on the zoo.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.ir import toposort_nodes


def fold_batchnorm(model: onnx.ModelProto, keep_every: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` with every inference BatchNormalization folded or made affine;
    ``keep_every`` k > 0 keeps every k-th of them (in graph order) as it is: a partly folded
    net, as an exporter leaves one that folds only some patterns (PP-OCRv4's detector keeps 3
    BatchNorms of 62 convs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    _constants_as_initializers(graph)
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {o: node for node in graph.node for o in node.output}
    kept, added, seen = [], [], 0
    for node in graph.node:
        if node.op_type != "BatchNormalization" or not all(n in inits for n in node.input[1:5]):
            kept.append(node)
            continue
        seen += 1
        if keep_every and seen % keep_every == 1 % keep_every:
            kept.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in node.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        layer = producer.get(node.input[0])
        if layer is not None and consumers.get(node.input[0]) == 1 and _fold_into(layer, inits, graph, scale, shift):
            layer.output[0] = node.output[0]
            continue
        added.extend(_affine(node, scale, shift, graph))
    del graph.node[:]
    graph.node.extend(toposort_nodes(kept + added, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    used = {n for node in graph.node for n in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out


def _constants_as_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes (a tensor ``value``) and Identities of initializers (the TorchScript
    exporter's shared zeros) become initializers, so every parameter is looked up in one place."""
    nodes = []
    arrays = {t.name: t for t in graph.initializer}
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Identity" and node.input[0] in arrays:
            value = arrays[node.input[0]]
        if node.op_type in ("Constant", "Identity") and value is not None:
            arrays[node.output[0]] = numpy_helper.from_array(numpy_helper.to_array(value), node.output[0])
            graph.initializer.append(arrays[node.output[0]])
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _fold_into(layer: onnx.NodeProto, inits: dict, graph: onnx.GraphProto, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Scale ``layer``'s output channels and add ``shift`` to its bias; False when it cannot."""
    if layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 2 or layer.input[1] not in inits:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in layer.attribute}
    if layer.op_type == "Gemm" and (not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0):
        return False
    w = numpy_helper.to_array(inits[layer.input[1]]).astype(np.float64)
    bias = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64) if len(layer.input) > 2 and \
        layer.input[2] in inits else np.zeros(w.shape[0])
    w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    bias = bias * scale + shift
    name = layer.output[0]
    graph.initializer.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}_folded_w"),
                              numpy_helper.from_array(bias.astype(np.float32), f"{name}_folded_b")])
    del layer.input[1:]
    layer.input.extend([f"{name}_folded_w", f"{name}_folded_b"])
    return True


def _affine(node: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray, graph: onnx.GraphProto) -> list:
    """``x * scale + shift`` per channel (axis 1) in place of ``node``."""
    rank = _rank(graph, node.input[0])
    shape = (-1, *([1] * max(rank - 2, 0)))
    name = node.output[0]
    graph.initializer.extend([numpy_helper.from_array(scale.reshape(shape).astype(np.float32), f"{name}_scale"),
                              numpy_helper.from_array(shift.reshape(shape).astype(np.float32), f"{name}_shift")])
    mul = onnx.helper.make_node("Mul", [node.input[0], f"{name}_scale"], [f"{name}_scaled"], name=f"{node.name}_mul")
    add = onnx.helper.make_node("Add", [f"{name}_scaled", f"{name}_shift"], [name], name=f"{node.name}_add")
    return [mul, add]


def _rank(graph: onnx.GraphProto, tensor: str) -> int:
    inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", 17)]))
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        if v.name == tensor and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return 4
