"""Control flow: If branches are analysed, Loop and Scan bodies are kept.

An If's branches are graphs of their own that read tensors of the enclosing graph by name
(a voice-activity model keeps one whole network per sample rate in them). Their nodes are
analysed like the outer graph's: a tensor read inside a branch ties its channels to the
branch's consumers, and output ``k`` of each branch is output ``k`` of the If, index for
index. The rewriter slices inside the branches with the same rules.

A Loop's or a Scan's body runs a variable number of times over carried state; its channels
are not followed: every channel space read or produced inside one is blocked, with a reason
(kind ``control_flow``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import PASSIVE, BlockKind, Coupling, Link, OpRule, blocked, identity, register
from onnxprune.ir import evaluate_node
from onnxprune.passes.lower import dedupe_constants, unshare_constants

#: Ops whose subgraphs run a data-dependent number of times: not analysed.
LOOPS = ("Loop", "Scan")
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
               "QuantizeLinear", "DequantizeLinear"}


def subgraphs(node: gs.Node) -> list[tuple[str, gs.Graph]]:
    """A node's graph attributes, by attribute name, in a fixed order."""
    return sorted(((k, v) for k, v in node.attrs.items() if isinstance(v, gs.Graph)), key=lambda kv: kv[0])


def walk(graph: gs.Graph, into_loops: bool = False) -> Iterator[tuple[gs.Node, gs.Graph, gs.Node | None]]:
    """Every node as ``(node, the graph holding it, the Loop/Scan whose body holds it or None)``,
    outer graph first, then each If branch (and with ``into_loops``, Loop/Scan bodies)."""
    stack: list[tuple[gs.Graph, gs.Node | None]] = [(graph, None)]
    while stack:
        current, loop = stack.pop(0)
        for node in current.nodes:
            yield node, current, loop
            for _, sub in subgraphs(node):
                inside = node if node.op in LOOPS else loop
                if into_loops or inside is None:
                    stack.append((sub, inside))


def analysed_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The nodes the dependency graph is built on: the outer graph's and its If branches'."""
    return [node for node, _, _ in walk(graph)]


def all_tensors(graph: gs.Graph, into_loops: bool = True) -> dict[str, gs.Tensor]:
    """Tensors by name in the graph and every subgraph (a subgraph reads outer ones by name);
    without ``into_loops``, not those of Loop/Scan bodies."""
    tensors = dict(graph.tensors())
    for node, _, _ in walk(graph, into_loops=into_loops):
        if node.op in LOOPS and not into_loops:
            continue
        for _, sub in subgraphs(node):
            for name, tensor in sub.tensors().items():
                tensors.setdefault(name, tensor)
    return tensors


def holders(graph: gs.Graph) -> dict[int, gs.Graph]:
    """The graph holding each node (by ``id``), for rewrites that add nodes beside it."""
    return {id(node): owner for node, owner, _ in walk(graph, into_loops=True)}


def branch_nodes(graph: gs.Graph) -> set[int]:
    """The nodes (by ``id``) inside If branches."""
    return {id(node) for node, owner, loop in walk(graph) if owner is not graph and loop is None}


def loop_bodies(graph: gs.Graph) -> dict[int, gs.Node]:
    """For each node inside a Loop or Scan body (by ``id``), that Loop or Scan."""
    return {id(node): loop for node, _, loop in walk(graph, into_loops=True) if loop is not None}


def branch_owners(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    """For each tensor an If branch returns, the If returning it: the dependency graph meets
    it there, where no edge of the branch points to the If."""
    owners: dict[str, list[gs.Node]] = {}
    for node in analysed_nodes(graph):
        if node.op != "If":
            continue
        for _, sub in subgraphs(node):
            for tensor in sub.outputs:
                owners.setdefault(tensor.name, []).append(node)
    return owners


def name_inner_nodes(graph: gs.Graph) -> None:
    """Unique names for the nodes of every subgraph (exporters reuse or omit them): groups,
    reports, ``--exclude`` and the rewriter's new tensors go by node name."""
    taken = {n.name for n in graph.nodes if n.name}
    for owner in list(graph.nodes):
        _name_subgraphs(owner, taken)


def _name_subgraphs(owner: gs.Node, taken: set[str]) -> None:
    for attr, sub in subgraphs(owner):
        for i, node in enumerate(sub.nodes):
            if not node.name or node.name in taken:
                base, k = f"{owner.name}/{attr}/{node.name or node.op + '_' + str(i)}", 1
                name = base
                while name in taken:
                    name, k = f"{base}_{k}", k + 1
                node.name = name
            taken.add(node.name)
            _name_subgraphs(node, taken)


def unshare_across_branches(graph: gs.Graph) -> None:
    """A constant read in two graphs (an outer weight both branches use) is copied for the later
    users: each branch is then sliced on its own."""
    unshare_constants((node for node, _, _ in walk(graph, into_loops=True)), set(all_tensors(graph)))


#: Values folded inside branches: shape arithmetic and small constants. Weights a branch
#: computes from a packed tensor stay computed (folding copies them into every branch).
_FOLD_MAX = 4096


def lower_branches(graph: gs.Graph) -> None:
    """Lower the If branches the dependency graph analyses: unique node names, ``Constant``
    nodes made constants the rules can slice, shape arithmetic on constants evaluated, and a
    constant two graphs read copied for each. A weight a branch computes (a Slice of a packed
    tensor) stays computed: its channels block as a run-time parameter."""
    name_inner_nodes(graph)
    for node in analysed_nodes(graph):
        for _, sub in subgraphs(node):
            if _fold(sub):
                sub.cleanup()
    unshare_across_branches(graph)


def _fold(sub: gs.Graph) -> bool:
    returned, folded = {t.name for t in sub.outputs}, False
    for inner in list(sub.nodes):
        if any(t.name in returned for t in inner.outputs) or subgraphs(inner) or inner.op in _NEVER_FOLD:
            continue
        if inner.op == "Constant":
            value = inner.attrs.get("value")
            values = [np.asarray(value.values)] if isinstance(value, gs.Constant) else None
        elif inner.inputs and all(isinstance(t, gs.Constant) or not t.name for t in inner.inputs):
            try:
                values = evaluate_node(inner, [np.asarray(t.values) if t.name else None for t in inner.inputs])
            except Exception:  # an op the reference cannot evaluate stays a node
                continue
        else:
            continue
        if values is None or (inner.op != "Constant" and any(v.size > _FOLD_MAX and v.dtype.kind not in "iub" for v in values)):
            continue
        for tensor, value in zip(inner.outputs, values):
            tensor.to_constant(np.array(value, order="C"))
        inner.outputs.clear()
        folded = True
    return folded


def dedupe_across_graphs(graph: gs.Graph) -> None:
    """Merge equal constants read anywhere in the graph or its subgraphs (undoes the copies
    :func:`unshare_across_branches` made that stayed equal; the exporter keeps one copy, in the
    innermost graph enclosing its readers)."""
    if not any(subgraphs(n) for n in graph.nodes):
        return
    dedupe_constants(node for node, _, _ in walk(graph, into_loops=True))


@register("If")
class IfRule(OpRule):
    """Output ``k`` of an If is output ``k`` of either branch: the three are tied index for index."""

    def couple(self, node, tensor, axis, ctx):
        branches = [sub for _, sub in subgraphs(node)]
        if tensor.name == node.inputs[0].name:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"If '{node.name}' reads its condition from a channel tensor")
        position = next((k for k, t in enumerate(node.outputs) if t.name == tensor.name), None)
        if position is None:
            position = next((k for sub in branches for k, t in enumerate(sub.outputs) if t.name == tensor.name), None)
        if position is None:
            return blocked(BlockKind.ANALYSIS_FAILURE, node, f"If '{node.name}' does not return '{tensor.name}'")
        tied = [node.outputs[position]] + [sub.outputs[position] for sub in branches]
        size = ctx.shape(tensor)[axis]
        links = []
        for other in tied:
            if other.name == tensor.name:
                continue
            if isinstance(other, gs.Constant):
                return blocked(BlockKind.CONTROL_FLOW, node, f"a branch of If '{node.name}' returns the constant '{other.name}'")
            shape = ctx.shape(other)
            if not shape or len(shape) <= axis or shape[axis] != size:
                return blocked(BlockKind.CONTROL_FLOW, node,
                               f"the branches of If '{node.name}' return output {position} at widths not known to agree")
            links.append(Link((other.name, axis), identity(size), identity(size)))
        return Coupling(PASSIVE, links)


@register(*LOOPS)
class LoopRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        return blocked(BlockKind.CONTROL_FLOW, node,
                       f"{node.op} '{node.name}' runs a body that is not analysed: channels it reads or returns are kept")


def untyped_in_branch(node: gs.Node, shapes: dict, returned: set[str] | dict) -> Coupling | None:
    """The answer for a node in an If branch whose outputs (those read, or ``returned`` by the
    branch) inference left without a shape (the branch a concrete input does not take, ranks
    chosen at run time): blocked, saying so."""
    missing = [t.name for t in node.outputs
               if t.name and (t.outputs or t.name in returned) and t.name not in shapes]
    if not missing:
        return None
    return blocked(BlockKind.UNKNOWN_SHAPE, node,
                   f"'{missing[0]}' inside an If branch has no shape inference could give at the analysis shapes")


def inside_loop(node: gs.Node, loop: gs.Node) -> Coupling:
    """The answer for a node of a Loop or Scan body that reads a channel space from outside."""
    return blocked(BlockKind.CONTROL_FLOW, node,
                   f"'{node.name}' reads these channels inside the body of {loop.op} '{loop.name}', "
                   f"which is not analysed: they are kept")
