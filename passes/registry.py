"""Every pruning method by name (``--method``); ``make bench`` runs each one registered here."""

from __future__ import annotations

from onnxprune.passes.autodfp import AutoDfp
from onnxprune.passes.methods import Magnitude, Method, Random
from onnxprune.passes.progressive import Paoding, Srdfp

METHODS: dict[str, type[Method]] = {m.name: m for m in (Magnitude, Random, Paoding, Srdfp, AutoDfp)}

AUTO = "auto"
#: ``auto`` runs autodfp where grouped convolutions (equal removals in every block) make at least
#: this share of the prunable groups, paoding elsewhere. paoding gives such groups a uniform
#: schedule (letting them compete in slices of one unit per block measured worse: `models/`
#: ResNeXt at macs=0.5 0.979 -> 0.976, at 0.35 0.937 -> 0.911, three seeds); autodfp's search
#: allocates them (0.988 and 0.944 there). docs/methods.md, "The default, per model".
GROUPED_SHARE = 1 / 3


def choose_method(analysis, exclude: list[str] | None = None) -> tuple[str, str]:
    """What ``auto`` runs on the analysed model, and why (one clause for the report)."""
    groups = analysis.dep.prunable_groups(exclude or [])
    grouped = sum(g.balance is not None for g in groups)
    if groups and grouped >= GROUPED_SHARE * len(groups):
        return "autodfp", (f"{grouped} of {len(groups)} prunable groups are grouped convolutions, which "
                           "autodfp allocates and paoding only schedules")
    return "paoding", "keeps the most at equal MACs on both digits sets" + \
        (f" ({grouped} of {len(groups)} groups grouped convolutions)" if grouped else "")
