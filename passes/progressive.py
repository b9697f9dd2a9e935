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
from dataclasses import dataclass, field

import numpy as np
from onnxprune.passes import allocation
from onnxprune.passes.candidates import (
    Candidate,
    consumer_weight_norms,
    least_squares_estimates,
    pair_candidates,
    residual_candidates,
    unit_variance,
)
from onnxprune.passes.cost import MacModel
from onnxprune.passes.measurement import measure
from onnxprune.passes.methods import Budget, Method, Progress
from onnxprune.passes.planning import removal_count
from onnxprune.passes.reconstruct import Reconstructor, consumer_spaces, removed_atoms

from onnxprune.coupling import CONSUMER
from onnxprune.depgraph import ChannelGroup
from onnxprune.evidence.frontier import Throughput
from onnxprune.evidence.probes import Impact, ProbeModel, mergeable, probeable, stacks_samples
from onnxprune.intervals import DeviationIntervals, Unsupported, width_and_entropy
from onnxprune.ir import holding, release_memory
from onnxprune.plan import GroupPlan, PruningPlan
from onnxprune.profiling import stage
from onnxprune.rewrite import corrected

logger = logging.getLogger(__name__)

#: Multiply-accumulates that set the probe count: PROBES while 64 rows of them stay under
#: it, fewer (4 at least) above; resnet50 at 224x224 measures 4.
PROBE_MACS = 3e11
#: Probes a row runs at most: SMALL_MAP_PROBES on nets inverted on their statistics
#: (BatchNorm, or centring where it was folded) whose activations stay under
#: analysis.CONVERGE_ACTIVATIONS elements a sample (rows are cheap there, and 16 probes left
#: the planning to chance: `models/` ResNet, MobileNet and DenseNet at macs=0.35, three seeds,
#: 0.859 on 16, 0.911 on 32, 0.904 on 64; docs/methods.md, "Probes a row"); PROBES on larger
#: maps, where rows are most of the time (a text-line classifier: 99 s of 120), and on nets
#: inverted from class targets, which lost with more (ViTs: `models/` 0.839 -> 0.824, the
#: zoo's 0.736 -> 0.633).
PROBES = 16
SMALL_MAP_PROBES = 32
#: How far past a target share's goal (a share of the goal's cost) a step may land: a unit
#: that crosses it further is passed over for one that lands nearer (on a small net one
#: channel can be 4% of the MACs, and the first-ranked one overshot macs=0.5 to 48.1%).
LANDING_SLACK = 0.01
#: Multiply-accumulates a progressive step may spend on probe rows, at least one row per
#: group; the unmeasured candidates get their group's measured impact per unit of saliency.
#: The digits nets stay under it (the most: the zoo ResNeXt's 388 rows of its 461), real
#: models do not: at 3e11 (PROBE_MACS: ~4 s of resnet50's dense convs, ~20 s of depthwise
#: ones) a 16 MMAC text-line classifier measured 283 rows of 16 probes a step, 99 s of its
#: 120, and a 154 MMAC page classifier 121 rows (now 153 and 17).
ROW_MACS = 4e10
#: Multiply-accumulates per onnxruntime run: a big model's batch streams its activations through
#: memory, so larger runs are slower per sample (resnet50 at 224x224: 96 ms per sample in runs
#: of 288, 55 ms in runs of 32); small models still run up to 2048 samples at once.
RUN_MACS = 1.5e11
#: Activation bytes per onnxruntime run (every tensor of the model counted once per sample).
#: Past a few hundred MB the run streams through memory and slows per sample even on small
#: nets: the digits MobileNet (1 MB a sample) runs 19 us a sample in batches of 256 and 38 us
#: in batches of 2048, the digits ViT (2.1 MB) 158 us at 64 and 255 us at 2048.
RUN_BYTES = 2e8


def run_batch(analysis, per_sample: float) -> int:
    """Samples per probe run: as many as RUN_MACS buy and RUN_BYTES of activations hold (a
    detector at 640x640 holds ~100 MB of activations per sample), 2048 at most, at least one.
    Below a row of probes a row runs in parts (the same outputs: samples are independent)."""
    batch = analysis.batch
    floats = sum(int(np.prod(s)) for s in analysis.shapes.values() if s and all(isinstance(d, int) for d in s))
    per_sample_bytes = 4 * floats / max(batch, 1)
    return int(max(1, min(RUN_MACS / per_sample, RUN_BYTES / max(per_sample_bytes, 1), 2048)))


def _per_saving(score: np.ndarray, saving: np.ndarray | None) -> np.ndarray:
    """Impact per share of the MACs a removal saves (a floor keeps free units from winning on
    noise alone)."""
    if saving is None:
        return score
    return score / (saving + 0.1 * float(np.median(saving)) + 1e-12)


@dataclass
class _Run:
    """One progressive planning run: the groups, their targets and caps, and what is taken so far."""

    analysis: object
    budget: Budget
    groups: list[ChannelGroup]
    targets: dict[int, int]
    caps: dict[int, int]
    cost: MacModel
    goal: float
    steps: int
    plans: dict[int, GroupPlan]
    plan: PruningPlan
    reconstructor: Reconstructor
    norms: dict[int, np.ndarray]
    probe_inputs: dict[str, np.ndarray]
    row_limit: int
    run_batch: int
    scheduled: set[int]
    rng: np.random.Generator
    removed: int = 0
    rows_measured: int = 0
    #: Whether nomination uses the first-order factor: False where a group cannot merge (see
    #: Progressive._start), and once the pass could not be built (what stops it, an op
    #: without a backward rule, is the model's, so later steps skip it).
    first_order: bool = True
    free: list[ChannelGroup] = field(default_factory=list)
    #: How fast this model's probe rows run (it plans their frontier blocks).
    throughput: Throughput = field(default_factory=Throughput)

    @property
    def by_macs(self) -> bool:
        """The budget counts MACs (or parameters: the same machinery, another cost)."""
        return self.budget.target != "channels"


class Progressive(Method):
    """The shared loop; subclasses choose among measured candidates."""

    allocates = True  # measured impact decides how much each group loses
    #: The papers' 2.5% per step: most of the damage is done in the last steps, and a finer
    #: step re-measures (and refits) before it. Models above LARGE_MACS take twice the step,
    #: which halves their time.
    default_step = 0.025
    LARGE_MACS = 1e9
    reconstruction = "least-squares"

    def __init__(self, probes: int | None = None, nominate: float = 3.0, allocate: bool = True):
        self.probes = probes  # None: PROBES or SMALL_MAP_PROBES, by the model's inversion and maps
        self.nominate = nominate
        self.allocate = allocate  # False: every group loses the uniform count (only which units is measured)

    def plan(self, analysis, budget: Budget, progress: Progress | None = None) -> PruningPlan:
        """Plan on the analysed model, which stays as it was: every step's compensation goes
        into the plan's corrections, and probes and statistics measure a corrected copy."""
        run = self._start(analysis, budget)
        for t in range(run.steps):
            self._step(run, t)
            if progress:
                progress(f"{self.name} steps", t + 1, run.steps)
        run.plan.groups = [gp for gp in run.plans.values() if gp.remove]
        run.plan.details["probe_rows"] = run.rows_measured
        run.plan.details["first_order"] = run.first_order
        run.plan.corrections = run.reconstructor.corrections
        return run.plan

    def cannot_plan(self, analysis) -> str | None:
        """Probes stack their rows on the first axis of every input: inputs that stack samples
        elsewhere (a recurrent state [layers, batch, hidden], a scalar) cannot carry them."""
        odd = [name for name, axis in analysis.sample_axes.items() if axis != 0]
        if odd:
            return f"probes need every input batch-first, and {', '.join(map(repr, odd))} is not"
        if not stacks_samples(analysis.graph, analysis.model, analysis.input_shapes, analysis.prior):
            return "probes stack samples on the first axis, and this model does not run them apart there"
        return None

    def _start(self, analysis, budget: Budget) -> _Run:
        dep = analysis.dep
        candidates = dep.prunable_groups(budget.exclude)
        # Groups whose consumers do not read batch-major tensors cannot carry probe masks.
        batch = analysis.batch
        top = set(analysis.graph.tensors())  # masks go into the main graph, not into If branches
        groups = [g for g in candidates if probeable(g, dep.ctx.shapes, batch)
                  and all(m.space[0] in top for m in g.members)]
        if len(groups) < len(candidates):
            logger.warning("%d group(s) cannot be probed and are left alone", len(candidates) - len(groups))
        ratio, cost, counts = budget.resolved(analysis, groups)
        targets = {g.id: removal_count(g, ratio, budget.round_to) for g in groups}
        if budget.round_to > 1 and counts:  # aligned widths: the counts that reach the target
            targets = counts
        groups = [g for g in groups if targets[g.id] > 0]
        cost = cost or MacModel(dep, groups)
        goal = budget.goal(analysis, cost) if budget.share is not None else cost.after_uniform(groups, targets)
        step = budget.step or self.default_step * (2 if analysis.macs > self.LARGE_MACS else 1)
        steps = max(1, math.ceil(ratio / step - 1e-9))
        plans = {g.id: GroupPlan(g.id, g.name, g.size, [], [], [], [], []) for g in groups}
        plan = PruningPlan(self.name, ratio, budget.seed, list(plans.values()), compensate=True,
                           reconstruction=self.reconstruction_for(analysis, budget),
                           details={"steps": steps, "probes": self.probes,
                                    "allocation": "by measured impact"})
        reconstructor = Reconstructor.for_analysis(analysis, groups, budget.seed)
        # Large models measure fewer probes and rows per step: about ROW_MACS per step.
        per_sample = max(cost.base / max(batch, 1), 1)  # a probe input is one item of the analysed batch
        objective = analysis.distiller.objective if analysis.distiller is not None else None
        many = objective is not None and (objective.batchnorm or objective.balance) and analysis.small_maps
        probes = int(np.clip(PROBE_MACS / (64 * per_sample), 4, self.probes or (SMALL_MAP_PROBES if many else PROBES)))
        row_limit = max(len(groups), int(ROW_MACS / (probes * per_sample)))
        plan.details.update(probes=probes, row_limit=row_limit, unprobed_groups=len(candidates) - len(groups))
        # Grouped convolutions need equal removals per block, and --round-to aligned counts:
        # those groups follow a per-group schedule; the rest compete globally.
        scheduled = {g.id for g in groups if g.balance is not None or not self.allocate or budget.round_to > 1}
        # The first-order factor stays on where every unit merges (the nets it was tuned on).
        # On the nets with flattened conv maps or attention heads it had been off by a fault;
        # turned on, it measured worse (both VGGs and ViTs, 3 seeds at macs=0.5 and 0.35: zoo
        # ViT 0.887 -> 0.820 at 0.5, models/ VGG 0.975 -> 0.958 at 0.35): off there.
        first_order = all(mergeable(g) for g in groups)
        return _Run(analysis, budget, groups, targets,
                    caps={g.id: allocation.cap(g, ratio, targets[g.id]) for g in groups},
                    cost=cost, goal=goal, steps=steps, plans=plans, plan=plan,
                    reconstructor=reconstructor, norms={g.id: consumer_weight_norms(g) for g in groups},
                    probe_inputs=analysis.probe_inputs(probes, budget.seed), row_limit=row_limit,
                    run_batch=run_batch(analysis, per_sample), scheduled=scheduled,
                    rng=np.random.default_rng(budget.seed),
                    free=[g for g in groups if g.id not in scheduled], first_order=first_order)

    def _quota(self, run: _Run, t: int) -> tuple[dict[int, int], int, float | None]:
        """This step's candidates per group, and for the free groups the units (or the MAC
        goal) the step must reach."""
        quota = allocation.scheduled_quota([g for g in run.groups if g.id in run.scheduled], run.plans,
                                           run.targets, t, run.steps)
        want, step_goal = 0, None
        if run.free and run.by_macs:
            step_goal = run.cost.base - (run.cost.base - run.goal) * (t + 1) / run.steps
            want = allocation.units_for(run.cost, run.free, run.plans, run.caps, step_goal)
        elif run.free:
            free_total = sum(run.targets[g.id] for g in run.free)
            want = round(free_total * (t + 1) / run.steps) - sum(len(run.plans[g.id].remove) for g in run.free)
        quota.update(allocation.global_quota(run.free, run.plans, run.caps, want))
        return quota, want, step_goal

    def _step(self, run: _Run, t: int) -> None:
        """Nominate, measure, select and commit one step."""
        quota, want, step_goal = self._quota(run, t)
        active = [g for g in run.groups if quota.get(g.id, 0) > 0]
        if not active:
            return
        analysis = run.analysis
        estimates, residual = {}, {}
        if run.plan.reconstruction == "least-squares":  # probes measure what the commit will do
            stats = run.reconstructor.stats(t, consumer_spaces(*active))
            gone = removed_atoms(analysis.dep, run.plan, t - 1)
            with stage("fits"):
                estimates, residual = least_squares_estimates(active, run.plans, stats, gone)
        # A large probe model holds its weights once for the step (its dense, gradient and
        # sub-models and their sessions share the arrays); the block frees them with it.
        with holding():
            corrections = run.reconstructor.corrections
            with stage("probe model"):
                probe = ProbeModel(corrected(analysis.graph, corrections), analysis.model, active, analysis.moments,
                                   analysis.prior, analysis.input_shapes, inputs=run.probe_inputs, estimates=estimates,
                                   max_batch=run.run_batch, throughput=run.throughput)
            # Cheap stage: closed-form saliency times the first-order estimate (one backward run).
            taylor = {}
            if run.first_order:
                with stage("first order"):
                    taylor = probe.first_order()
                run.first_order = taylor is not None
                taylor = taylor or {}
            pools = {g.id: self._pool(g, run.plans[g.id], quota[g.id], run.norms[g.id] * taylor.get(g.id, 1.0),
                                      analysis, corrections, residual.get(g.id))
                     for g in active}
            with stage("measure"):
                impact = self.refine(analysis, active, pools, measure(probe, active, pools, run.row_limit), probe)
            run.rows_measured += probe.runs
            del probe  # its sessions and corrected weights: freed with the block's arrays
        chosen = self._choose(run, active, pools, impact, quota, want, step_goal)
        for g in active:
            gp = run.plans[g.id]
            for c in chosen.get(g.id, []):
                gp.remove.append(c.unit)
                gp.merge_into.append(c.into)
                gp.merge_scale.append(c.scale)
                gp.merge_corr.append(c.corr)
                gp.steps.append(t)
                run.removed += 1
        with stage("commit"):
            run.reconstructor.apply(run.plan, steps={t}, zero_removed=True)
        release_memory()

    def _choose(self, run: _Run, active, pools, impact, quota, want, step_goal) -> dict[int, list[Candidate]]:
        """Scheduled groups take their quota each; the others compete for the step's budget,
        less what the scheduled groups still owe in later steps (else the free groups spend
        it first and the last steps overshoot: a digits ResNeXt at macs=0.36 kept 32.5%)."""
        chosen = {}
        for g in active:
            if g.id in run.scheduled:
                order = self.order(impact[g.id], run.rng, len(run.plans[g.id].remove) / run.targets[g.id], quota[g.id])
                chosen[g.id] = allocation.take_feasible(g.balance, pools[g.id], order, quota[g.id])
                for c in chosen[g.id]:
                    run.cost.remove(g, c.unit)
        competing = [g for g in active if g.id not in run.scheduled]
        if competing:
            cost, wide = run.cost, None
            if step_goal is not None:
                owed = self._owed(run, chosen)
                step_goal += owed
                if run.budget.share is not None:
                    # a unit larger than a step's share of the target plus the slack can never
                    # land near a step's goal (a ViT's attention head, 3-7% of its MACs against
                    # 2.4% a step)
                    wide = ((cost.base - run.goal) / run.steps + LANDING_SLACK * step_goal, run.goal + owed)
            done = (cost.base - cost.total()) / max(cost.base - run.goal, 1e-9) if run.by_macs \
                else run.removed / max(sum(run.targets.values()), 1)
            chosen.update(self._select_global(competing, pools, impact, step_goal, want, run.plans, run.caps,
                                              run.rng, done, cost, exact=run.budget.share is not None, wide=wide))
        return chosen

    @staticmethod
    def _owed(run: _Run, chosen: dict[int, list[Candidate]]) -> float:
        """The cost the scheduled groups will still remove after this step's ``chosen``, at
        today's sizes (grouped convolutions remove whole blocks, so they lag their schedule)."""
        late = [g for g in run.groups if g.id in run.scheduled]
        owed = {g.id: run.targets[g.id] - len(run.plans[g.id].remove) - len(chosen.get(g.id, ())) for g in late}
        if not any(n > 0 for n in owed.values()):
            return 0.0
        return run.cost.total() - run.cost.after_uniform(late, {k: max(n, 0) for k, n in owed.items()})

    def _pool(self, group, gp, quota, norms, analysis, corrections, residual=None) -> list[Candidate]:
        if residual is not None:  # least squares: a unit's saliency is what the others cannot explain
            candidates = residual_candidates(group, gp, norms, residual)
        else:
            candidates = pair_candidates(group, gp, norms, unit_variance(group, analysis.moments), corrections)
        size = max(quota, int(math.ceil(self.nominate * quota)), 4)
        if group.balance is None:
            return candidates[:size]
        # Balanced groups (grouped convolutions) lose as many units in every block: nominate
        # in every block, or a block the ranking skips stalls the whole group's step.
        blocks = int(group.balance.max()) + 1
        per_block = max(1, math.ceil(size / blocks))
        seen: dict[int, int] = {}
        nominated = []
        for c in candidates:
            block = int(group.balance[c.unit])
            if seen.get(block, 0) < per_block:
                seen[block] = seen.get(block, 0) + 1
                nominated.append(c)
        return nominated

    def _select_global(self, groups, pools, impact, goal, want, plans, caps, rng, progress, cost: MacModel,
                       exact: bool = False, wide: tuple[float, float] | None = None):
        """Rank every measured candidate of every group together and take them until the step's
        budget is spent: ``want`` units, or (``goal`` given) down to ``goal`` MACs, ranking
        by impact per MAC saved.

        With ``exact`` (a target share), a unit may cross ``goal`` only if it lands within the
        slack; ``wide`` = (size, final goal): a unit that saves more than ``size`` may cross
        further when the smaller units left cannot reach the final goal without it (then the
        budget needs some of the large ones, and the ranking says which, in the step where
        they rank first), as long as it lands above the final goal less its slack."""
        keys = [(g.id, r) for g in groups for r in range(len(pools[g.id]))]
        saving = None if goal is None else \
            np.concatenate([cost.marginal(g)[[c.unit for c in pools[g.id]]] for g in groups]) / cost.base
        merged = Impact(*(np.concatenate([getattr(impact[g.id], f) for g in groups])
                          for f in Impact.__dataclass_fields__))
        by_id = {g.id: g for g in groups}
        taken = {g.id: [] for g in groups}

        def room(gid) -> int:
            """Units the group may still lose under its cap."""
            return caps[gid] - len(plans[gid].remove) - len(taken[gid])

        def free(gid, c) -> bool:
            """Within the group's cap; a unit another candidate merges into stays, and a merge
            needs its target kept."""
            return room(gid) > 0 \
                and not any(c.unit == t.into for t in taken[gid]) \
                and not (c.into >= 0 and any(c.into == t.unit for t in taken[gid]))

        def take(gid, c) -> None:
            taken[gid].append(c)
            cost.remove(by_id[gid], c.unit)

        def reach(size: float) -> float:
            """What the units saving at most ``size`` can still remove, at most (each group's
            largest such units, up to its cap)."""
            total = 0.0
            for g in groups:
                saved = cost.marginal(g)
                small = np.sort(saved[saved <= size])[::-1]
                total += float(small[:max(room(g.id), 0)].sum())
            return total

        slack = LANDING_SLACK * goal if goal is not None and exact else 0.0
        count = 0
        for k in self.order(merged, rng, progress, len(keys) if goal is not None else want, saving):
            if (goal is not None and cost.total() <= goal) or (goal is None and count >= want):
                break
            gid, r = keys[k]
            c = pools[gid][r]
            if not free(gid, c):
                continue
            # a target share: a unit that crosses the goal only if it lands within the slack
            if goal is not None and exact:
                saves = cost.marginal(by_id[gid])[c.unit]
                if saves - (cost.total() - goal) > slack and not (
                        wide is not None and saves > wide[0] and cost.total() - saves >= wide[1] * (1 - LANDING_SLACK)
                        and reach(wide[0]) < cost.total() - wide[1] * (1 + LANDING_SLACK)):
                    continue
            take(gid, c)
            count += 1
        if goal is not None and exact and cost.total() - goal > slack:
            # still short by more than the slack, and every unit left crosses too far: the one
            # that lands nearest the goal, if nearer than stopping here
            left = cost.total() - goal
            marginal = {g.id: cost.marginal(g) for g in groups}
            landing = [(abs(marginal[gid][pools[gid][r].unit] - left), gid, r) for gid, r in keys
                       if free(gid, pools[gid][r]) and all(t.unit != pools[gid][r].unit for t in taken[gid])]
            if landing and min(landing)[0] < left:
                _, gid, r = min(landing)
                take(gid, pools[gid][r])
        return taken

    def refine(self, analysis, groups, pools, impact, probe):
        """Hook for methods that add evidence beyond the probes (SRDFP's interval propagation)."""
        return impact

    def order(self, impact: Impact, rng: np.random.Generator, progress: float, quota: int,
              saving: np.ndarray | None = None) -> list[int]:
        """Candidate rows in the order this method takes them; PAODING: least impact on the
        output layer (relative L2 change plus the share of decisions it flips) per MAC saved."""
        return list(np.argsort(_per_saving(impact.rel_l2 + impact.top1, saving), kind="stable"))


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
        engine = DeviationIntervals(probe.graph, probe.output, analysis.shapes)
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
                for r, c in enumerate(rows):
                    atoms = local[unit == c.unit]
                    sd = np.sqrt(m.var[atoms] * max(0.0, 1 - c.corr**2)) if m is not None else np.ones(len(atoms))
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
            impact[g.id] = Impact(impact[g.id].rel_l2, impact[g.id].cosine_distance, impact[g.id].top1, impact[g.id].margin,
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
