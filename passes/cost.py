"""A running count of multiply-accumulates as units are removed, for MAC-matched budgets.

Each Conv/ConvTranspose/Gemm/MatMul costs ``macs * keep(in) * keep(out)``, where ``keep`` is
the share of its input (output) channel space still there (a depthwise conv only scales with
its output). The marginal saving of a unit is the first-order change of that sum.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from onnxprune.depgraph import ChannelGroup, DependencyGraph
from onnxprune.ir import node_macs


class MacModel:
    def __init__(self, dep: DependencyGraph, groups: list[ChannelGroup]):
        shapes = dep.ctx.shapes
        self.size = {key: dep.nx.nodes[key]["size"] for key in dep.nx.nodes}
        self.removed: dict[tuple, int] = defaultdict(int)
        self.terms = []
        for node in dep.graph.nodes:
            cost = _node_macs(node, shapes)
            if cost is None:
                continue
            macs, in_key, out_key, depthwise = cost
            self.terms.append((macs, in_key, out_key, depthwise))
        self.base = self.total()
        # per group: per space, the number of atoms each unit has there
        self.atoms = {g.id: {s: np.bincount(unit, minlength=g.size) for s, (_, unit) in g.atoms.items()}
                      for g in groups}

    def keep(self, key) -> float:
        size = self.size.get(key)
        return 1.0 if not size else 1.0 - self.removed[key] / size

    def total(self) -> float:
        return sum(m * (1.0 if dw else self.keep(i)) * self.keep(o) for m, i, o, dw in self.terms)

    def marginal(self, group: ChannelGroup) -> np.ndarray:
        """MACs saved by removing each unit of ``group`` now (first order)."""
        atoms = self.atoms[group.id]
        saved = np.zeros(group.size)
        for macs, in_key, out_key, dw in self.terms:
            k_in, k_out = (1.0 if dw else self.keep(in_key)), self.keep(out_key)
            if in_key in atoms and not dw:
                saved += macs * atoms[in_key] / self.size[in_key] * k_out
            if out_key in atoms:
                saved += macs * k_in * atoms[out_key] / self.size[out_key]
        return saved

    def remove(self, group: ChannelGroup, unit: int) -> None:
        for space, counts in self.atoms[group.id].items():
            self.removed[space] += int(counts[unit])

    def after_uniform(self, groups: list[ChannelGroup], counts: dict[int, int]) -> float:
        """The MACs left if each group lost ``counts[g]`` average units."""
        saved = dict(self.removed)
        for g in groups:
            for space, per_unit in self.atoms[g.id].items():
                self.removed[space] += int(round(per_unit.mean() * counts.get(g.id, 0)))
        total = self.total()
        self.removed = defaultdict(int, saved)
        return total


def _node_macs(node, shapes):
    """(macs, input space, output space, depthwise) of a weight-owning node, or None."""
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    in_shapes = [shapes.get(t.name) or (tuple(t.shape) if t.shape is not None else None) for t in node.inputs[:2]]
    out = shapes.get(node.outputs[0].name)
    trans_a = bool(node.op == "Gemm" and node.attrs.get("transA", 0))
    macs = node_macs(node.op, in_shapes, out, trans_a)
    if macs is None:
        return None
    if node.op == "Conv":
        depthwise = int(node.attrs.get("group", 1)) > 1 and in_shapes[1][1] == 1
        return macs, (node.inputs[0].name, 1), (node.outputs[0].name, 1), depthwise
    axis_in = (0 if trans_a else 1) if node.op == "Gemm" else len(in_shapes[0]) - 1
    axis_out = 1 if node.op == "Gemm" else len(out) - 1
    return macs, (node.inputs[0].name, axis_in), (node.outputs[0].name, axis_out), False
