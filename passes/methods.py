"""Pruning methods: each turns an analysed model and a budget into a plan.

The method interface and the one-shot scored methods; :mod:`onnxprune.passes.registry` names
every method (``--method``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    target: str = "channels"  # progressive methods: match a uniform ratio's "channels" or "macs"
    reconstruction: str | None = None  # "least-squares" or "pair"; None: the method's default


Progress = Callable[[str, int, int], None]


#: Normalisations over the channel axis with no running statistics.
LAYER_NORMS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
               "SkipSimplifiedLayerNormalization"}


class Method:
    name = "method"
    description = ""
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


class ScoredMethod(Method):
    """Score every prunable group once, remove its lowest units at a uniform ratio."""

    def scorer(self, budget: Budget) -> Scorer:
        raise NotImplementedError

    def plan(self, analysis, budget, progress=None):
        scorer = self.scorer(budget)
        groups = analysis.dep.prunable_groups(budget.exclude)
        scores = {}
        for i, g in enumerate(groups):
            scores[g.id] = scorer.score(g)
            if progress:
                progress("scoring", i + 1, len(groups))
        return PruningPlan(self.name, budget.ratio, budget.seed,
                           uniform_plan(groups, scores, budget.ratio, budget.round_to), compensate=budget.compensate,
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
