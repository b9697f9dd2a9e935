"""Which nodes the backward pass goes through: those on a path from the data input to the
loss target along which a gradient can flow (float tensors, differentiable ops)."""

from __future__ import annotations

from typing import NamedTuple

import onnx
from onnx import TensorProto

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.static import StaticInfo

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# Ops whose outputs carry no gradient even when an input depends on the data input.
_NON_DIFFERENTIABLE = frozenset(
    "Shape Size Equal Greater Less GreaterOrEqual LessOrEqual Not And Or Xor ArgMax ArgMin "
    "NonZero Sign Floor Ceil Round IsNaN IsInf ConstantOfShape EyeLike RandomNormalLike "
    "RandomUniformLike Bernoulli Multinomial NonMaxSuppression".split()
)
_NON_DIFFERENTIABLE_OUTPUTS = {"MaxPool": (1,), "Dropout": (1,), "TopK": (1,)}


class BackwardPath(NamedTuple):
    """The nodes to differentiate, last first, and the tensors that need a gradient."""

    nodes: list[onnx.NodeProto]
    needed: set[str]


def _active(static: StaticInfo) -> set[str]:
    """Float tensors that depend on the data input through differentiable ops."""
    active = {static.x}
    for node in static.model.graph.node:
        if node.op_type in _NON_DIFFERENTIABLE or not any(i in active for i in node.input if i):
            continue
        if node.op_type == "Cast" and attrs(node).get("to") not in _FLOAT_TYPES:
            continue
        skip = _NON_DIFFERENTIABLE_OUTPUTS.get(node.op_type, ())
        for k, o in enumerate(node.output):
            elem = static.types.get(o, (0, None))[0]
            if o and k not in skip and (not elem or elem in _FLOAT_TYPES):
                active.add(o)
    return active


def backward_path(static: StaticInfo, target: str) -> BackwardPath:
    """The nodes between the data input and ``target``, in reverse topological order."""
    active = _active(static)
    if target not in active:
        raise GradientUnsupported("the model output does not depend on its input")
    needed, nodes = {target}, []
    for node in reversed(static.model.graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i in active)
    return BackwardPath(nodes, needed)
