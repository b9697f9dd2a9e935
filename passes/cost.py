"""A running count of multiply-accumulates (or weights, or microseconds) as units are
removed, for MAC-, parameter- and latency-matched budgets.

The cost is a sum of terms ``amount * keep(s1) * keep(s2) ...``, where ``keep`` is the share
of a channel space still there. Each Conv/Gemm/MatMul costs ``macs * keep(in) * keep(out)``
(a depthwise conv only scales with its output); counting parameters, the size of its weight
instead (nothing for a MatMul of two activations); the latency model
(:mod:`onnxprune.passes.latency`) brings terms of its own. The marginal saving of a unit is
the first-order change of that sum.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs
from onnxprune.passes.planning import aligned_step, removal_count

from onnxprune.depgraph import ChannelGroup, DependencyGraph
from onnxprune.ir import MAC_OPS, node_macs

#: Above this many groups, a target share is reached by the uniform ratio's counts alone.
STEPWISE_GROUPS = 48


#: One term of a cost: an amount, and the channel spaces whose kept shares scale it.
Term = tuple[float, tuple]


class MacModel:
    """The cost of ``kind`` ("macs", "params"), or of the given ``terms``, as units of
    ``groups`` are removed."""

    def __init__(self, dep: DependencyGraph, groups: list[ChannelGroup], kind: str = "macs",
                 terms: list[Term] | None = None):
        self.kind = kind
        self.size = {key: dep.nx.nodes[key]["size"] for key in dep.nx.nodes}
        self.removed: dict[tuple, int] = defaultdict(int)
        self.terms = list(terms) if terms is not None else weight_terms(dep, kind)
        self.base = self.total()
        #: How the terms were found, where they were measured (the latency model's LatencyFit).
        self.fit = None
        # per group: per space, the number of atoms each unit has there
        self.atoms = {g.id: {s: np.bincount(unit, minlength=g.size) for s, (_, unit) in g.atoms.items()}
                      for g in groups}
        # the atoms an average unit has in each space: read by every after_uniform (a target's
        # stepwise search makes thousands; the int8 page classifier's took 25 of its 42 s in means)
        self.mean_atoms = {gid: {s: float(counts.mean()) for s, counts in spaces.items()}
                           for gid, spaces in self.atoms.items()}

    def keep(self, key) -> float:
        size = self.size.get(key)
        return 1.0 if not size else 1.0 - self.removed[key] / size

    def total(self) -> float:
        return sum(m * float(np.prod([self.keep(k) for k in keys])) for m, keys in self.terms)

    def marginal(self, group: ChannelGroup) -> np.ndarray:
        """MACs saved by removing each unit of ``group`` now (first order)."""
        atoms = self.atoms[group.id]
        saved = np.zeros(group.size)
        for macs, keys in self.terms:
            kept = [self.keep(k) for k in keys]
            for i, key in enumerate(keys):
                if key in atoms:
                    others = float(np.prod(kept[:i] + kept[i + 1:]))
                    saved += macs * atoms[key] / self.size[key] * others
        return saved

    def remove(self, group: ChannelGroup, unit: int) -> None:
        for space, counts in self.atoms[group.id].items():
            self.removed[space] += int(counts[unit])

    def rescaled(self, fixed: float, width: float) -> MacModel:
        """A copy whose fixed terms (no channel space) are multiplied by ``fixed`` and the others
        by ``width``, with nothing removed."""
        other = copy.copy(self)
        other.terms = [(amount * (width if keys else fixed), keys) for amount, keys in self.terms]
        other.removed = defaultdict(int)
        other.base = other.total()
        other.fit = None
        return other

    def after_removal(self, removed: dict[int, list[int]]) -> float:
        """The cost left once the units ``removed[g]`` of each group are gone (from the full
        model, whatever has been removed so far)."""
        saved = self.removed
        self.removed = defaultdict(int)
        for gid, units in removed.items():
            for space, counts in self.atoms.get(gid, {}).items():
                self.removed[space] += int(counts[list(units)].sum())
        total = self.total()
        self.removed = saved
        return total

    def after_uniform(self, groups: list[ChannelGroup], counts: dict[int, int]) -> float:
        """The MACs left if each group lost ``counts[g]`` average units."""
        saved = dict(self.removed)
        for g in groups:
            for space, per_unit in self.mean_atoms[g.id].items():
                self.removed[space] += int(round(per_unit * counts.get(g.id, 0)))
        total = self.total()
        self.removed = defaultdict(int, saved)
        return total

    def ratio_for(self, groups: list[ChannelGroup], goal: float, round_to: int = 1) -> float:
        """The smallest uniform ratio whose removal counts leave at most ``goal`` (bisection;
        0.95 when even that leaves more)."""
        low, high = 0.0, 0.95
        if self.after_uniform(groups, {g.id: removal_count(g, high, round_to) for g in groups}) > goal:
            return high
        for _ in range(40):
            mid = (low + high) / 2
            if self.after_uniform(groups, {g.id: removal_count(g, mid, round_to) for g in groups}) > goal:
                low = mid
            else:
                high = mid
        return high

    def counts_for(self, groups: list[ChannelGroup], goal: float, round_to: int, high: float) -> dict[int, int]:
        """Removal counts whose cost is as close to ``goal`` as one aligned step of one group
        allows: the uniform ratio's counts just short of it, then one more step at a time in
        the group where a step saves least, until the goal is passed (the closer of the last
        two is kept). A uniform ratio alone moves many groups at once and overshoots on
        small nets and coarse groups (heads, grouped convolutions). ``high``: :meth:`ratio_for`
        of the goal."""
        counts = {g.id: removal_count(g, max(high - 1e-9, 0.0), round_to) for g in groups}
        left = self.after_uniform(groups, counts)
        if len(groups) > STEPWISE_GROUPS:  # many groups: the ratio's own steps are fine, and a
            # step-by-step search would cost groups x steps cost evaluations (minutes on densenet121)
            return {g.id: removal_count(g, high, round_to) for g in groups}
        while left > goal:
            best = None
            for g in groups:
                nxt = _next_count(g, counts[g.id], round_to)
                if nxt is None:
                    continue
                after = self.after_uniform(groups, {**counts, g.id: nxt})
                if after < left and (best is None or after > best[0]):
                    best = (after, g.id, nxt)
            if best is None:
                break
            if best[0] <= goal and goal - best[0] > left - goal:  # stepping past lands further away
                break
            left, counts[best[1]] = best[0], best[2]
        return counts


def weight_terms(dep: DependencyGraph, kind: str) -> list[Term]:
    """MACs (or weights, with ``kind`` "params") of every Conv, Gemm and MatMul; with "params",
    the per-channel parameters too."""
    terms = []
    for node in dep.graph.nodes:
        cost = node_mac_spaces(node, dep.ctx.shapes)
        if cost is None:
            continue
        macs, keys = cost
        if kind == "params":
            weight = node.inputs[1]
            macs = int(np.prod(weight.values.shape)) if isinstance(weight, gs.Constant) else 0
        terms.append((macs, keys))
    if kind == "params":
        terms.extend(_per_channel_params(dep.graph, dep.ctx.shapes))
    return terms


def _per_channel_params(graph, shapes) -> list[tuple[int, tuple]]:
    """Parameters that come one per output channel: biases of Conv/Gemm, the four vectors of
    a BatchNormalization, LayerNorm's scale and bias (small nets carry many per channel)."""
    terms = []
    for node in graph.nodes:
        y = node.outputs[0].name if node.outputs else None
        rank = len(shapes.get(y) or ()) if y else 0
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            terms.append((int(node.inputs[2].values.size), ((y, 1),)))
        elif node.op == "BatchNormalization":
            size = sum(int(t.values.size) for t in node.inputs[1:] if isinstance(t, gs.Constant))
            terms.append((size, ((y, 1),)))
        elif node.op == "LayerNormalization" and rank:
            size = sum(int(t.values.size) for t in node.inputs[1:] if isinstance(t, gs.Constant))
            terms.append((size, ((y, rank - 1),)))
    return terms


def _next_count(group: ChannelGroup, count: int, round_to: int) -> int | None:
    """The next aligned removal count of ``group`` after ``count``, None at the floor."""
    step, blocks = aligned_step(group, round_to)
    nxt = count + step
    return None if group.size - nxt < max(step, blocks) else nxt


def node_mac_spaces(node, shapes) -> tuple[int, tuple] | None:
    """(macs, the spaces whose kept share scales them) of a Conv, ConvTranspose, Gemm or
    MatMul, or their integer forms (ConvInteger, MatMulInteger: a dynamically quantized
    model's every layer), or None: the contracted input axis (not for a depthwise conv) and
    the output's channels; a MatMul also scales with every other output axis but the first
    (attention heads). The ops and formula are the report's (:func:`onnxprune.ir.node_macs`):
    a budget that left some out solved for a share of the rest (an int8 page classifier at
    ``--target macs=0.5`` kept 0.9% of its MACs)."""
    if node.op not in MAC_OPS or len(node.inputs) < 2:
        return None
    in_shapes = [shapes.get(t.name) or (tuple(t.shape) if t.shape is not None else None) for t in node.inputs[:2]]
    out = shapes.get(node.outputs[0].name)
    trans_a = bool(node.op == "Gemm" and node.attrs.get("transA", 0))
    macs = node_macs(node.op, in_shapes, out, trans_a)
    if macs is None:
        return None
    x, y = node.inputs[0].name, node.outputs[0].name
    if node.op in ("Conv", "ConvInteger", "ConvTranspose"):
        group = int(node.attrs.get("group", 1))  # a ConvTranspose's weight is [C_in, C_out / group, ...]
        per_group_in = in_shapes[1][0] // group if node.op == "ConvTranspose" else in_shapes[1][1]
        depthwise = group > 1 and per_group_in == 1
        return macs, ((y, 1),) if depthwise else ((x, 1), (y, 1))
    if node.op == "Gemm":
        return macs, ((x, 0 if trans_a else 1), (y, 1))
    return macs, ((x, len(in_shapes[0]) - 1), *((y, a) for a in range(1, len(out))))
