"""AutoDFP (Li et al., 2024): a Soft Actor-Critic agent prunes layer by layer, data-free.

The environment (after AMC, He et al. 2018) walks the prunable groups in graph order. At group
``t`` the agent sees the layer (its index, producer type, input and output channels, stride,
kernel, parameters and MACs), the budget (MACs removed so far, MACs of the layers still to
come), its previous action and the group's similarity structure (DBSCAN clusters per unit,
noise share, mean nearest-neighbour cosine: :mod:`onnxprune.passes.similarity`). It answers
with two numbers in [-1, 1]: the share of units the group keeps and the reconstruction
coefficient ``lambda``. The action wall (:mod:`onnxprune.passes.action_wall`) clamps the
share so that the MAC (parameter, unit) goal stays reachable and is met at the end.

A group loses its units in redundancy order (the unit best covered by a kept look-alike first:
:func:`~onnxprune.passes.similarity.redundancy_order`); each removed unit merges into its most
similar kept unit with ``lambda`` times the pair's least-squares scale: the consumers' weights
for the kept unit absorb that multiple of the removed one's (Neuron Merging), and the mean and
variance compensation of :mod:`onnxprune.passes.reconstruct` handles what the merge leaves.

The reward is the fidelity of the whole plan on the synthetic evidence: ``-log(d + 1e-4)``
with ``d`` the mean cosine distance between the pruned and the unpruned model's outputs over
the distilled probe inputs. A batch of episodes is scored in one onnxruntime run
(:class:`~onnxprune.evidence.plan_probes.PlanProbe`); the best plan found is the answer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnxprune.passes.action_wall import ActionWall, CountCost
from onnxprune.passes.candidates import consumer_weight_norms, unit_variance, unit_vectors
from onnxprune.passes.methods import Budget, Method, Progress
from onnxprune.passes.plan_rows import PlanRows
from onnxprune.passes.planning import aligned_step, lowest, removal_count
from onnxprune.passes.progressive import Paoding, run_batch
from onnxprune.passes.sac import SoftActorCritic
from onnxprune.passes.scoring import MagnitudeScorer
from onnxprune.passes.similarity import (
    SimilarityStats,
    cosine_matrix,
    least_squares_order,
    model_eps,
    redundancy_order,
    similarity_stats,
)

from onnxprune.depgraph import ChannelGroup
from onnxprune.evidence.plan_probes import MIN_OPSET
from onnxprune.evidence.probes import probeable
from onnxprune.plan import Corrections, GroupPlan, PruningPlan
from onnxprune.profiling import stage

logger = logging.getLogger(__name__)

#: The kept share an action may ask for: AMC's lower bound is 0.2 of a layer; a MAC budget of
#: 0.35 needs some groups below it.
KEEP_RANGE = (0.1, 1.0)
#: The reconstruction coefficient: 0 is removal with mean compensation, 1 the pair's
#: least-squares merge, up to 1.5 a merge that also stands in for the look-alike's neighbours.
COEFFICIENT_RANGE = (0.0, 1.5)
#: Cosine distances below this floor are the same reward (probe noise).
DISTANCE_FLOOR = 1e-4
STATE_DIM = 15
#: Multiply-accumulates the search may spend on probe runs: the digits nets never reach it (a
#: few 1e10 for 256 episodes); a model of several GMACs per sample runs fewer episodes, at
#: least MIN_EPISODES.
SEARCH_MACS = 2e13
MIN_EPISODES = 32
#: The best plans of the search, by distance on the probes, scored again on as many other
#: inputs of the same pool; the answer is the best on both (the best of hundreds on one set
#: of probes is partly the best at fitting those probes).
RESCORED = 8


@dataclass
class Layer:
    """One group as the environment sees it."""

    group: ChannelGroup
    vectors: np.ndarray        # effective filters, one row per unit
    cos: np.ndarray            # their pairwise cosines (-inf where no merge may go)
    rank: np.ndarray           # redundancy order: 0 goes first
    stats: SimilarityStats
    features: np.ndarray = field(default_factory=lambda: np.zeros(7))  # static, scaled to [0, 1]


@dataclass
class Episode:
    states: list[np.ndarray]
    actions: list[np.ndarray]   # as taken: the kept share after the wall
    counts: np.ndarray
    coefficients: np.ndarray
    distance: float = math.inf


def _to_unit(value: float, bounds: tuple[float, float]) -> float:
    return float(np.clip(2 * (value - bounds[0]) / (bounds[1] - bounds[0]) - 1, -1.0, 1.0))


def _from_unit(action: float, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * (float(action) + 1) / 2


class Environment:
    """The groups in graph order, the budget, the plan probe, and how an episode becomes a plan."""

    def __init__(self, analysis, budget: Budget, groups: list[ChannelGroup], probes: int,
                 reconstruction: str = "pair", order: str = "magnitude"):
        self.analysis, self.budget = analysis, budget
        self.ratio, mac_model, _ = budget.resolved(analysis, groups)
        self.kind = budget.target
        targets = {g.id: removal_count(g, self.ratio, budget.round_to) for g in groups}
        self.cost = CountCost(groups, mac_model)
        if budget.share is not None:
            goal = budget.goal(analysis, mac_model)
        elif mac_model is not None:
            goal = mac_model.after_uniform(groups, targets)
        else:
            goal = self.cost.base - sum(targets.values())
        self.goal = goal
        options = [_options(g, budget.round_to) for g in groups]
        self.wall = ActionWall(self.cost, goal, options)
        touching = np.array([self.cost.touching(j) for j in range(len(groups))])
        rest = np.concatenate([np.cumsum(touching[::-1])[::-1][1:], [0.0]])
        self.rest = rest / max(rest.max(), 1e-12)
        self.reconstruction = reconstruction
        #: pair merges: the kept share and the coefficient; least squares: the kept share
        self.action_dim = 2 if reconstruction == "pair" else 1
        inputs = analysis.probe_inputs(probes, budget.seed)
        batch = analysis.batch
        per_sample = max(analysis.macs / max(batch, 1), 1)
        # a consumer input's substitution holds a copy of it: half the samples a run holds
        max_batch = max(probes, run_batch(analysis, per_sample) // 2)
        with stage("statistics"):
            self.rows = PlanRows(analysis, groups, reconstruction, budget.compensate, budget.seed)
        with stage("similarity"):
            self.layers = _layers(analysis, groups, order, self.rows)
        _static_features(self.layers, analysis.shapes, self.cost)
        with stage("probe model"):
            self.probe = self.rows.probe(groups, inputs, max_batch)
        self.groups, self.max_batch = groups, max_batch

    def state(self, t: int, counts: np.ndarray, previous: np.ndarray) -> np.ndarray:
        layer = self.layers[t]
        reduced = 1.0 - float(self.cost.totals(counts)[0]) / max(self.cost.base, 1e-12)
        s = layer.stats
        return np.concatenate([[t / len(self.layers)], layer.features, [reduced, self.rest[t]], previous,
                               [s.clusters_per_unit, s.noise_share, s.nearest_cosine]])

    def rollout(self, policy) -> Episode:
        """One episode: ``policy(state) -> action`` in [-1, 1]^action_dim at every group, walled."""
        n = len(self.layers)
        counts, coefficients = np.zeros(n), np.zeros(n)
        states, actions = [], []
        previous = np.array([1.0, 0.0])
        for t, layer in enumerate(self.layers):
            state = self.state(t, counts, previous)
            action = np.clip(np.asarray(policy(state), dtype=np.float64), -1.0, 1.0)
            size = layer.group.size
            keep = _from_unit(action[0], KEEP_RANGE)
            counts[t] = self.wall.clamp(counts, t, (1 - keep) * size)
            taken = np.array([_to_unit(1 - counts[t] / size, KEEP_RANGE), *action[1:self.action_dim]])
            if self.action_dim > 1:
                coefficients[t] = _from_unit(action[1], COEFFICIENT_RANGE)
            states.append(state)
            actions.append(taken)
            previous = np.array([taken[0], taken[1] if self.action_dim > 1 else 0.0])
        settled = self.wall.settle(counts)
        for t in np.flatnonzero(settled != counts):  # the actions as the plan takes them
            actions[t][0] = _to_unit(1 - settled[t] / self.layers[t].group.size, KEEP_RANGE)
        return Episode(states, actions, settled, coefficients)

    def group_plans(self, episode: Episode) -> list[GroupPlan]:
        plans = []
        for layer, count, coefficient in zip(self.layers, episode.counts, episode.coefficients):
            if count > 0:
                merges = self.budget.compensate and self.reconstruction == "pair"
                plans.append(_merge_plan(layer, int(count), coefficient if merges else 0.0))
        return plans

    def score(self, episodes: list[Episode]) -> None:
        """Every episode's cosine distance on the probes, in one batched run."""
        with stage("rows"):
            rows = [self.rows.rows(self.group_plans(e), self.probe) for e in episodes]
        with stage("measure"):
            distances = self.probe.cosine_distance(self.probe.run(rows))
        for e, d in zip(episodes, distances):
            e.distance = float(d)

    def rescore(self, episodes: list[Episode]) -> np.ndarray | None:
        """Every episode's cosine distance on the synthetic pool's next inputs, as many as the
        probes. None where the pool the statistics were measured on holds fewer (large models:
        more would mean inverting again) or the inputs are a calibration set (its subsets for
        two counts overlap)."""
        count = self.probe.probes
        if self.analysis.calibration is not None or self.analysis.statistics_count < 2 * count:
            return None
        pool = self.analysis.probe_inputs(2 * count, self.budget.seed)
        axes = self.analysis.sample_axes
        stacked = {k: axes.get(k, 0) for k in pool if axes.get(k, 0) is not None}
        if not stacked or any(pool[k].shape[a] < 2 * count for k, a in stacked.items()):
            return None
        inputs = {k: np.take(v, np.arange(count, 2 * count), axis=stacked[k]) if k in stacked else v
                  for k, v in pool.items()}
        with stage("probe model"):
            probe = self.rows.probe(self.groups, inputs, self.max_batch)
        with stage("rows"):
            rows = [self.rows.rows(self.group_plans(e), probe) for e in episodes]
        with stage("measure"):
            return np.asarray(probe.cosine_distance(probe.run(rows)), dtype=np.float64)


def _options(group: ChannelGroup, round_to: int) -> np.ndarray:
    """The removal counts a group may take: 0, then every count whose kept units are a multiple
    of its aligned step (at least one step and one per block), up to KEEP_RANGE's floor."""
    step, blocks = aligned_step(group, round_to)
    cap = removal_count(group, 1 - KEEP_RANGE[0], round_to)
    kept = np.arange(group.size - 1, group.size - cap - 1, -1)
    kept = kept[(kept % step == 0) & (kept >= max(step, blocks))]
    return np.concatenate([[0], group.size - kept]).astype(np.int64)


def _layers(analysis, groups: list[ChannelGroup], order: str, rows: PlanRows) -> list[Layer]:
    """Similarity, clusters and removal order of every group (on the weights as analysed).
    ``order``: "magnitude" (lowest L2 norm of the group's weights first) or "coverage" (the
    unit best covered by the kept ones first: by every kept channel with least-squares
    reconstruction, :func:`~onnxprune.passes.similarity.least_squares_order`, else by its
    most similar kept unit, :func:`~onnxprune.passes.similarity.redundancy_order`)."""
    vectors = [unit_vectors(g, Corrections()) for g in groups]
    coses = [cosine_matrix(v, g.balance) for v, g in zip(vectors, groups)]
    eps = model_eps(coses)
    layers = []
    for g, v, cos in zip(groups, vectors, coses):
        spaces = rows.coverage(g) if order == "coverage" else []
        if spaces:
            rank = least_squares_order(spaces, consumer_weight_norms(g))
        elif order == "coverage":
            rank = redundancy_order(cos, consumer_weight_norms(g) * unit_variance(g, analysis.moments))
        else:
            rank = np.argsort(np.argsort(MagnitudeScorer().score(g), kind="stable"), kind="stable")
        layers.append(Layer(g, v, cos, rank, similarity_stats(cos, eps)))
    return layers


def _static_features(layers: list[Layer], shapes: dict, cost: CountCost) -> None:
    """AMC's layer embedding: producer type, input and output channels, stride, kernel,
    parameters (log), MACs (share); each scaled to [0, 1] over the layers."""
    rows = []
    for j, layer in enumerate(layers):
        node = layer.group.producers[0] if layer.group.producers else None
        op = node.op if node is not None else ""
        weight = node.inputs[1] if node is not None and len(node.inputs) > 1 else None
        weight = weight.values if isinstance(weight, gs.Constant) else None
        x = shapes.get(node.inputs[0].name) if node is not None and node.inputs else None
        grouped = op == "Conv" and int(node.attrs.get("group", 1)) > 1
        kind = 0.5 if grouped else {"Conv": 0.0, "Gemm": 1.0, "MatMul": 1.0}.get(op, 0.25)
        channels_in = (x[1] if op == "Conv" else x[-1]) if x else 0
        stride = int((node.attrs.get("strides") or [1])[0]) if op == "Conv" else 1
        kernel = weight.shape[2] if op == "Conv" and weight is not None and weight.ndim > 2 else 1
        params = sum(int(np.prod(p.inputs[1].values.shape)) for p in layer.group.producers
                     if len(p.inputs) > 1 and isinstance(p.inputs[1], gs.Constant))
        rows.append([kind, channels_in, layer.group.size, stride, kernel, math.log1p(params),
                     cost.touching(j) / max(cost.base, 1e-12)])
    table = np.array(rows, dtype=np.float64)
    low, high = table.min(axis=0), table.max(axis=0)
    scaled = (table - low) / np.where(high > low, high - low, 1.0)
    scaled[:, 0] = table[:, 0]  # the type code is already in [0, 1]
    for layer, row in zip(layers, scaled):
        layer.features = row


def _merge_plan(layer: Layer, count: int, coefficient: float) -> GroupPlan:
    """The group's ``count`` most redundant units, each merged into its most similar kept unit
    with ``coefficient`` times the pair's least-squares scale. ``merge_corr`` is the correlation
    the scaled merge explains: removing ``u - lambda s v`` leaves ``1 - c^2 lambda (2 - lambda)``
    of u's variance (c the pair's cosine), which the variance compensation takes out."""
    g = layer.group
    remove = lowest(g, layer.rank.astype(np.float64), count)
    kept = np.setdiff1d(np.arange(g.size), remove)
    into, scale, corr = [], [], []
    if len(remove) and len(kept):
        best = kept[np.argmax(layer.cos[np.ix_(remove, kept)], axis=1)]
    else:
        best = np.full(len(remove), -1)
    explained = math.sqrt(max(coefficient * (2 - coefficient), 0.0))
    for u, v in zip(remove, best):
        c = float(layer.cos[u, v]) if v >= 0 else 0.0
        s = float(layer.vectors[u] @ layer.vectors[v] / (layer.vectors[v] @ layer.vectors[v] + 1e-12)) if v >= 0 else 0.0
        if coefficient > 0 and np.isfinite(c) and c > 0 and s > 0:
            into.append(int(v))
            scale.append(coefficient * s)
            corr.append(c * explained)
        else:
            into.append(-1)
            scale.append(0.0)
            corr.append(0.0)
    return GroupPlan(g.id, g.name, g.size, [int(u) for u in remove], into, scale, corr, [0] * len(remove))


class AutoDfp(Method):
    name = "autodfp"
    description = "AutoDFP: a Soft Actor-Critic agent picks each group's kept share and merge coefficient"
    allocates = True
    #: The paper reconstructs from the most similar channel (``--reconstruction pair``, the
    #: default under LayerNorm); from every kept channel the digits ResNet keeps 0.92 at
    #: macs=0.5 against 0.38 (docs/methods.md).
    reconstruction = "least-squares"

    def __init__(self, episodes: int = 256, batch: int = 16, warmup: int = 64, probes: int = 32,
                 updates: int = 256, order: str | None = None):
        self.episodes, self.batch, self.warmup = episodes, batch, warmup
        self.probes, self.updates, self.order = probes, updates, order

    def cannot_plan(self, analysis) -> str | None:
        reason = Paoding().cannot_plan(analysis)
        if reason:
            return reason
        opset = next((o.version for o in analysis.model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
        if opset < MIN_OPSET:
            return f"its plan probes need opset {MIN_OPSET} (GatherElements), and the model is opset {opset}"
        return None

    def plan(self, analysis, budget: Budget, progress: Progress | None = None) -> PruningPlan:
        plan = PruningPlan(self.name, 0.0, budget.seed, [], compensate=budget.compensate,
                           reconstruction=self.reconstruction_for(analysis, budget))
        env = self.environment(analysis, budget)
        if env is None:
            return plan
        best, trace, top = self._search(env, budget.seed, progress)
        again = env.rescore(top) if len(top) > 1 else None
        if again is not None:  # the best on both sets of inputs
            best = top[int(np.argmin(np.array([e.distance for e in top]) + again))]
        plan.ratio = env.ratio
        plan.groups = env.group_plans(best)
        plan.details = {"episodes": len(trace), "warmup": self.warmup, "probes": env.probe.probes,
                        "best_cosine_distance": best.distance, "first_cosine_distance": trace[0],
                        "rescored": len(top) if again is not None else 0,
                        "dbscan_eps": model_eps([layer.cos for layer in env.layers]),
                        "kept_share": {layer.group.name: round(1 - float(c) / layer.group.size, 4)
                                       for layer, c in zip(env.layers, best.counts)}}
        if env.action_dim > 1:
            plan.details["coefficient"] = {layer.group.name: round(float(k), 4)
                                           for layer, k in zip(env.layers, best.coefficients)}
        # corrections: None, so the reconstruct pass computes them as a replay of the saved plan would
        return plan

    def environment(self, analysis, budget: Budget) -> Environment | None:
        """The environment the agent prunes in (None: nothing to prune)."""
        groups = self._groups(analysis, budget)
        if not groups:
            return None
        reconstruction = self.reconstruction_for(analysis, budget)
        # coverage by every kept channel beat magnitude with least squares; coverage by one
        # look-alike lost to it with pair merges (docs/methods.md)
        order = self.order or ("coverage" if reconstruction == "least-squares" else "magnitude")
        return Environment(analysis, budget, groups, self.probes, reconstruction, order)

    def _groups(self, analysis, budget: Budget) -> list[ChannelGroup]:
        """The probeable groups (others are left alone), in graph order."""
        candidates = analysis.dep.prunable_groups(budget.exclude)
        batch = analysis.batch
        top = set(analysis.graph.tensors())
        groups = [g for g in candidates if probeable(g, analysis.dep.ctx.shapes, batch)
                  and all(m.space[0] in top for m in g.members)]
        if len(groups) < len(candidates):
            logger.warning("%d group(s) cannot be probed and are left alone", len(candidates) - len(groups))
        position = {id(n): i for i, n in enumerate(analysis.graph.nodes)}
        return sorted(groups, key=lambda g: (min((position.get(id(p), 1 << 30) for p in g.producers),
                                                 default=1 << 30), g.id))

    def _search(self, env: Environment, seed: int, progress: Progress | None) -> tuple[Episode, list[float], list[Episode]]:
        """Warm-up episodes with random actions, then the agent's; every batch scored in one
        probe run, the agent trained on it. Returns the best episode, every distance, and the
        RESCORED best episodes of distinct plans, best first (an equal distance keeps the
        earlier plan)."""
        rng = np.random.default_rng(seed)
        total = self._episodes(env)
        agent = SoftActorCritic(STATE_DIM, env.action_dim, np.random.default_rng([seed, 1]))
        trace, scale, top = [], None, []
        while len(trace) < total:
            size = min(self.batch, total - len(trace))
            if len(trace) < self.warmup:
                episodes = [env.rollout(lambda s: rng.uniform(-1, 1, env.action_dim)) for _ in range(size)]
            else:  # the first of each batch is the policy's mean action
                episodes = [env.rollout(lambda s, d=(i == 0): agent.act(s, deterministic=d)) for i in range(size)]
            env.score(episodes)
            rewards = np.array([-math.log(e.distance + DISTANCE_FLOOR) for e in episodes])
            if scale is None:  # rewards standardised by the first batch's spread
                scale = (float(rewards.mean()), max(float(rewards.std()), 0.1))
            for e, r in zip(episodes, (rewards - scale[0]) / scale[1]):
                self._remember(agent, e, float(r))
                if not any(np.array_equal(e.counts, o.counts) and np.array_equal(e.coefficients, o.coefficients)
                           for o in top):
                    top = sorted([*top, e], key=lambda o: o.distance)[:RESCORED]
            trace.extend(e.distance for e in episodes)
            if agent.buffer.size >= agent.config.batch:
                for _ in range(min(self.updates, size * len(env.layers))):
                    agent.update()
            if progress:
                progress("autodfp episodes", len(trace), total)
        logger.info("autodfp: best cosine distance %.5f of %d episodes", top[0].distance, len(trace))
        return top[0], trace, top

    def _episodes(self, env: Environment) -> int:
        """The episode count: ``episodes``, fewer where their probe runs would pass SEARCH_MACS."""
        batch = env.analysis.batch
        per_episode = 2 * env.probe.probes * env.analysis.macs / max(batch, 1)  # the substitutions cost about a model
        return int(min(self.episodes, max(MIN_EPISODES, SEARCH_MACS // max(per_episode, 1))))

    @staticmethod
    def _remember(agent: SoftActorCritic, episode: Episode, reward: float) -> None:
        """Every transition of the episode carries its final reward and ends there: the Monte
        Carlo return of an episodic task whose reward comes at the end (gamma = 1), as AMC
        credits its agent. Bootstrapping through the target critics instead (reward on the last
        transition only) had not propagated the reward back to the first groups after 256
        episodes (digits ResNet, macs=0.5: the policy's episodes stayed at the random ones'
        cosine distance, 0.2; with this credit they fell to 0.08)."""
        for state, action in zip(episode.states, episode.actions):
            agent.buffer.add(state, action, reward, np.zeros(STATE_DIM), True)
