"""How a whole plan becomes one row of the plan probe (:mod:`onnxprune.evidence.plan_probes`).

At every consumer input of a pruned group, a removed channel reads what the reconstruction
will make its consumers compute:

- **pair**: its mean, or, merged into kept unit ``v`` with scale ``s``, ``s x_v + mean_u - s
  mean_v`` (the data-free means of :mod:`onnxprune.evidence.priors`, as the reconstructor uses
  them);
- **least squares**: ``mu_R + B (x_K - mu_K)``, ``B`` the estimate of the removed channels from
  every kept one, from the channel statistics the reconstructor fits with (measured once on the
  unpruned graph: a one-shot plan fits there too), per conv-group block where a grouped
  convolution reads the space.

Variance compensation is read off the reconstructor itself, run on the plan: the BatchNorms
whose running variance it lowers are rescaled in the row. So a row scores what will be written
(up to zero padding, which reads zeros where the written bias reads the mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import onnx_graphsurgeon as gs
from onnxprune.passes.reconstruct import Reconstructor

from onnxprune.depgraph import ChannelGroup
from onnxprune.evidence.plan_probes import Mixing, PlanProbe, Substitution
from onnxprune.evidence.probes import consumer_nodes
from onnxprune.evidence.statistics import RIDGE, RIDGE_PER_POSITION, ChannelStats
from onnxprune.plan import GroupPlan, PruningPlan


@dataclass
class SharedPrecision(ChannelStats):
    """Channel statistics whose estimates share work across plans: a one-shot plan estimates
    its removed channels from all the others, so every estimate inverts the same matrix
    (``cov + lambda I`` over every channel, one per ridge), and the reconstructor, run on the
    same plan for its variance compensation, asks for the estimates the row just computed.
    The numbers are :meth:`ChannelStats.estimator`'s."""

    cache: dict = field(default_factory=dict, repr=False)

    def estimator(self, removed: np.ndarray, live: np.ndarray, ridge: float | None = None):
        size = len(self.mean)
        if self.cov is None or ridge is not None or not len(removed) or not len(live) \
                or len(removed) + len(live) != size:
            return super().estimator(removed, live, ridge)
        key = (np.asarray(removed).tobytes(), np.asarray(live).tobytes())
        if key in self.cache:
            return self.cache[key]
        factor = max(self.ridge or RIDGE, RIDGE_PER_POSITION * len(live) / max(self.count, 1))
        if factor not in self.cache:
            lam = factor * max(float(np.mean(np.diag(self.cov))), 1e-12)
            self.cache[factor] = (np.linalg.inv(self.cov + lam * np.eye(size)), lam)
        precision, lam = self.cache[factor]
        p_rr = precision[np.ix_(removed, removed)]
        # one factorisation for the estimate and the inverse's diagonal (the residual)
        solved = np.linalg.solve(p_rr, np.concatenate([precision[np.ix_(removed, live)], np.eye(len(removed))], axis=1))
        b = -solved[:, :len(live)]
        residual = np.maximum(np.diag(solved[:, len(live):]) - lam, 0.0)
        if len(self.cache) > 64:  # the estimates of the last few plans
            self.cache = {k: v for k, v in self.cache.items() if not isinstance(k, tuple)}
        self.cache[key] = (b, residual)
        return b, residual


class PlanRows:
    def __init__(self, analysis, groups: list[ChannelGroup], reconstruction: str, compensate: bool, seed: int):
        self.analysis, self.reconstruction, self.compensate = analysis, reconstruction, compensate
        self.groups = {g.id: g for g in groups}
        self.atoms: dict[int, dict] = {}  # per group, per consumer space: each unit's atoms, sorted
        for g in groups:
            self.atoms[g.id] = {}
            for space in consumer_nodes(g):
                local, unit = g.atoms[space]
                by_unit = np.argsort(unit, kind="stable")
                starts = np.searchsorted(unit[by_unit], np.arange(g.size + 1))
                self.atoms[g.id][space] = [np.sort(local[by_unit[starts[u]:starts[u + 1]]]) for u in range(g.size)]
        self.spaces = sorted({s for per in self.atoms.values() for s in per})
        stats = analysis.statistics(self.spaces, seed, {}) if reconstruction == "least-squares" else {}
        self.stats = {s: SharedPrecision(**{f.name: getattr(st, f.name) for f in fields(ChannelStats)})
                      for s, st in stats.items()}
        self.means = {s: self._mean(s) for s in self.spaces}
        self.blocks = {s: _blocks(analysis.graph, s, analysis.shapes) for s in self.stats}
        outputs = {t.name for t in analysis.graph.outputs}
        self.norms = {n.outputs[0].name: n for n in analysis.graph.nodes if n.op == "BatchNormalization"
                      and n.outputs[0].name not in outputs and all(isinstance(t, gs.Constant) for t in n.inputs[1:5])}

    def _mean(self, space) -> np.ndarray:
        if space in self.stats:
            return np.asarray(self.stats[space].mean, np.float64)
        m = self.analysis.moments.get(*space)
        return np.zeros(self.analysis.shapes[space[0]][space[1]]) if m is None else np.asarray(m.mean, np.float64)

    def coverage(self, group: ChannelGroup) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """Per consumer space of ``group`` with a covariance: (covariance, the ridge the
        estimates use there, the unit of each channel or -1), for the coverage order."""
        out = []
        for space, atoms in self.atoms[group.id].items():
            st = self.stats.get(space)
            if st is None or st.cov is None:
                continue
            unit = np.full(len(st.mean), -1, dtype=np.int64)
            for u, channels in enumerate(atoms):
                unit[channels] = u
            factor = max(st.ridge or RIDGE, RIDGE_PER_POSITION * len(st.mean) / max(st.count, 1))
            out.append((st.cov, factor * max(float(np.mean(np.diag(st.cov))), 1e-12), unit))
        return out

    def probe(self, groups: list[ChannelGroup], inputs: dict, max_batch: int) -> PlanProbe:
        estimated = [s for s, st in self.stats.items() if st.cov is not None]
        a = self.analysis
        return PlanProbe(a.graph, a.model, groups, a.shapes, inputs, max_batch,
                         rescaled=list(self.norms) if self.compensate else [], estimated=estimated)

    def rows(self, plans: list[GroupPlan], probe: PlanProbe) -> dict:
        """The probe's inputs for ``plans`` (keyed as :meth:`PlanProbe.run` reads them)."""
        out: dict = {}
        removed: dict = {}
        for gp in plans:
            for space, atoms in self.atoms[gp.group].items():
                removed.setdefault(space, []).extend(atoms[u] for u in gp.remove)
                if space in probe.estimated:
                    continue
                sub = out.setdefault(("consumer", space), Substitution.identity(probe.channels[space]))
                mean = self.means[space] if self.compensate else np.zeros(len(sub.gain))
                merges = self.reconstruction == "pair" and self.compensate
                for unit, into, scale in zip(gp.remove, gp.merge_into or [-1] * len(gp.remove), gp.merge_scale):
                    src = atoms[unit]
                    sub.gain[src], sub.offset[src] = 0.0, mean[src]
                    if merges and into >= 0 and len(atoms[into]) == len(src):
                        dst = atoms[into]
                        sub.index[src], sub.gain[src] = dst, scale
                        sub.offset[src] = mean[src] - scale * mean[dst]
        for space in probe.estimated:
            if space in removed:
                out[("estimate", space)] = self._mixing(space, np.sort(np.concatenate(removed[space])))
        if self.compensate:
            out.update(self._rescaled_norms(plans))
        return out

    def _mixing(self, space, removed: np.ndarray) -> Mixing:
        """Kept channels read themselves; removed ones the least-squares estimate from the kept
        ones of their block (what the reconstructor folds into the consumers)."""
        st, blocks = self.stats[space], self.blocks[space]
        mix = Mixing.identity(len(st.mean))
        gone = np.zeros(len(st.mean), bool)
        gone[removed] = True
        for b in np.unique(blocks[removed]):
            rem = np.flatnonzero(gone & (blocks == b))
            keep = np.flatnonzero(~gone & (blocks == b))
            estimate, _ = st.estimator(rem, keep)
            mix.matrix[rem] = 0.0
            if len(keep):
                mix.matrix[np.ix_(rem, keep)] = estimate
            mix.offset[rem] = st.mean[rem] - (estimate @ st.mean[keep] if len(keep) else 0.0)
        return mix

    def _rescaled_norms(self, plans: list[GroupPlan]) -> dict:
        """The BatchNorm outputs variance compensation rescales, as the reconstructor computes
        it for ``plans``."""
        plan = PruningPlan("rows", 0.0, 0, plans, reconstruction=self.reconstruction)
        stats = self.stats
        reconstructor = Reconstructor(self.analysis.dep, self.analysis.moments, spaces=self.spaces,
                                      statistics=lambda spaces, ridges: {s: stats[s] for s in spaces})
        corrections = reconstructor.apply(plan)
        out = {}
        for tensor, bn in self.norms.items():
            if bn.inputs[4].name not in corrections.patches:
                continue
            var = corrections.read(bn.inputs[4])
            eps = float(bn.attrs.get("epsilon", 1e-5))
            old = np.asarray(bn.inputs[4].values, np.float64)
            gain = np.sqrt((old + eps) / (np.asarray(var, np.float64) + eps))
            beta = np.asarray(bn.inputs[2].values, np.float64)
            out[("norm", (tensor, 1))] = Substitution(np.arange(len(gain)), gain, beta * (1 - gain))
        return out


def _blocks(graph: gs.Graph, space, shapes: dict) -> np.ndarray:
    """Each channel's conv-group block where a grouped convolution reads the space (all 0
    otherwise): least squares estimates within a block, as the consumer only mixes those."""
    tensor, axis = space
    channels = shapes[tensor][axis]
    for node in graph.nodes:
        if node.op == "Conv" and node.inputs and node.inputs[0].name == tensor and int(node.attrs.get("group", 1)) > 1:
            return np.arange(channels) // max(channels // int(node.attrs["group"]), 1)
    return np.zeros(channels, dtype=np.int64)
