"""Small readers of ONNX protos shared by the gradient modules."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values (strings decoded)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def op_key(node: onnx.NodeProto) -> str:
    """The key of a node's backward rule: the op type, prefixed by any non-default domain."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, whichever attribute holds it."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def graph_refs(graph: onnx.GraphProto) -> set[str]:
    """Every name a (sub)graph reads, so that pruning keeps outer-scope producers."""
    refs = set()
    for n in graph.node:
        refs.update(i for i in n.input if i)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                refs |= graph_refs(sub)
    return refs
