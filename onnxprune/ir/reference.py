"""Small protobuf-level services the graph passes need: element types, a model template for a
graph's opsets, and evaluating one node on constants with onnx's reference evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator


def np_dtype(onnx_type: int) -> np.dtype:
    """The numpy type of an ONNX element type (``Cast``'s ``to``, a tensor's ``elem_type``)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(int(onnx_type)))


def template_for(graph: gs.Graph) -> onnx.ModelProto:
    """An empty model carrying ``graph``'s opset imports (for :func:`~onnxprune.ir.skeleton`)."""
    opsets = list(graph.import_domains or [helper.make_opsetid("", graph.opset)])
    template = helper.make_model(helper.make_graph([], "template", [], []), opset_imports=opsets)
    template.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    return template


def evaluate_node(node: gs.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
    """``node``'s outputs on constant ``inputs`` (None: an absent optional input)."""
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    attrs = {k: (numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, gs.Constant) else v)
             for k, v in node.attrs.items()}
    proto = helper.make_node(node.op, names, [f"out{i}" for i in range(len(node.outputs))],
                             domain=node.domain or "", **attrs)
    feeds = {n: v for n, v in zip(names, inputs) if n}
    return [np.asarray(v) for v in ReferenceEvaluator(proto).run(None, feeds)]
