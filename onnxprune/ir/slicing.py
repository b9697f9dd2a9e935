"""Slices of a model: the nodes downstream of some inputs, run as a model of their own.

:class:`Slicer` finds, for a set of graph inputs (probe masks), every node they reach, and the
tensors those nodes read from upstream (*captures*), which a caller computes once and feeds.
Only tensors that carry samples on their first axis can be captured and repeated over a
larger batch: a shape tensor, or one whose first axis is not the batch, pulls its producer
into the slice instead (see :mod:`onnxprune.evidence.frontier`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxprune.ir.runtime import is_large
from onnxprune.ir.stats import node_macs
from onnxprune.ir.validate import subgraphs

#: Ops whose outputs describe a tensor's shape, not its samples: recomputed, never captured.
_META = frozenset({"Shape", "Size"})
#: What moving one activation element costs, in multiply-accumulates (elementwise ops, copies).
ELEMENT_COST = 4.0


@dataclass
class Cut:
    """A sub-model's part of the probe model: node indices in order, the upstream tensors it
    is fed, the graph inputs it reads, and its cost per sample."""

    nodes: list[int]
    captures: list[str]
    inputs: list[str]
    cost: float


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph (an If or Loop body) reads from the scopes around it."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads = set()
    for node in graph.node:
        reads.update(r for r in _reads(node) if r not in defined)
        defined.update(node.output)
    return reads


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and what its subgraphs read from outside."""
    names = [n for n in node.input if n]
    for g in subgraphs([node]):
        names.extend(sorted(_subgraph_reads(g)))
    return names


class Slicer:
    """Where a set of inputs enters ``model`` (toposorted), and the sub-model that runs from
    there fed what it reads from upstream.

    ``shapes`` are the analysis shapes at batch ``batch``: a tensor is capturable when it
    flows from the samples (not through Shape or Size) and its analysis shape starts with
    the batch. The runtime check that its captured shape does too is the caller's."""

    def __init__(self, model: onnx.ModelProto, shapes: dict, batch: int, samples: set[str]):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.inits = {t.name for t in graph.initializer}
        self.inputs = {i.name for i in graph.input} - self.inits
        self.producer = {o: k for k, n in enumerate(self.nodes) for o in n.output if o}
        self.reads = [_reads(n) for n in self.nodes]
        self.shapes, self.batch = shapes, batch
        # Which tensors carry samples: from the sample inputs, through anything but Shape/Size.
        carries = set(samples)
        for node, reads in zip(self.nodes, self.reads):
            if node.op_type not in _META and any(r in carries for r in reads):
                carries.update(o for o in node.output if o)
        self.carries = carries
        self.costs = [self._node_cost(n) for n in self.nodes]
        self.total = float(sum(self.costs))

    def _per_sample(self, name: str) -> float | None:
        shape = self.shapes.get(name)
        if not shape or not all(isinstance(d, int) for d in shape):
            return None
        return math.prod(shape) / max(self.batch, 1)

    def _node_cost(self, node: onnx.NodeProto) -> float:
        """Multiply-accumulates plus ELEMENT_COST per element written, per sample (nodes the
        analysis has no shapes for, the masks' own, count the largest tensor they read)."""
        shapes = self.shapes
        macs = node_macs(node.op_type, [shapes.get(i) for i in node.input],
                         shapes.get(node.output[0]) if node.output else None) or 0
        written = [self._per_sample(o) for o in node.output if o]
        if not any(w is not None for w in written):
            written = [self._per_sample(i) for i in node.input if i]
        moved = max((w for w in written if w is not None), default=0.0)
        return macs / max(self.batch, 1) + ELEMENT_COST * moved

    def capturable(self, name: str) -> bool:
        shape = self.shapes.get(name)
        return name in self.carries and bool(shape) and shape[0] == self.batch

    def cut(self, sources: set[str], output: str) -> Cut | None:
        """The sub-model downstream of ``sources`` (mask inputs) that computes ``output``;
        None where it would be the whole model or does not reach the output."""
        inside: set[int] = set()
        tainted = set(sources)
        for k, reads in enumerate(self.reads):
            if any(r in tainted for r in reads):
                inside.add(k)
                tainted.update(self.nodes[k].output)
        if output not in tainted:
            return None
        # Pull in the producers of what cannot be captured, until every read is satisfied.
        pending = sorted(inside)
        while pending:
            k = pending.pop()
            for r in self.reads[k]:
                p = self.producer.get(r)
                if p is not None and p not in inside and not self.capturable(r):
                    inside.add(p)
                    pending.append(p)
        if len(inside) == len(self.nodes):
            return None
        nodes = sorted(inside)
        made = {o for k in nodes for o in self.nodes[k].output}
        reads = {r for k in nodes for r in self.reads[k]}
        captures = sorted(r for r in reads if r not in made and r in self.producer)
        inputs = sorted(r for r in reads if r in self.inputs)
        return Cut(nodes, captures, inputs, float(sum(self.costs[k] for k in nodes)))

    def expose(self, names: list[str]) -> None:
        """In place: ``names`` become outputs of the model (untyped: onnxruntime infers them)."""
        outputs = {o.name for o in self.model.graph.output}
        for name in names:
            if name not in outputs:
                self.model.graph.output.add().name = name

    def sub_model(self, cut: Cut, output: str,
                  captured: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
        """The cut as a model: the captures as inputs (batch dynamic), ``output`` its only output;
        and its large initializers, left out of it (the model's own protos, not copied: pass
        them to :func:`~onnxprune.ir.runtime.session` as ``outside``). Copying AlexNet's
        classifier weights into every sub-model was a fifth of its paoding run."""
        graph = self.model.graph
        reads = {r for k in cut.nodes for r in self.reads[k]}
        inputs = [vi for vi in graph.input if vi.name in reads]  # real inputs, and IR 3's weights
        for name in cut.captures:
            array = captured[name]
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                        ["N", *array.shape[1:]]))
        outputs = [vi for vi in graph.output if vi.name == output]
        small, large = [], []
        for t in graph.initializer:
            if t.name in reads:
                (large if is_large(t) else small).append(t)
        sub = helper.make_graph([self.nodes[k] for k in cut.nodes], "onnxprune_rows", inputs, outputs,
                                initializer=small)
        model = helper.make_model(sub, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        return model, large
