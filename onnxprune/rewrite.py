"""The rewriter: the only code that edits a graph.

Given a plan, every group's removed units become removed indices of each of its spaces; each
member slices the constants it declared (weights, biases, norm parameters, per-channel
constants) and its rule fixes what slicing cannot (Conv ``group``, Reshape and Split
constants, Slice bounds). Reconstruction's :class:`~onnxprune.plan.Corrections` are put in
as each weight is sliced: they only change kept values, and add biases where a consumer had none.

The analysed graph is never edited: the rewriter works on a :func:`fork` of it (and views
for measurement on :func:`corrected` copies).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import ParamSlice, SpaceKey, rule_for
from onnxprune.depgraph import DependencyGraph
from onnxprune.errors import InternalError, UserError
from onnxprune.plan import Corrections, Patch, PruningPlan
from onnxprune.rules.control_flow import all_tensors, dedupe_across_graphs, holders, walk

logger = logging.getLogger(__name__)


def removed_by_space(dep: DependencyGraph, plan: PruningPlan) -> dict[SpaceKey, np.ndarray]:
    """Every space's removed indices under ``plan`` (a Concat output collects several groups')."""
    collected: dict[SpaceKey, list[np.ndarray]] = defaultdict(list)
    for gp in plan.groups:
        if gp.group >= len(dep.groups):
            raise UserError(f"the plan names group {gp.group}, the model has {len(dep.groups)}")
        group = dep.groups[gp.group]
        if group.size != gp.size or group.name != gp.name:
            raise UserError(f"the plan's group {gp.group} ('{gp.name}', {gp.size}) does not match the model's "
                            f"('{group.name}', {group.size}): was it made for another model?")
        if not group.prunable:
            raise UserError(f"the plan prunes group {gp.group} ('{gp.name}'), which is blocked: {group.blocked[0]}")
        if len(set(gp.remove)) >= group.size or min(gp.remove, default=0) < 0 or max(gp.remove, default=0) >= group.size:
            raise UserError(f"the plan's group {gp.group} removes invalid units")
        for space, idx in group.removed_indices(np.asarray(gp.remove)).items():
            collected[space].append(idx)
    return {s: np.unique(np.concatenate(parts)) for s, parts in collected.items() if sum(map(len, parts))}


def bias_name(node: gs.Node) -> str:
    """The name of the bias reconstruction gives a node that had none."""
    return f"{node.name}_compensation"


def apply_corrections(graph: gs.Graph, corrections: Corrections, patches: dict[str, Patch] | None = None) -> gs.Graph:
    """Put reconstruction's values into ``graph`` (in place): its ``patches`` (``patches``: only
    those), each into a new array; and give the nodes it names their new biases, as the bias
    input (Conv, ConvTranspose and Gemm take it third)."""
    tensors = all_tensors(graph)
    for name, patch in (corrections.patches if patches is None else patches).items():
        tensors[name].values = patch.apply(tensors[name].values)
    if corrections.biases:
        nodes = {n.name: n for n, _, _ in walk(graph)}
        for node_name, values in corrections.biases.items():
            node = nodes[node_name]
            bias = gs.Constant(bias_name(node), values)
            if len(node.inputs) > 2:  # an empty optional input
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
    return graph


def corrected(graph: gs.Graph, corrections: Corrections | None) -> gs.Graph:
    """A copy of ``graph`` (weights shared until replaced) with ``corrections`` in."""
    view = graph.copy()
    return apply_corrections(view, corrections) if corrections else view


def fork(graph: gs.Graph, dep: DependencyGraph) -> tuple[gs.Graph, DependencyGraph]:
    """Copies of ``graph`` and of the dependency graph built on it, the one pointing into the
    other, for the rewriter to edit. Weight arrays are shared, not copied: the rewriter
    replaces arrays and never writes into one."""
    copied = graph.copy()
    memo: dict[int, object] = {id(graph): copied}
    for (old, _, _), (new, _, _) in zip(walk(graph, into_loops=True), walk(copied, into_loops=True)):
        memo[id(old)] = new  # If branches' nodes too: the dependency graph points into them
    new_tensors = all_tensors(copied)
    for name, tensor in all_tensors(graph).items():
        memo[id(tensor)] = new_tensors[name]
        if isinstance(tensor, gs.Constant):
            memo[id(tensor._values)] = tensor._values
    return copied, copy.deepcopy(dep, memo)


def _slice_new_biases(graph: gs.Graph, corrections: Corrections | None,
                      removed: dict[SpaceKey, np.ndarray]) -> None:
    """A bias reconstruction added follows its node's output channels."""
    if not corrections or not corrections.biases:
        return
    nodes = {n.name: n for n, _, _ in walk(graph)}
    for node_name in corrections.biases:
        node = nodes[node_name]
        gone = removed.get((node.outputs[0].name, 1))
        if gone is not None and len(gone):
            bias = node.inputs[2]
            bias.values = np.array(np.delete(np.asarray(bias.values), gone, axis=0), order="C")


def _into_batchnorms(graph: gs.Graph, corrections: Corrections) -> Corrections:
    """``corrections`` with the new biases of nodes whose output only an inference BatchNorm
    reads moved into that BatchNorm's running mean (``BN(z + c)`` is ``BN(z)`` with the mean
    less ``c``), so that compensation adds no parameters there; the graph's mean arrays are
    replaced, never written into (a :func:`fork` shares them)."""
    nodes = {n.name: n for n, _, _ in walk(graph)}
    kept = {}
    for name, values in corrections.biases.items():
        out = nodes[name].outputs[0]
        bn = out.outputs[0] if len(out.outputs) == 1 and out not in graph.outputs else None
        mean = bn.inputs[3] if bn is not None and bn.op == "BatchNormalization" and len(bn.inputs) == 5 \
            and bn.inputs[0] is out and not bn.attrs.get("training_mode", 0) else None
        current = np.asarray(mean.values) if isinstance(mean, gs.Constant) else None
        if current is not None and len(mean.outputs) == 1 and mean.name not in corrections.patches \
                and current.shape == np.shape(values):
            mean.values = current - np.asarray(values, dtype=current.dtype)
        else:
            kept[name] = values
    return Corrections(corrections.patches, kept)


def apply_plan(graph: gs.Graph, dep: DependencyGraph, plan: PruningPlan,
               corrections: Corrections | None = None) -> gs.Graph:
    """Put ``corrections`` in and remove the plan's channels from ``graph`` (the graph ``dep``
    was built on: a :func:`fork`), in place. A corrected weight is patched just before it is
    sliced, one at a time: the rewrite holds one corrected copy at most, not one per weight.
    A new bias that a BatchNorm reads goes into its running mean instead."""
    if corrections and corrections.biases:
        corrections = _into_batchnorms(graph, corrections)
    if corrections:
        apply_corrections(graph, corrections, patches={})  # the new biases
    pending = dict(corrections.patches) if corrections else {}
    removed = removed_by_space(dep, plan)
    deletions: dict[tuple[int, int], tuple[ParamSlice, set[int]]] = {}
    touched: dict[int, gs.Node] = {}
    for space, gone in removed.items():
        for member in dep.members.get(space, []):
            touched[id(member.node)] = member.node
            for p in member.coupling.params:
                idx = p.param[np.isin(p.space, gone)]
                entry = deletions.setdefault((id(p.tensor), p.axis), (p, set()))
                entry[1].update(int(i) for i in idx)
    for param, idx in deletions.values():
        if idx:
            patch = pending.pop(param.tensor.name, None)
            values = np.asarray(param.tensor.values) if patch is None else patch.apply(param.tensor.values)
            param.tensor.values = np.array(param.deleted(values, np.array(sorted(idx))), order="C")
            del values
    if pending:  # corrected constants that lose nothing (a BatchNorm past the group)
        apply_corrections(graph, Corrections(), pending)
    _slice_new_biases(graph, corrections, removed)
    holder = holders(graph)
    for node in touched.values():
        names = {t.name for t in list(node.inputs) + list(node.outputs)}
        mine = {s: g for s, g in removed.items() if s[0] in names}
        rule = rule_for(node)
        if rule is None:
            raise InternalError(f"node '{node.name}' ({node.op}) was pruned without a rule")
        ctx = dep.ctx
        if holder.get(id(node), graph) is not graph:  # in an If branch: what it adds goes beside it
            ctx = copy.copy(dep.ctx)
            ctx.graph = holder[id(node)]
        rule.rewrite(node, mine, ctx)
    outputs = {t.name for t in graph.outputs} | {t.name for t in graph.inputs}
    for tensor in all_tensors(graph, into_loops=False).values():  # a Loop body keeps its types
        if isinstance(tensor, gs.Variable) and tensor.name not in outputs:
            tensor.shape = None
    dedupe_across_graphs(graph)
    graph.cleanup().toposort()
    logger.debug("rewrote %d nodes, %d constants", len(touched), len(deletions))
    return graph
