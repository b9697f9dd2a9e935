"""The channel dependency graph and the pruning groups it induces.

Nodes of the (networkx) graph are channel spaces, ``(tensor, axis)``; an edge carries the index
pairs that tie two spaces (a residual Add ties index k to index k, a Concat shifts by an
offset, a Flatten maps one channel to a block of features). Every index of every space is an
*atom*; atoms tied by edges form a *unit*, the indivisible thing that is removed. Units that
span exactly the same spaces form a :class:`ChannelGroup` (one per producer, or per set of
producers a residual ties together): the thing a ratio is applied to and a scorer ranks.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

import onnxprune.rules  # noqa: F401  (registers the coupling rules)
from onnxprune.coupling import (
    PRODUCER,
    BlockKind,
    BlockReason,
    Coupling,
    ParamSlice,
    RuleContext,
    SpaceKey,
    blocked,
    rule_for,
)
from onnxprune.rules.control_flow import (
    all_tensors,
    analysed_nodes,
    branch_nodes,
    branch_owners,
    inside_loop,
    loop_bodies,
    untyped_in_branch,
)
from onnxprune.rules.recurrent import state_reason

logger = logging.getLogger(__name__)


@dataclass
class Member:
    """One node's part in a group: its coupling on one of the group's spaces."""

    node: gs.Node
    space: SpaceKey
    coupling: Coupling


@dataclass
class ChannelGroup:
    """Channels that must be removed together, ``size`` units of them."""

    id: int
    name: str
    size: int
    spaces: list[SpaceKey]
    #: For each space: (local index of each atom, unit of that atom).
    atoms: dict[SpaceKey, tuple[np.ndarray, np.ndarray]]
    members: list[Member]
    #: Why the group cannot be pruned, one refusal per distinct message; empty when it can.
    reasons: list[BlockReason] = field(default_factory=list)
    #: Units with the same label must lose equal counts (grouped convolutions), or None.
    balance: np.ndarray | None = None

    @property
    def blocked(self) -> list[str]:
        """The refusals' messages (read-only: add to :attr:`reasons`)."""
        return [r.message for r in self.reasons]

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def producers(self) -> list[gs.Node]:
        return _unique_nodes(m.node for m in self.members if m.coupling.role == PRODUCER)

    @property
    def nodes(self) -> list[gs.Node]:
        return _unique_nodes(m.node for m in self.members)

    def param_slices(self, kinds: tuple[str, ...] | None = None) -> list[tuple[SpaceKey, ParamSlice]]:
        """Each sliced constant once (a node asked from two spaces declares it twice)."""
        seen, out = set(), []
        for m in self.members:
            for p in m.coupling.params:
                key = (p.tensor.name, p.axis)
                if key not in seen and (kinds is None or p.kind in kinds):
                    seen.add(key)
                    out.append((m.space, p))
        return out

    def unit_sums(self, values_per_index: dict[SpaceKey, np.ndarray]) -> np.ndarray:
        """Sum per unit of a value given per index of some of the group's spaces."""
        total = np.zeros(self.size)
        for space, values in values_per_index.items():
            local, unit = self.atoms[space]
            total += np.bincount(unit, weights=values[local], minlength=self.size)
        return total

    def unit_squared_norms(self, space: SpaceKey, param: ParamSlice) -> np.ndarray:
        """Per unit, the sum of squares of the weights ``param`` slices for it."""
        per_index = np.zeros(int(max(self.atoms[space][0].max(), param.space.max())) + 1)
        np.add.at(per_index, param.space, param.squared_norms())
        return self.unit_sums({space: per_index})

    def removed_indices(self, units: np.ndarray) -> dict[SpaceKey, np.ndarray]:
        """The indices each space loses when ``units`` go."""
        gone = np.zeros(self.size, dtype=bool)
        gone[np.asarray(units, dtype=np.int64)] = True
        return {s: np.sort(local[gone[unit]]) for s, (local, unit) in self.atoms.items()}

    def touches(self, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(n.name, pattern) for n in self.nodes)


def _unique_nodes(nodes) -> list[gs.Node]:
    seen, out = set(), []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out


class DependencyGraph:
    """Built once per analysis from a lowered graph and its concrete shapes."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int, ...]], options: dict | None = None):
        self.graph = graph
        self.ctx = RuleContext(graph, shapes, options)
        self.nx = nx.Graph()
        self.members: dict[SpaceKey, list[Member]] = defaultdict(list)
        #: Refusals met on each space, before they are gathered per group.
        self.reasons: dict[SpaceKey, list[BlockReason]] = defaultdict(list)
        self._links: list[tuple[SpaceKey, SpaceKey, np.ndarray, np.ndarray]] = []
        self._states = _state_pairs(graph, shapes)
        self._discover()
        self.groups = self._form_groups()

    # -- discovery: follow couplings from every weight-owning op -------------------------
    def _discover(self) -> None:
        # If branches are analysed with the outer graph; Loop/Scan bodies block (rules.control_flow)
        tensors = self._tensors = all_tensors(self.graph)
        owners, self._loops, self._branch = branch_owners(self.graph), loop_bodies(self.graph), branch_nodes(self.graph)
        self._returned = owners
        graph_inputs = {t.name for t in self.graph.inputs}
        queue: deque[SpaceKey] = deque()
        for node in analysed_nodes(self.graph):
            rule = rule_for(node)
            if rule is not None:
                queue.extend(rule.seeds(node, self.ctx))
            if rule is None or rule.refuses_its_weights:
                queue.extend(self._weights_without_rule(node))
        asked: set[tuple[int, SpaceKey]] = set()
        seen: set[SpaceKey] = set()
        while queue:
            key = queue.popleft()
            if key in seen:
                continue
            seen.add(key)
            name, axis = key
            tensor = tensors.get(name)
            shape = self.ctx.shapes.get(name)
            if tensor is None or shape is None or axis >= len(shape):
                self.nx.add_node(key, size=0)
                self.reasons[key].append(BlockReason(BlockKind.UNKNOWN_SHAPE, f"tensor '{name}' has no known shape"))
                continue
            self.nx.add_node(key, size=shape[axis])
            if name in graph_inputs:
                self.reasons[key].append(BlockReason(BlockKind.GRAPH_INPUT, self._signature_message(name, "input")))
            if name in self.ctx.graph_outputs:
                self.reasons[key].append(BlockReason(BlockKind.GRAPH_OUTPUT, self._signature_message(name, "output")))
            for node in list(tensor.inputs) + list(tensor.outputs) + owners.get(name, []):
                if (id(node), key) in asked:
                    continue
                asked.add((id(node), key))
                coupling = self._couple(node, tensor, axis)
                if coupling.reason is not None:
                    self.reasons[key].append(coupling.reason)
                self.members[key].append(Member(node, key, coupling))
                for link in coupling.links:
                    self.nx.add_edge(key, link.other)
                    self._links.append((key, link.other, link.here, link.there))
                    queue.append(link.other)

    def _weights_without_rule(self, node: gs.Node) -> list[SpaceKey]:
        """The output channels of a node that holds a weight (a constant of rank >= 2) but has no
        rule, or one that refuses it (QLinearConv, an unknown op): asked like any space, it forms a
        group that says why it is not pruned, instead of a model with no group and no reason."""
        if not any(isinstance(t, gs.Constant) and len(t.shape) >= 2 for t in node.inputs):
            return []
        out = node.outputs[0] if node.outputs else None
        shape = self.ctx.shapes.get(out.name) if out is not None else None
        return [(out.name, 1)] if shape is not None and len(shape) >= 2 else []

    def _signature_message(self, name: str, side: str) -> str:
        """Why a graph input's or output's channels stay: a recurrent state (an output the
        caller feeds back as an input on the next call) says so."""
        pair = self._states.get(name)
        if pair is None:
            return f"'{name}' is a graph {side}"
        state_in, state_out = (name, pair) if side == "input" else (pair, name)
        return (f"'{name}' is a graph {side} and a recurrent state ('{state_out}' is fed back as '{state_in}' "
                "on the next call): its size is part of the signature, so these channels are kept")

    def _couple(self, node: gs.Node, tensor: gs.Tensor, axis: int) -> Coupling:
        if id(node) in self._loops:
            return inside_loop(node, self._loops[id(node)])
        untyped = untyped_in_branch(node, self.ctx.shapes, self._returned) if id(node) in self._branch else None
        if untyped is not None:
            return untyped
        rule = rule_for(node)
        if rule is None:
            return blocked(BlockKind.UNSUPPORTED_OP, node, f"op {node.op} ('{node.name}') is not supported")
        try:
            return rule.couple(node, tensor, axis, self.ctx)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            # A rule that cannot read the node (missing shape, odd attribute) blocks, says why.
            unknown = [t.name for t in list(node.inputs) + list(node.outputs)
                       if isinstance(t, gs.Variable) and t.name and self.ctx.shapes.get(t.name) is None]
            if unknown:
                return blocked(BlockKind.UNKNOWN_SHAPE, node, f"{node.op} '{node.name}': tensor '{unknown[0]}' has no "
                               "known shape (shape inference left it without one, e.g. read only inside an If or "
                               "Loop body)")
            return blocked(BlockKind.ANALYSIS_FAILURE, node, f"{node.op} '{node.name}' could not be analysed ({exc!r})")

    # -- grouping: atoms -> units -> groups ----------------------------------------------
    def _form_groups(self) -> list[ChannelGroup]:
        keys = list(self.nx.nodes)
        sizes = np.array([self.nx.nodes[k]["size"] for k in keys], dtype=np.int64)
        offset = dict(zip(keys, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)))
        parent = np.arange(int(sizes.sum()), dtype=np.int64)
        if self._links:
            _union_many(parent, np.concatenate([offset[a] + here for a, _, here, _ in self._links]),
                        np.concatenate([offset[b] + there for _, b, _, there in self._links]))
        roots = _find_all(parent)
        space_of_atom = np.repeat(np.arange(len(keys)), sizes)
        local_of_atom = np.arange(len(parent)) - np.repeat(np.array(list(offset.values())), sizes)

        # A unit's signature is the set of spaces it touches; equal signatures form a group.
        unit_ids, unit_of_atom = np.unique(roots, return_inverse=True)
        pairs = np.unique(np.stack([unit_of_atom, space_of_atom], axis=1), axis=0)
        signature: dict[int, list[int]] = defaultdict(list)
        for unit, space in pairs:
            signature[int(unit)].append(int(space))
        by_signature: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for unit in range(len(unit_ids)):
            by_signature[tuple(signature[unit])].append(unit)

        groups = []
        for spaces_idx, units in self._merge_balanced(keys, by_signature):
            spaces = [keys[i] for i in spaces_idx]
            units = np.asarray(units)
            local_unit = np.full(len(unit_ids), -1, dtype=np.int64)
            local_unit[units] = np.arange(len(units))
            atoms = {}
            for key in spaces:
                lo = offset[key]
                sel = np.arange(lo, lo + self.nx.nodes[key]["size"])
                sel = sel[local_unit[unit_of_atom[sel]] >= 0]
                atoms[key] = (local_of_atom[sel], local_unit[unit_of_atom[sel]])
            members = [m for key in spaces for m in self.members[key]]
            groups.append(ChannelGroup(len(groups), "", len(units), spaces, atoms, members))
        self._order_and_check(groups)
        return groups

    def _merge_balanced(self, keys: list[SpaceKey], by_signature: dict[tuple[int, ...], list[int]]):
        """Signature groups that meet in a grouped convolution's input must be planned together:
        the convolution needs equal removals per block across all of them."""
        balanced = {i for i, k in enumerate(keys) if any(m.coupling.balanced > 1 for m in self.members[k])}
        sigs = list(by_signature)
        parent = list(range(len(sigs)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        owner: dict[int, int] = {}
        for i, sig in enumerate(sigs):
            for space in balanced.intersection(sig):
                j = owner.setdefault(space, i)
                parent[find(i)] = find(j)
        merged: dict[int, tuple[set[int], list[int]]] = {}
        for i, sig in enumerate(sigs):
            spaces, units = merged.setdefault(find(i), (set(), []))
            spaces.update(sig)
            units.extend(by_signature[sig])
        return [(sorted(spaces), sorted(units)) for spaces, units in merged.values()]

    def _order_and_check(self, groups: list[ChannelGroup]) -> None:
        order = {id(n): i for i, n in enumerate(analysed_nodes(self.graph))}
        for g in groups:
            producers = g.producers
            g.name = ",".join(n.name for n in producers[:3]) + ("…" if len(producers) > 3 else "") or g.spaces[0][0]
            for s in g.spaces:
                for reason in self.reasons.get(s, []):
                    if reason.message not in g.blocked:  # the same refusal met from two spaces
                        g.reasons.append(reason)
            if not producers:
                g.reasons.append(BlockReason(BlockKind.NO_PRODUCER, "no weight produces these channels"))
            state = state_reason(g.nodes, g.spaces, {t.name for t in self.graph.inputs}, self.ctx.graph_outputs)
            if state is not None:  # said first: it is why the others (graph input, output) hold
                g.reasons.insert(0, state)
            self._balance(g)
        # Graph order of a group's first producing node: stable ids for plans and reports.
        groups.sort(key=lambda g: min((order.get(id(self._producer(s)), -1), s) for s in g.spaces))
        for i, g in enumerate(groups):
            g.id = i

    def _balance(self, group: ChannelGroup) -> None:
        labels, first = [], None
        for m in group.members:
            blocks = m.coupling.balanced
            if blocks <= 1:
                continue
            local, unit = group.atoms[m.space]
            if len(local) != self.nx.nodes[m.space]["size"]:
                group.reasons.append(BlockReason(BlockKind.GROUPED_PARTITION,
                                                 f"grouped {m.node.op} '{m.node.name}' reads channels no weight produces",
                                                 m.node.name))
                return
            per_block = self.nx.nodes[m.space]["size"] // blocks
            label = np.full(group.size, -1)
            label[unit] = local // per_block
            labels.append(label)
            first = m.node if first is None else first  # named when the partitions disagree
        if not labels:
            return
        combined = np.unique(np.stack(labels, axis=1), axis=0, return_inverse=True)[1].reshape(-1)
        counts = np.bincount(combined)
        if len(set(counts.tolist())) != 1:
            group.reasons.append(BlockReason(BlockKind.GROUPED_PARTITION,
                                             "grouped convolutions partition these channels in incompatible ways",
                                             first.name))
            return
        group.balance = combined

    def _producer(self, key: SpaceKey) -> gs.Node | None:
        tensor = self._tensors.get(key[0])
        return tensor.inputs[0] if tensor is not None and tensor.inputs else None

    # -- views ---------------------------------------------------------------------------
    def prunable_groups(self, exclude: list[str] | None = None) -> list[ChannelGroup]:
        out = []
        for g in self.groups:
            if g.prunable and g.size > 1 and not any(g.touches(p) for p in exclude or []):
                out.append(g)
        return out


def _state_pairs(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Graph inputs and outputs paired as a recurrent state: same shape, and the output's name
    extends the input's (state -> stateN, h -> hn) or is its 'present' (past_key_values.0.key ->
    present.0.key). Each name maps to its partner."""
    pairs: dict[str, str] = {}
    for value in graph.inputs:
        shape = shapes.get(value.name)
        for out in (t.name for t in graph.outputs):
            named = out.lower().startswith(value.name.lower()) or \
                out == value.name.replace("past_key_values", "present").replace("past", "present")
            if out != value.name and named and shape is not None and shapes.get(out) == shape:
                pairs[value.name], pairs[out] = out, value.name
    return pairs


def _find_all(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent[:] = grand


def _union_many(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Union atoms a[i] and b[i] for every i (vectorised: hook roots to the smaller root)."""
    while True:
        ra, rb = _find_all(parent)[a], parent[b]
        diff = ra != rb
        if not diff.any():
            return
        lo, hi = np.minimum(ra[diff], rb[diff]), np.maximum(ra[diff], rb[diff])
        np.minimum.at(parent, hi, lo)
