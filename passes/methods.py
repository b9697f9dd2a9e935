"""Pruning methods: each turns an analysed model and a budget into a plan.

The method interface and the one-shot scored methods; :mod:`onnxprune.passes.registry` names
every method (``--method``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from onnxprune.passes.cost import MacModel
from onnxprune.passes.latency import check_reachable, latency_model, measured_counts
from onnxprune.passes.planning import uniform_plan
from onnxprune.passes.scoring import MagnitudeScorer, RandomScorer, Scorer

from onnxprune.plan import PruningPlan


@dataclass
class Budget:
    ratio: float
    round_to: int = 1
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    compensate: bool = True
    step: float | None = None  # progressive methods: share of each group removed per step
    #: What the budget counts: "channels" (the uniform ratio's), "macs", "params" or
    #: "latency" (the uniform ratio's, or ``share`` of the model's when given).
    target: str = "channels"
    reconstruction: str | None = None  # "least-squares" or "pair"; None: the method's default
    #: The share of the model's MACs, parameters or latency to keep (``--target macs=0.5``):
    #: the ratio is then found, as the uniform ratio that reaches it.
    share: float | None = None
    #: Latency: the intra-op threads it is planned for (0: onnxruntime's default, all cores).
    latency_threads: int = 0
    #: The cost model :meth:`resolved` made (None before, and for a channel budget).
    cost: MacModel | None = field(default=None, init=False, repr=False, compare=False)
    #: A latency share's goal as corrected by timing (:func:`measured_counts`).
    corrected_goal: float | None = field(default=None, init=False, repr=False, compare=False)

    def goal(self, analysis, cost: MacModel) -> float:
        """The cost ``share`` leaves, in ``cost``'s units (MACs and parameters: it counts the
        weight-owning nodes, the rest of the model stays as it is; latency: all of it)."""
        if self.target == "latency":
            return self.corrected_goal if self.corrected_goal is not None else self.share * cost.base
        total = analysis.macs if self.target == "macs" else analysis.params
        return self.share * total - (total - cost.base)

    def resolved(self, analysis, groups: list) -> tuple[float, MacModel | None, dict[int, int] | None]:
        """(the ratio to plan with, the cost model of the target (None for channels), and
        with a share, the removal counts per group that reach it uniformly). A latency share
        out of reach is a UserError (its floor is far above nothing: overhead stays)."""
        if self.target == "channels":
            return self.ratio, None, None
        if self.target == "latency":
            cost = latency_model(analysis, groups, self.latency_threads, self.round_to)
        else:
            cost = MacModel(analysis.dep, groups, self.target)
        self.cost = cost
        if self.share is None:
            return self.ratio, cost, None
        if self.target == "latency":  # out of reach: an error; else the counts timing confirms
            check_reachable(cost, groups, self.share, self.round_to)
            ratio, counts, self.corrected_goal = measured_counts(analysis, cost, groups, self.share, self.round_to,
                                                                 self.latency_threads)
            return ratio, cost, counts
        goal = self.goal(analysis, cost)
        ratio = cost.ratio_for(groups, goal, self.round_to)
        return ratio, cost, cost.counts_for(groups, goal, self.round_to, ratio)


Progress = Callable[[str, int, int], None]


#: Normalisations over the channel axis with no running statistics.
LAYER_NORMS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
               "SkipSimplifiedLayerNormalization"}


class Method:
    name = "method"
    description = ""
    #: Whether the method decides how much each group loses (else: the uniform ratio).
    allocates = False
    #: Progressive methods fit least squares at every step (they measure anyway); the one-shot
    #: baselines stay instant with mean and variance compensation unless asked.
    reconstruction = "pair"

    def reconstruction_for(self, analysis, budget: Budget) -> str:
        """The budget's reconstruction, else the method's; least squares is not a default where
        LayerNorm normalises (transformers): no BatchNorm to distil the synthetic inputs from,
        and noise tokens misstate the correlations between units (digits ViT at 0.4, paoding:
        0.971 with least squares, 0.998 with pair merges)."""
        if budget.reconstruction:
            return budget.reconstruction
        if self.reconstruction == "least-squares" and any(n.op in LAYER_NORMS for n in analysis.graph.nodes):
            return "pair"
        return self.reconstruction

    def plan(self, analysis, budget: Budget, progress: Progress | None = None) -> PruningPlan:
        raise NotImplementedError

    def cannot_plan(self, analysis) -> str | None:
        """Why this method cannot plan ``analysis`` at all (None: it can)."""
        return None


class ScoredMethod(Method):
    """Score every prunable group once, remove its lowest units at a uniform ratio."""

    def scorer(self, budget: Budget) -> Scorer:
        raise NotImplementedError

    def plan(self, analysis, budget, progress=None):
        scorer = self.scorer(budget)
        groups = analysis.dep.prunable_groups(budget.exclude)
        ratio, _, counts = budget.resolved(analysis, groups)
        scores = {}
        for i, g in enumerate(groups):
            scores[g.id] = scorer.score(g)
            if progress:
                progress("scoring", i + 1, len(groups))
        return PruningPlan(self.name, ratio, budget.seed,
                           uniform_plan(groups, scores, ratio, budget.round_to, counts), compensate=budget.compensate,
                           reconstruction=self.reconstruction_for(analysis, budget))


class Magnitude(ScoredMethod):
    name = "magnitude"
    description = "L2 norm of each channel's weights across its group (baseline)"

    def scorer(self, budget):
        return MagnitudeScorer()


class Random(ScoredMethod):
    name = "random"
    description = "uniformly random channels, seeded (the floor)"

    def scorer(self, budget):
        return RandomScorer(budget.seed)
