"""Every pruning method by name (``--method``); ``make bench`` runs each one registered here."""

from __future__ import annotations

import numpy as np
from onnxprune.passes.autodfp import AutoDfp
from onnxprune.passes.methods import Magnitude, Method, Random
from onnxprune.passes.progressive import Paoding, Srdfp

from onnxprune.coupling import PRODUCER

METHODS: dict[str, type[Method]] = {m.name: m for m in (Magnitude, Random, Paoding, Srdfp, AutoDfp)}

AUTO = "auto"
#: ``auto`` runs autodfp where the groups paoding handles worst make at least this share of
#: the prunable groups, paoding elsewhere. Grouped convolutions (equal removals in every block):
#: paoding gives them a uniform schedule (letting them compete in slices of one unit per block
#: measured worse: `models/` ResNeXt at macs=0.5 0.979 -> 0.976, at 0.35 0.937 -> 0.911, three
#: seeds); autodfp's search allocates them (0.988 and 0.944 there). Units of several producer
#: channels (attention heads): each is larger than a paoding step (a digits ViT's head 3-7% of
#: the MACs), so paoding takes them whole or not at all, where autodfp sets each layer's kept
#: share (`models/` ViT at macs=0.5 / 0.35: paoding 0.839 / 0.660, autodfp 0.902 / 0.736).
#: docs/methods.md, "The default, per model".
GROUPED_SHARE = 1 / 3


def multi_channel_units(group) -> bool:
    """Whether a unit of ``group`` is several channels of the layer producing them (attention
    heads), not one channel read in several places (a flattened conv map)."""
    return group.balance is None and any(
        m.coupling.role == PRODUCER and np.bincount(group.atoms[m.space][1], minlength=group.size).max() > 1
        for m in group.members)


def choose_method(analysis, exclude: list[str] | None = None) -> tuple[str, str]:
    """What ``auto`` runs on the analysed model, and why (one clause for the report)."""
    groups = analysis.dep.prunable_groups(exclude or [])
    grouped = sum(g.balance is not None for g in groups)
    heads = sum(multi_channel_units(g) for g in groups)
    if groups and grouped + heads >= GROUPED_SHARE * len(groups):
        kinds = [(grouped, "grouped convolutions"), (heads, "attention heads (several channels a unit)")]
        kinds = [(n, what) for n, what in kinds if n]
        named = " and ".join(f"{n} {what}" for n, what in kinds) if len(kinds) > 1 else kinds[0][1]
        return "autodfp", (f"{grouped + heads} of {len(groups)} prunable groups are {named}, which autodfp "
                           "allocates and paoding only schedules or takes whole")
    return "paoding", "keeps the most at equal MACs on both digits sets" + \
        (f" ({grouped} of {len(groups)} groups grouped convolutions)" if grouped else "")
