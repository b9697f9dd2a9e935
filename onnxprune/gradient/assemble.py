"""The gradient model's final form: forward and backward nodes pruned to what ``loss`` and
``input_grad`` need, the data input plus ``labels`` as inputs."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from onnxprune.gradient.loss import INPUT_GRAD, LABELS, LOSS
from onnxprune.gradient.protos import graph_refs
from onnxprune.ir.runtime import copy_without


def _needed_nodes(nodes: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes LOSS and INPUT_GRAD depend on, in order, and every name they read."""
    need, keep = {LOSS, INPUT_GRAD}, []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    need |= graph_refs(sub)
    keep.reverse()
    return keep, need


def assemble(model: onnx.ModelProto, x: str, new_nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto],
             loss_elem: int) -> onnx.ModelProto:
    """``model`` with ``new_nodes``/``new_inits`` appended, inputs ``x`` and LABELS, outputs
    LOSS (of element type ``loss_elem``) and INPUT_GRAD, and nothing they do not need."""
    g = model.graph
    keep, need = _needed_nodes(list(g.node) + new_nodes)
    x_vi = next(v for v in g.input if v.name == x)
    dims = x_vi.type.tensor_type.shape.dim if x_vi.type.tensor_type.HasField("shape") else []
    batch = (dims[0].dim_value or dims[0].dim_param or "N") if len(dims) else "N"
    labels = helper.make_tensor_value_info(LABELS, TensorProto.INT64, [batch])
    loss = helper.make_tensor_value_info(LOSS, loss_elem, [batch])
    grad = onnx.ValueInfoProto()
    grad.CopyFrom(x_vi)
    grad.name = INPUT_GRAD
    inputs = [v for v in g.input if v.name == x or v.name in need] + [labels]
    inits = [t for t in list(g.initializer) + new_inits if t.name in need]
    value_info = [v for v in g.value_info if v.name in need]
    # Everything but the graph copied from ``model``, the graph filled in place: copying the
    # model whole and then a made graph over it held three copies of the weights at once.
    out = copy_without(model, "graph")
    graph = out.graph
    graph.name = g.name or "gradient"
    graph.node.extend(keep)
    graph.input.extend(inputs)
    graph.output.extend([loss, grad])
    graph.initializer.extend(inits)
    graph.value_info.extend(value_info)
    return out
