"""Candidates of the progressive methods: which unit to remove, and where it merges.

A candidate removes kept unit ``unit`` of a group and, for pair merges, folds it into the
kept unit ``into`` scaled by ``scale`` (the least-squares merge coefficient of their effective
weights; ``corr`` is their cosine). Its ``saliency`` is the cheap estimate that nominates it
for measurement. Two nominations:

- **pair** — every kept unit is paired with its most similar kept unit of the same group
  (cosine of their effective producer weights, BatchNorm folded in); the saliency is the
  variance the merge leaves unexplained, ``var(u) (1 - cos^2)``, times the weight its
  consumers put on ``u``;
- **least squares** — a unit's saliency is the variance the estimate from every other live
  channel cannot explain, times its consumer weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnxprune.passes.reconstruct import consumer_spaces

from onnxprune.coupling import CONSUMER, PRODUCER
from onnxprune.depgraph import ChannelGroup
from onnxprune.evidence.priors import MomentPropagation
from onnxprune.plan import Corrections, GroupPlan


@dataclass(order=True)
class Candidate:
    """One removal a progressive step may make; ordered by saliency (then unit)."""

    saliency: float
    unit: int
    into: int = -1      # merge target, -1: removal with mean / least-squares compensation only
    scale: float = 0.0
    corr: float = 0.0

    @property
    def merges(self) -> bool:
        return self.into >= 0


def unit_vectors(group: ChannelGroup, corrections: Corrections) -> np.ndarray:
    """Each unit's effective pre-activation weights as corrected so far: every producer's
    filter for it, scaled by the BatchNorm after that producer, with the folded bias as one
    more coordinate."""
    parts = []
    for member in group.members:
        if member.coupling.role != PRODUCER:
            continue
        weight = next((p for p in member.coupling.params if p.kind == "weight"), None)
        if weight is None:
            continue
        values = np.moveaxis(np.asarray(corrections.read(weight.tensor), np.float64), weight.axis, 0)
        local, unit = group.atoms[member.space]
        rows = np.zeros((group.size, values[0].size))
        to_param = dict(zip(weight.space.tolist(), weight.param.tolist()))
        first = {}
        for atom, u in zip(local.tolist(), unit.tolist()):
            first.setdefault(u, atom)
        bias = np.zeros(group.size)
        shift = _shift_values(member, corrections)
        for u, atom in first.items():
            rows[u] = values[to_param[atom]].ravel()
            if shift is not None:
                bias[u] = float(shift[to_param[atom]])
        scale, offset = _following_norm(member.node, group.size, first, corrections)
        parts.append(rows * scale[:, None])
        parts.append(((bias - offset[0]) * scale + offset[1])[:, None])
    return np.concatenate(parts, axis=1) if parts else np.zeros((group.size, 1))


def _shift_values(member, corrections: Corrections) -> np.ndarray | None:
    """The producer's bias, flat: its own, or the one reconstruction gave it."""
    shift = next((p for p in member.coupling.params if p.kind == "shift"), None)
    if shift is not None:
        return np.asarray(corrections.read(shift.tensor)).reshape(-1)
    node = member.node
    if node.name in corrections.biases and member.space == (node.outputs[0].name, 1):
        return corrections.biases[node.name].reshape(-1)
    return None


def _following_norm(node: gs.Node, size: int, first: dict[int, int], corrections: Corrections):
    """(alpha, (running_mean, beta)) of a BatchNorm right after ``node``, per unit; identity otherwise."""
    users = node.outputs[0].outputs
    alpha, mean, beta = np.ones(size), np.zeros(size), np.zeros(size)
    if len(users) == 1 and users[0].op == "BatchNormalization":
        bn = users[0]
        gamma, b, rm, rv = (np.asarray(corrections.read(t), np.float64) for t in bn.inputs[1:5])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        for u, atom in first.items():
            alpha[u] = gamma[atom] / math.sqrt(rv[atom] + eps)
            mean[u], beta[u] = rm[atom], b[atom]
    return alpha, (mean, beta)


def consumer_weight_norms(group: ChannelGroup) -> np.ndarray:
    """Per unit, the squared weight its consumers put on it."""
    consumer_params = {id(p) for m in group.members if m.coupling.role == CONSUMER for p in m.coupling.params}
    total = np.zeros(group.size)
    for space, p in group.param_slices(kinds=("weight",)):
        if id(p) in consumer_params:
            total += group.unit_squared_norms(space, p)
    return total


def unit_variance(group: ChannelGroup, moments: MomentPropagation) -> np.ndarray:
    """Each unit's data-free variance where its first consumer reads it (ones if unknown)."""
    for member in group.members:
        if member.coupling.role == CONSUMER:
            m = moments.get(*member.space)
            if m is not None:
                local, unit = group.atoms[member.space]
                var = np.ones(group.size)
                var[unit] = np.maximum(m.var[local], 1e-12)
                return var
    return np.ones(group.size)


def pair_candidates(group: ChannelGroup, gp: GroupPlan, norms: np.ndarray, variance: np.ndarray,
                    corrections: Corrections) -> list[Candidate]:
    """Every kept unit paired with its most similar kept unit, least salient first."""
    removed = set(gp.remove)
    kept = np.array([u for u in range(group.size) if u not in removed])
    vectors = unit_vectors(group, corrections)
    lengths = np.linalg.norm(vectors, axis=1) + 1e-12
    unit = vectors / lengths[:, None]
    cos = unit[kept] @ unit[kept].T
    np.fill_diagonal(cos, -np.inf)
    if group.balance is not None:  # merge only inside the same conv-group block
        same = group.balance[kept][:, None] == group.balance[kept][None, :]
        cos = np.where(same, cos, -np.inf)
    best = cos.argmax(axis=1)
    rows = []
    for i, u in enumerate(kept):
        v, c = int(kept[best[i]]), float(cos[i, best[i]])
        s = float(vectors[u] @ vectors[v] / (vectors[v] @ vectors[v] + 1e-12))
        if not np.isfinite(c) or c <= 0 or s <= 0:
            v, c, s = -1, 0.0, 0.0
        rows.append(Candidate(norms[u] * variance[u] * (1 - c**2), int(u), v, s, c))
    rows.sort()
    return rows


def residual_candidates(group: ChannelGroup, gp: GroupPlan, norms: np.ndarray, residual: np.ndarray) -> list[Candidate]:
    """Least squares: each kept unit, salient by what the other channels cannot explain."""
    removed = set(gp.remove)
    return sorted(Candidate(float(norms[u] * residual[u]), u) for u in range(group.size) if u not in removed)


def least_squares_estimates(groups: list[ChannelGroup], plans: dict[int, GroupPlan], stats: dict,
                            gone: dict[str, set[int]]):
    """Per consumer space of ``groups``: the matrix ``B`` estimating each kept unit from the
    other live channels and the bias ``mu - B mu`` (``mu`` the channel means), both as the
    probes' float32 constants (fitted in float64: on resnet50 the float64 matrices of a step
    were 173 MB); and per group the variance of each unit that the estimate leaves unexplained
    (for nomination)."""
    estimates, residual = {}, {}
    for space in consumer_spaces(*groups):
        st = stats[space]
        dead = gone.get(space[0], set())
        live = np.array([c for c in range(len(st.mean)) if c not in dead], dtype=np.int64)
        keys, atoms = [], []
        for g in groups:
            if space not in g.atoms:
                continue
            local, unit = g.atoms[space]
            removed = set(plans[g.id].remove)
            for u in np.unique(unit):
                if int(u) not in removed:
                    keys.append((g.id, int(u)))
                    atoms.append(local[unit == u])
        matrix = np.zeros((len(st.mean), len(st.mean)))
        for k, (b, res) in st.leave_one_out(atoms, live).items():
            matrix[np.ix_(atoms[k], live)] = b
            gid, u = keys[k]
            residual.setdefault(gid, {}).setdefault(u, float(res.sum()))
        estimates[space] = (matrix.astype(np.float32), (st.mean - matrix @ st.mean).astype(np.float32))
    sizes = {g.id: g.size for g in groups}
    return estimates, {gid: np.array([r.get(u, 0.0) for u in range(sizes[gid])]) for gid, r in residual.items()}
