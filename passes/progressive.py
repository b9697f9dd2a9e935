"""Progressive, probe-driven pruning: the PAODING and SRDFP methods.

Both remove each group's channels in small steps (``--step``, a share of the group per
step) until the target, and at every step:

1. **nominate** — every kept unit ``u`` is paired with its most similar kept unit ``v`` of the
   same group (cosine of their effective producer weights, BatchNorm folded in), with the
   least-squares merge scale ``s``; a cheap saliency ranks the pairs: the variance the merge
   leaves unexplained, ``var(u) (1 - cos^2)``, times the weight its consumers put on ``u``,
   times the first-order effect of its mask on the loss (``|dL/dm_u|``, every unit of every
   group from one reverse pass of the probe model);
2. **measure** — the best-nominated pairs (a few times the step's quota) are each applied in
   one row of a batched probe run (removal, merge into ``v``, mean compensation) and their
   effect on the output layer is measured on seeded synthetic inputs;
3. **select** — PAODING takes the pairs with the least impact; SRDFP walks them with
   simulated annealing on a robustness objective (the spread and entropy of the output
   deviation), accepting a worse pair with probability ``exp(-delta/T)``, T falling as the
   group is pruned;
4. **commit** — merges and compensation are applied to the weights, removed units' consumer
   weights are zeroed, and the probe model is rebuilt on the new weights for the next step.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_graphsurgeon as gs
from onnxprune.passes.cost import MacModel
from onnxprune.passes.methods import Budget, Method, Progress
from onnxprune.passes.planning import removal_count
from onnxprune.passes.reconstruct import Reconstructor, consumer_spaces, removed_atoms

from onnxprune.coupling import CONSUMER, PRODUCER
from onnxprune.depgraph import ChannelGroup
from onnxprune.plan import GroupPlan, PruningPlan
from onnxprune.probes import Impact, ProbeModel, mask_name, merge_dst_name, merge_src_name, probeable

logger = logging.getLogger(__name__)

#: Multiply-accumulates a progressive step may spend on probe rows (about a minute on 2 cores);
#: small models never reach it, resnet50 at 224x224 measures ~75 rows of 4 probes a step.
ROW_MACS = 1.2e12
#: Multiply-accumulates per onnxruntime run: a big model's batch streams its activations through
#: memory, so larger runs are slower per sample (resnet50 at 224x224: 96 ms per sample in runs
#: of 288, 55 ms in runs of 32); small models still run up to 2048 samples at once.
RUN_MACS = 1.5e11


def _per_saving(score: np.ndarray, saving: np.ndarray | None) -> np.ndarray:
    """Impact per share of the MACs a removal saves (a floor keeps free units from winning on
    noise alone)."""
    if saving is None:
        return score
    return score / (saving + 0.1 * float(np.median(saving)) + 1e-12)


def unit_vectors(group: ChannelGroup) -> np.ndarray:
    """Each unit's effective pre-activation weights: every producer's filter for it, scaled
    by the BatchNorm after that producer, with the folded bias as one more coordinate."""
    parts = []
    for member in group.members:
        if member.coupling.role != PRODUCER:
            continue
        weight = next((p for p in member.coupling.params if p.kind == "weight"), None)
        if weight is None:
            continue
        values = np.moveaxis(np.asarray(weight.tensor.values, np.float64), weight.axis, 0)
        local, unit = group.atoms[member.space]
        rows = np.zeros((group.size, values[0].size))
        to_param = dict(zip(weight.space.tolist(), weight.param.tolist()))
        first = {}
        for atom, u in zip(local.tolist(), unit.tolist()):
            first.setdefault(u, atom)
        bias = np.zeros(group.size)
        shift = next((p for p in member.coupling.params if p.kind == "shift"), None)
        for u, atom in first.items():
            rows[u] = values[to_param[atom]].ravel()
            if shift is not None:
                bias[u] = float(np.asarray(shift.tensor.values).reshape(-1)[to_param[atom]])
        scale, offset = _following_norm(member.node, group.size, first)
        parts.append(rows * scale[:, None])
        parts.append(((bias - offset[0]) * scale + offset[1])[:, None])
    return np.concatenate(parts, axis=1) if parts else np.zeros((group.size, 1))


def _following_norm(node: gs.Node, size: int, first: dict[int, int]):
    """(alpha, (running_mean, beta)) of a BatchNorm right after ``node``, per unit; identity otherwise."""
    users = node.outputs[0].outputs
    alpha, mean, beta = np.ones(size), np.zeros(size), np.zeros(size)
    if len(users) == 1 and users[0].op == "BatchNormalization":
        bn = users[0]
        gamma, b, rm, rv = (np.asarray(t.values, np.float64) for t in bn.inputs[1:5])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        for u, atom in first.items():
            alpha[u] = gamma[atom] / math.sqrt(rv[atom] + eps)
            mean[u], beta[u] = rm[atom], b[atom]
    return alpha, (mean, beta)


def _consumer_weight_norms(group: ChannelGroup) -> np.ndarray:
    """Per unit, the squared weight its consumers put on it."""
    consumer_params = {id(p) for m in group.members if m.coupling.role == CONSUMER for p in m.coupling.params}
    total = np.zeros(group.size)
    for space, p in group.param_slices(kinds=("weight",)):
        if id(p) in consumer_params:
            total += group.unit_squared_norms(space, p)
    return total


class Progressive(Method):
    """The shared loop; subclasses choose among measured candidates."""

    #: The papers' 2.5% per step: most of the damage is done in the last steps, and a finer
    #: step re-measures (and refits) before it. Models above LARGE_MACS take twice the step,
    #: which halves their time.
    default_step = 0.025
    LARGE_MACS = 1e9
    reconstruction = "least-squares"

    def __init__(self, probes: int = 16, nominate: float = 3.0):
        self.probes = probes
        self.nominate = nominate

    def plan(self, analysis, budget: Budget, progress: Progress | None = None) -> PruningPlan:
        dep = analysis.dep
        candidates = dep.prunable_groups(budget.exclude)
        # Groups whose consumers do not read batch-major tensors cannot carry probe masks.
        batch = next(iter(analysis.input_shapes.values()))[0] if analysis.input_shapes else 1
        groups = [g for g in candidates if probeable(g, dep.ctx.shapes, batch)]
        if len(groups) < len(candidates):
            logger.warning("%d group(s) cannot be probed and are left alone", len(candidates) - len(groups))
        targets = {g.id: removal_count(g, budget.ratio, budget.round_to) for g in groups}
        groups = [g for g in groups if targets[g.id] > 0]
        # The budget is what a uniform ratio removes: as many channels (default) or, with
        # --budget macs, as many MACs. Measured impact on the output layer (comparable across
        # groups; per MAC saved for a MAC budget) decides where it comes from, within caps.
        caps = {g.id: self._cap(g, budget, targets[g.id]) for g in groups}
        cost = MacModel(dep, groups)
        by_macs = budget.target == "macs"
        total = sum(targets.values())
        goal = cost.after_uniform(groups, targets)
        step = budget.step or self.default_step * (2 if analysis.macs > self.LARGE_MACS else 1)
        steps = max(1, math.ceil(budget.ratio / step - 1e-9))
        plans = {g.id: GroupPlan(g.id, g.name, g.size, [], [], [], [], []) for g in groups}
        plan = PruningPlan(self.name, budget.ratio, budget.seed, list(plans.values()), compensate=True,
                           reconstruction=self.reconstruction_for(analysis, budget),
                           details={"steps": steps, "probes": self.probes, "compensated": True,
                                    "allocation": "uniform" if budget.uniform else "by measured impact"})
        reconstructor = Reconstructor(dep, analysis.moments, spaces=consumer_spaces(*groups),
                                      statistics=lambda spaces, ridges: analysis.statistics(spaces, budget.seed, ridges))
        rng = np.random.default_rng(budget.seed)
        norms = {g.id: _consumer_weight_norms(g) for g in groups}
        removed, rows_measured = 0, 0
        # Large models measure fewer probes and rows per step: about ROW_MACS per step.
        per_sample = max(cost.base / max(batch, 1), 1)  # a probe input is one item of the analysed batch
        probes = int(np.clip(ROW_MACS / (64 * per_sample), 4, self.probes))
        row_limit = max(len(groups), int(ROW_MACS / (probes * per_sample)))
        run_batch = int(np.clip(RUN_MACS / per_sample, probes, 2048))
        plan.details.update(probes=probes, row_limit=row_limit, unprobed_groups=len(candidates) - len(groups))
        probe_inputs = analysis.probe_inputs(probes, budget.seed)  # before any weight changes
        # Grouped convolutions need equal removals per block, and --uniform asks for the same
        # share everywhere: those groups follow a per-group schedule; the rest compete globally.
        scheduled = {g.id for g in groups if budget.uniform or g.balance is not None}
        free = [g for g in groups if g.id not in scheduled]
        free_total = sum(targets[g.id] for g in free)
        for t in range(steps):
            quota = {g.id: round(targets[g.id] * (t + 1) / steps) - len(plans[g.id].remove)
                     for g in groups if g.id in scheduled}
            want, step_goal = 0, None
            if free and by_macs:
                step_goal = cost.base - (cost.base - goal) * (t + 1) / steps
                want = self._units_for(cost, free, plans, caps, step_goal)
            elif free:
                want = round(free_total * (t + 1) / steps) - sum(len(plans[g.id].remove) for g in free)
            quota.update(self._global_quota(free, plans, caps, want))
            active = [g for g in groups if quota.get(g.id, 0) > 0]
            if not active:
                continue
            estimates, residual = {}, {}
            if plan.reconstruction == "least-squares":  # probes measure what the commit will do
                stats = reconstructor.stats(t, consumer_spaces(*active))
                estimates, residual = self._estimates(active, plans, stats, removed_atoms(dep, plan, t - 1))
            probe = ProbeModel(analysis.graph, analysis.model, active, analysis.moments, analysis.prior,
                               analysis.input_shapes, inputs=probe_inputs, estimates=estimates, max_batch=run_batch)
            # Cheap stage: closed-form saliency times the first-order estimate (one backward run).
            taylor = probe.first_order() or {}
            pools = {g.id: self._pool(g, plans[g.id], quota[g.id], norms[g.id] * taylor.get(g.id, 1.0), analysis,
                                      residual.get(g.id))
                     for g in active}
            impact = self.refine(analysis, active, pools, self._measure(probe, active, pools, row_limit), probe)
            chosen = {}
            for g in active:
                if g.id in scheduled:
                    order = self.order(impact[g.id], rng, len(plans[g.id].remove) / targets[g.id], quota[g.id])
                    chosen[g.id] = self._feasible(g, pools[g.id], order, quota[g.id])
                    for u, *_ in chosen[g.id]:
                        cost.remove(g, u)
            competing = [g for g in active if g.id not in scheduled]
            if competing:
                done = (cost.base - cost.total()) / max(cost.base - goal, 1e-9) if by_macs else removed / max(total, 1)
                chosen.update(self._select_global(competing, pools, impact, step_goal, want, plans, caps, rng, done,
                                                  cost))
            for g in active:
                gp = plans[g.id]
                for u, v, s_, corr in chosen.get(g.id, []):
                    gp.remove.append(u)
                    gp.merge_into.append(v)
                    gp.merge_scale.append(s_)
                    gp.merge_corr.append(corr)
                    gp.steps.append(t)
                    removed += 1
            rows_measured += probe.runs
            reconstructor.apply(plan, steps={t}, zero_removed=True)
            if progress:
                progress(f"{self.name} steps", t + 1, steps)
        plan.groups = [gp for gp in plans.values() if gp.remove]
        plan.details["probe_rows"] = rows_measured
        return plan

    @staticmethod
    def _cap(group: ChannelGroup, budget: Budget, target: int) -> int:
        """The most a group may lose in global selection: twice its share, at most 90%."""
        return min(group.size - 1, max(target, round(group.size * min(0.9, 2 * budget.ratio))))

    @staticmethod
    def _units_for(cost: MacModel, groups, plans, caps, goal: float) -> int:
        """About how many more units reach ``goal`` MACs, at the current average saving."""
        excess = cost.total() - goal
        if excess <= 0:
            return 0
        savings = np.concatenate([cost.marginal(g) for g in groups if caps[g.id] > len(plans[g.id].remove)] or [[0]])
        return max(1, math.ceil(excess / max(float(np.median(savings)), 1e-9)))

    @staticmethod
    def _global_quota(groups, plans, caps, want: int) -> dict[int, int]:
        """How many candidates each group may contribute this step (room left under its cap,
        and a fair share of the step so that no group is measured for nothing)."""
        room = {g.id: caps[g.id] - len(plans[g.id].remove) for g in groups}
        left = sum(max(r, 0) for r in room.values())
        if want <= 0 or left <= 0:
            return {}
        return {gid: min(r, max(1, math.ceil(2 * want * r / left))) for gid, r in room.items() if r > 0}

    def _pool(self, group, gp, quota, norms, analysis, residual=None):
        if residual is not None:  # least squares: a unit's saliency is what the others cannot explain
            removed = set(gp.remove)
            candidates = sorted((float(norms[u] * residual[u]), u, -1, 0.0, 0.0)
                                for u in range(group.size) if u not in removed)
        else:
            candidates = self._candidates(group, gp, analysis, norms)
        return candidates[: max(quota, int(math.ceil(self.nominate * quota)), 4)]

    @staticmethod
    def _estimates(groups, plans, stats, gone):
        """Per consumer space of ``groups``: the matrix estimating each kept unit from the other
        live channels, with the channel means (for the probes), and per group the variance of
        each unit that the estimate leaves unexplained (for nomination)."""
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
            estimates[space] = (matrix, st.mean)
        sizes = {g.id: g.size for g in groups}
        return estimates, {gid: np.array([r.get(u, 0.0) for u in range(sizes[gid])]) for gid, r in residual.items()}

    @staticmethod
    def _measure(probe: ProbeModel, groups, pools, limit: int | None = None) -> dict[int, Impact]:
        """One batched run: each row ablates one candidate of one group.

        With a row ``limit`` (large models), each group measures its best-nominated candidates
        in proportion to its pool, and the others get the group's measured impact per unit of
        saliency times their own saliency: the cheap estimate, calibrated by measurement."""
        total = sum(len(pools[g.id]) for g in groups)
        if limit is None or total <= limit:
            measured = {g.id: len(pools[g.id]) for g in groups}
        else:
            measured = {g.id: max(1, min(len(pools[g.id]), limit * len(pools[g.id]) // total)) for g in groups}
        n = sum(measured.values())
        feeds, spans, row = {}, {}, 0
        for g in groups:
            mask = np.ones((n, g.size), np.float32)
            src = np.zeros((n, g.size), np.float32)
            dst = np.zeros((n, g.size), np.float32)
            for k, (_, u, v, s, _) in enumerate(pools[g.id][:measured[g.id]]):
                mask[row + k, u] = 0
                if v >= 0:
                    src[row + k, u], dst[row + k, v] = 1, s
            feeds.update({mask_name(g): mask, merge_src_name(g): src, merge_dst_name(g): dst})
            spans[g.id] = slice(row, row + measured[g.id])
            row += measured[g.id]
        impact = probe.measure(feeds)
        out = {}
        for g in groups:
            fields = [getattr(impact, f)[spans[g.id]] for f in Impact.__dataclass_fields__]
            missing = len(pools[g.id]) - measured[g.id]
            if missing:
                saliency = np.array([c[0] for c in pools[g.id]])
                seen = saliency[:measured[g.id]]
                rest = saliency[measured[g.id]:]
                fields = [np.concatenate([f, rest * float(np.mean(f / np.maximum(seen, 1e-12)))]) for f in fields]
            out[g.id] = Impact(*fields)
        return out

    def _select_global(self, groups, pools, impact, goal, want, plans, caps, rng, progress, cost: MacModel):
        """Rank every measured candidate of every group together and take them until the step's
        budget is spent: ``want`` units, or (``goal`` given) down to ``goal`` MACs, ranking
        by impact per MAC saved."""
        keys = [(g.id, r) for g in groups for r in range(len(pools[g.id]))]
        saving = None if goal is None else \
            np.concatenate([cost.marginal(g)[[c[1] for c in pools[g.id]]] for g in groups]) / cost.base
        merged = Impact(*(np.concatenate([getattr(impact[g.id], f) for g in groups])
                          for f in Impact.__dataclass_fields__))
        by_id = {g.id: g for g in groups}
        taken = {g.id: [] for g in groups}
        count = 0
        for k in self.order(merged, rng, progress, len(keys) if goal is not None else want, saving):
            if (goal is not None and cost.total() <= goal) or (goal is None and count >= want):
                break
            gid, r = keys[k]
            if caps[gid] - len(plans[gid].remove) - len(taken[gid]) <= 0:
                continue
            _, u, v, s, c = pools[gid][r]
            if any(u == t[1] for t in taken[gid]) or any(v == t[0] for t in taken[gid] if v >= 0):
                continue
            taken[gid].append((u, v, s, c))
            cost.remove(by_id[gid], u)
            count += 1
        return taken

    def _candidates(self, group: ChannelGroup, gp: GroupPlan, analysis, norms: np.ndarray):
        removed = set(gp.remove)
        kept = np.array([u for u in range(group.size) if u not in removed])
        vectors = unit_vectors(group)
        lengths = np.linalg.norm(vectors, axis=1) + 1e-12
        unit = vectors / lengths[:, None]
        cos = unit[kept] @ unit[kept].T
        np.fill_diagonal(cos, -np.inf)
        if group.balance is not None:  # merge only inside the same conv-group block
            same = group.balance[kept][:, None] == group.balance[kept][None, :]
            cos = np.where(same, cos, -np.inf)
        best = cos.argmax(axis=1)
        var = self._unit_variance(group, analysis)
        rows = []
        for i, u in enumerate(kept):
            v, c = int(kept[best[i]]), float(cos[i, best[i]])
            s = float(vectors[u] @ vectors[v] / (vectors[v] @ vectors[v] + 1e-12))
            if not np.isfinite(c) or c <= 0 or s <= 0:
                v, c, s = -1, 0.0, 0.0
            saliency = norms[u] * var[u] * (1 - c**2)
            rows.append((saliency, int(u), v, s, c))
        rows.sort()
        return rows

    @staticmethod
    def _unit_variance(group: ChannelGroup, analysis) -> np.ndarray:
        for member in group.members:
            if member.coupling.role == CONSUMER:
                m = analysis.moments.get(*member.space)
                if m is not None:
                    local, unit = group.atoms[member.space]
                    var = np.ones(group.size)
                    var[unit] = np.maximum(m.var[local], 1e-12)
                    return var
        return np.ones(group.size)

    def refine(self, analysis, groups, pools, impact, probe):
        """Hook for methods that add evidence beyond the probes (SRDFP's interval propagation)."""
        return impact

    def order(self, impact: Impact, rng: np.random.Generator, progress: float, quota: int,
              saving: np.ndarray | None = None) -> list[int]:
        """Candidate rows in the order this method takes them; PAODING: least impact on the
        output layer (relative L2 change plus the share of decisions it flips) per MAC saved."""
        return list(np.argsort(_per_saving(impact.rel_l2 + impact.top1, saving), kind="stable"))

    @staticmethod
    def _feasible(group, pool, order, quota):
        """Take candidates in ``order``: a unit that absorbs another this step stays, and
        balanced groups lose the same count per block."""
        blocks = 1 if group.balance is None else int(group.balance.max()) + 1
        per_block = quota // blocks if blocks > 1 else quota
        taken, targets, removed, counts = [], set(), set(), {}
        for r in order:
            _, u, v, s, c = pool[r]
            if u in targets or v in removed:
                continue
            block = 0 if group.balance is None else int(group.balance[u])
            if counts.get(block, 0) >= per_block:
                continue
            taken.append((u, v, s, c))
            removed.add(u)
            if v >= 0:
                targets.add(v)
            counts[block] = counts.get(block, 0) + 1
            if len(taken) == per_block * blocks:
                break
        return taken


class Paoding(Progressive):
    name = "paoding"
    description = "PAODING: progressive pair merging decided by measured impact on the output layer"


class Srdfp(Progressive):
    name = "srdfp"
    description = "SRDFP: progressive, simulated annealing on robustness of the output deviation"

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, intervals: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.intervals = alpha, beta, intervals

    def refine(self, analysis, groups, pools, impact, probe):
        """With ``intervals``, the robustness view comes from sound interval propagation of each
        candidate's deviation box instead of the probes' empirical deviation intervals."""
        if not self.intervals:
            return impact
        from onnxprune.intervals import DeviationIntervals, Unsupported, width_and_entropy
        engine = DeviationIntervals(analysis.graph, probe.output, analysis.shapes)
        for g in groups:
            starts, rows = {}, pools[g.id]
            for member in g.members:
                if member.coupling.role != CONSUMER or member.space[0] in starts:
                    continue
                tensor, axis = member.space
                shape = analysis.shapes[tensor]
                m = analysis.moments.get(tensor, axis)
                local, unit = g.atoms[member.space]
                hi = np.zeros((len(rows), shape[axis]))
                for r, (_, u, _, _, corr) in enumerate(rows):
                    atoms = local[unit == u]
                    sd = np.sqrt(m.var[atoms] * max(0.0, 1 - corr**2)) if m is not None else np.ones(len(atoms))
                    hi[r, atoms] = 3 * sd
                box = hi.reshape(len(rows), *([1] * (axis - 1)), shape[axis], *([1] * (len(shape) - axis - 1)))
                box = np.broadcast_to(box, (len(rows), *shape[1:])).copy()
                starts[tensor] = (-box, box)
            try:
                lo, hi = engine.propagate(starts)
            except Unsupported as exc:
                logger.info("interval propagation unavailable for %s: %s", g.name, exc)
                continue
            width, entropy = width_and_entropy(lo, hi)
            impact[g.id] = Impact(impact[g.id].rel_l2, impact[g.id].cosine, impact[g.id].top1, impact[g.id].margin,
                                  width / max(hi.reshape(len(hi), -1).shape[1], 1), entropy)
        return impact

    def order(self, impact, rng, progress, quota, saving=None):
        # Robustness objective, as paoding-dl scores a pair: the L1 size of the output
        # deviation intervals and their entropy, each squashed by a logistic (here relative to
        # the candidates' median so that the scale of the logits does not matter).
        width = impact.width / (np.median(impact.width) + 1e-12)
        entropy = impact.entropy / (np.median(impact.entropy) + 1e-12)
        score = self.alpha / (1 + np.exp(-width)) + self.beta / (1 + np.exp(-entropy))
        # Walk the candidates from least to most output change; accept one at least as good
        # as the last accepted, a worse one with probability exp(-delta / T), T falling from
        # 1 to 0 as pruning progresses (in units of the scores' spread).
        temperature = max(1.0 - progress, 1e-4) * float(np.std(score) + 1e-12)
        walk = list(np.argsort(_per_saving(impact.rel_l2 + impact.top1, saving), kind="stable"))
        order, current = [], None
        while walk and len(order) < quota:
            rejected = []
            for r in walk:
                delta = 0.0 if current is None else float(score[r] - current)
                if delta <= 0 or rng.random() < math.exp(-delta / temperature):
                    order.append(r)
                    current = score[r]
                else:
                    rejected.append(r)
            walk, current = rejected, None  # walk again over the rejected ones
        return order + walk
