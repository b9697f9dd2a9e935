"""Lowering: make a model's weights plain, single-use constants before analysis.

Exporters hide weights behind ``Constant`` nodes (PaddlePaddle, Caffe2), ``ConstantOfShape``
(Caffe2's "light" models), ``Identity``/``Cast``/``Unsqueeze`` chains (TorchScript, old
BatchNorm decompositions). The coupling rules only understand constants they can slice, so
every node whose inputs are all constants is evaluated once, here. A weight read by several
nodes is copied so that each user can be sliced on its own (:class:`DedupeConstants` merges
copies that stayed equal at the end).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ir import evaluate_node, np_dtype
from onnxprune.pass_infra import GraphPass, PassResult

logger = logging.getLogger(__name__)

#: Folding would lose meaning (quantisation, randomness) or explode the file.
_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform",
               "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_MAX_FOLD_ELEMENTS = 64 * 2**20


def _const_attr(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def _axes(node: gs.Node, inputs: list, slot: int) -> list[int] | None:
    if len(inputs) > slot and inputs[slot] is not None:
        return [int(a) for a in np.asarray(inputs[slot]).ravel()]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _numpy_fold(node: gs.Node, inputs: list) -> list[np.ndarray] | None:
    """Fast paths for the ops exporters put on weight paths; None means "ask the reference"."""
    op, x = node.op, inputs[0] if inputs else None
    if op == "Constant":
        value = _const_attr(node)
        return None if value is None else [value]
    if op == "ConstantOfShape":
        fill = node.attrs.get("value", np.zeros(1, np.float32))  # the spec's default: float zeros
        fill = np.asarray(fill.values if isinstance(fill, gs.Constant) else fill)
        return [np.full(tuple(int(d) for d in x), fill.ravel()[0], dtype=fill.dtype)]
    if op == "Identity":
        return [x]
    if op == "Cast":
        return [x.astype(np_dtype(node.attrs["to"]))]
    if op == "Unsqueeze":
        out = x
        for a in sorted(a % (x.ndim + len(_axes(node, inputs, 1))) for a in _axes(node, inputs, 1)):
            out = np.expand_dims(out, a)
        return [out]
    if op == "Squeeze":
        axes = _axes(node, inputs, 1)
        return [np.squeeze(x, axis=None if axes is None else tuple(axes))]
    if op == "Transpose":
        return [np.transpose(x, node.attrs.get("perm"))]
    if op in ("Add", "Sub", "Mul", "Div") and len(inputs) == 2:
        a, b = inputs
        if op == "Div" and np.issubdtype(a.dtype, np.integer):
            return None
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        return [fn(a, b).astype(a.dtype)]
    if op in ("Sqrt", "Reciprocal", "Neg"):
        fn = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative}[op]
        return [fn(x).astype(x.dtype)]
    return None


class FoldConstants(GraphPass):
    """Evaluate every node whose inputs are all constants and replace it by its values."""

    def call(self, graph: gs.Graph) -> PassResult:
        modified = False
        graph_outputs = {t.name for t in graph.outputs}
        for node in list(graph.nodes):
            if node.op in _NEVER_FOLD or node.domain not in (None, "", "ai.onnx"):
                continue
            if any(o.name in graph_outputs for o in node.outputs):
                continue
            if not all(isinstance(t, gs.Constant) or (t.name == "" and not t.inputs) for t in node.inputs):
                continue
            if node.op != "Constant" and not node.inputs:
                continue
            inputs = [np.asarray(t.values) if isinstance(t, gs.Constant) else None for t in node.inputs]
            try:
                outputs = _numpy_fold(node, inputs)
                if outputs is None:
                    outputs = evaluate_node(node, inputs)
            except Exception as exc:  # an op the reference cannot evaluate stays a node
                logger.debug("cannot fold %s (%s): %s", node.name, node.op, exc)
                continue
            if sum(o.size for o in outputs) > _MAX_FOLD_ELEMENTS:
                continue
            for tensor, value in zip(node.outputs, outputs):
                tensor.to_constant(np.array(value, order="C"))  # (ascontiguousarray makes scalars 1-D)
            node.outputs.clear()
            modified = True
        if modified:
            graph.cleanup()
        return PassResult(graph, modified)


class UnshareWeights(GraphPass):
    """Give every non-scalar constant a single user, copying it for each extra use.

    Slicing a weight for one consumer must not slice it for another one in a different
    group (onnxsim's pruner breaks exactly on shared initializers).
    """

    def call(self, graph: gs.Graph) -> PassResult:
        return PassResult(graph, unshare_constants(graph.nodes, set(graph.tensors())))


def unshare_constants(nodes, taken: set[str]) -> bool:
    """Give every reader of a constant (of more than one element) after the first its own copy,
    named apart from ``taken`` (which grows); whether anything was copied."""
    seen: set[str] = set()
    modified = False
    for node in nodes:
        for slot, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or tensor.values.size <= 1:
                continue
            if tensor.name not in seen:
                seen.add(tensor.name)
                continue
            copy_name, k = f"{tensor.name}__copy", 1
            while copy_name in taken:
                copy_name, k = f"{tensor.name}__copy{k}", k + 1
            taken.add(copy_name)
            node.inputs[slot] = gs.Constant(copy_name, np.array(tensor.values, copy=True))
            modified = True
    return modified


class DedupeConstants(GraphPass):
    """Merge constants with equal dtype, shape and bytes (undoes copies that stayed equal)."""

    def call(self, graph: gs.Graph) -> PassResult:
        modified = dedupe_constants(graph.nodes)
        if modified:
            graph.cleanup()
        return PassResult(graph, modified)


def dedupe_constants(nodes) -> bool:
    """Point every reader of a constant at the first constant of equal dtype, shape and bytes
    among ``nodes``' inputs; whether anything changed."""
    canonical: dict[tuple, gs.Constant] = {}
    modified = False
    for node in nodes:
        for slot, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant):
                continue
            values = np.array(tensor.values, order="C")
            key = (values.dtype.str, values.shape, hashlib.sha1(values.tobytes()).hexdigest())
            first = canonical.setdefault(key, tensor)
            if first is not tensor:
                node.inputs[slot] = first
                modified = True
    return modified


class NameNodes(GraphPass):
    """Give unnamed nodes stable names (``Conv_12``): groups, reports and ``--exclude`` use them."""

    def call(self, graph: gs.Graph) -> PassResult:
        taken = {n.name for n in graph.nodes if n.name}
        modified = False
        for i, node in enumerate(graph.nodes):
            if node.name:
                continue
            name, k = f"{node.op}_{i}", 1
            while name in taken:
                name, k = f"{node.op}_{i}_{k}", k + 1
            node.name = name
            taken.add(name)
            modified = True
        return PassResult(graph, modified)


def lowering_passes() -> list[GraphPass]:
    return [NameNodes(), FoldConstants(), UnshareWeights()]


__all__ = ["NameNodes", "FoldConstants", "UnshareWeights", "DedupeConstants", "lowering_passes"]
