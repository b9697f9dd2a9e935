"""Size and cost of a model: parameters, multiply-accumulates, node counts, bytes."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import onnx


@dataclass
class ModelStats:
    params: int
    macs: int
    nodes: int
    bytes: int
    ops: dict[str, int] = field(default_factory=dict)


def _float_params(model: onnx.ModelProto) -> tuple[int, dict[str, tuple[int, ...]]]:
    count, shapes = 0, {}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
        if t.data_type in float_types:
            count += math.prod(t.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in float_types:
                    count += math.prod(a.t.dims)
                    shapes[node.output[0]] = tuple(a.t.dims)
    return count, shapes


def count_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul at the given shapes."""
    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "Conv":
            w = shapes.get(node.input[1])
            if w:
                total += math.prod(out) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            w, x = shapes.get(node.input[1]), shapes.get(node.input[0])
            if w and x:
                total += math.prod(x) * math.prod(w[1:])
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if a:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[-2] if trans_a else a[-1]
                total += math.prod(out) * k
    return total


def model_stats(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> ModelStats:
    params, _ = _float_params(model)
    return ModelStats(
        params=params,
        macs=count_macs(model, shapes),
        nodes=len(model.graph.node),
        bytes=model.ByteSize(),
        ops=dict(Counter(n.op_type for n in model.graph.node)),
    )



__all__ = ["ModelStats", "model_stats", "count_macs"]
