"""The rewriter: the only code that edits the graph to remove channels.

Given a plan, every group's removed units become removed indices of each of its spaces; each
member slices the constants it declared (weights, biases, norm parameters, per-channel
constants) and its rule fixes what slicing cannot (Conv ``group``, Reshape and Split
constants, Slice bounds). Reconstruction happens before: it only changes kept values.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import ParamSlice, SpaceKey, rule_for
from onnxprune.depgraph import DependencyGraph
from onnxprune.errors import InternalError, UserError
from onnxprune.plan import PruningPlan

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


def apply_plan(graph: gs.Graph, dep: DependencyGraph, plan: PruningPlan) -> gs.Graph:
    """Remove the plan's channels from ``graph`` (the graph ``dep`` was built on), in place."""
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
            values = np.asarray(param.tensor.values)
            param.tensor.values = np.array(param.deleted(values, np.array(sorted(idx))), order="C")
    for node in touched.values():
        names = {t.name for t in list(node.inputs) + list(node.outputs)}
        mine = {s: g for s, g in removed.items() if s[0] in names}
        rule = rule_for(node)
        if rule is None:
            raise InternalError(f"node '{node.name}' ({node.op}) was pruned without a rule")
        rule.rewrite(node, mine, dep.ctx)
    outputs = {t.name for t in graph.outputs} | {t.name for t in graph.inputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in outputs:
            tensor.shape = None
    graph.cleanup().toposort()
    logger.debug("rewrote %d nodes, %d constants", len(touched), len(deletions))
    return graph
