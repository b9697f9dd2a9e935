"""Size and cost of a model: parameters, multiply-accumulates, node counts, bytes."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import onnx

from onnxprune.ir.runtime import serialized_size


@dataclass
class ModelStats:
    params: int
    macs: int
    nodes: int
    bytes: int
    ops: dict[str, int] = field(default_factory=dict)


def _graphs(graph: onnx.GraphProto):
    """The graph and its subgraphs (If branches, Loop and Scan bodies), at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(sub)


#: Integer ops whose input 1 is a weight (dynamically quantized models).
_INTEGER_WEIGHTS = ("ConvInteger", "MatMulInteger")


def _float_params(model: onnx.ModelProto) -> int:
    """Float weights in initializers and Constant nodes (shape tensors are not parameters), and
    the integer weights of quantized ConvInteger / MatMulInteger, in every graph: a model with a
    network per If branch holds its weights there."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    count = 0
    for graph in _graphs(model.graph):
        integer = {n.input[1] for n in graph.node if n.op_type in _INTEGER_WEIGHTS and len(n.input) > 1}
        count += sum(math.prod(t.dims) for t in graph.initializer if t.data_type in float_types or t.name in integer)
        for node in graph.node:
            if node.op_type == "Constant":
                count += sum(math.prod(a.t.dims) for a in node.attribute
                             if a.name == "value" and a.t.data_type in float_types)
    return count


#: The ops whose multiply-accumulates :func:`node_macs` counts: the report's and the budgets'.
MAC_OPS = ("Conv", "ConvInteger", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger")


def node_macs(op: str, inputs: list[tuple[int, ...] | None], output: tuple[int, ...] | None,
              trans_a: bool = False) -> int | None:
    """Multiply-accumulates of one Conv, ConvTranspose, Gemm or MatMul (or their integer forms)
    from its shapes (None
    for other ops or unknown shapes). The one formula both the report and budgets use."""
    if output is None or len(inputs) < 2:
        return None
    x, w = inputs[0], inputs[1]
    if op in ("Conv", "ConvInteger") and w:
        return math.prod(output) * math.prod(w[1:])
    if op == "ConvTranspose" and w and x:
        return math.prod(x) * math.prod(w[1:])
    if op in ("Gemm", "MatMul", "MatMulInteger") and x:
        return math.prod(output) * (x[-2] if trans_a else x[-1])
    return None


def count_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul at the given shapes (every
    If branch counted, where its shapes are known)."""
    total = 0
    for node in (n for graph in _graphs(model.graph) for n in graph.node):
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        macs = node_macs(node.op_type, [shapes.get(i) for i in node.input],
                         shapes.get(node.output[0]) if node.output else None, trans_a)
        total += macs or 0
    return total


def model_stats(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> ModelStats:
    return ModelStats(
        params=_float_params(model),
        macs=count_macs(model, shapes),
        nodes=len(model.graph.node),
        bytes=serialized_size(model),
        ops=dict(Counter(n.op_type for n in model.graph.node)),
    )



__all__ = ["MAC_OPS", "ModelStats", "model_stats", "count_macs"]
