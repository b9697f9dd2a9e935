"""Planning: turn per-unit scores and a budget into a :class:`PruningPlan`."""

from __future__ import annotations

import math

import numpy as np

from onnxprune.depgraph import ChannelGroup
from onnxprune.plan import GroupPlan


def aligned_step(group: ChannelGroup, round_to: int = 1) -> tuple[int, int]:
    """(the step kept counts move by: a multiple of ``round_to`` and of the balanced blocks,
    the number of balanced blocks)."""
    blocks = 1 if group.balance is None else int(group.balance.max()) + 1
    return math.lcm(max(round_to, 1), blocks), blocks


def removal_count(group: ChannelGroup, ratio: float, round_to: int = 1) -> int:
    """round(ratio * size) units, keeping at least one per balanced block, the kept count a
    multiple of ``round_to`` (and of the number of balanced blocks)."""
    step, blocks = aligned_step(group, round_to)
    keep = group.size - round(ratio * group.size)
    if step > 1:
        keep = max(step, int(round(keep / step)) * step)
        if keep > group.size:  # the group is smaller than one aligned step: leave it alone
            return 0
    keep = max(keep, blocks)
    return group.size - keep


def lowest(group: ChannelGroup, scores: np.ndarray, count: int) -> list[int]:
    """The ``count`` lowest-scoring units, spread equally over balanced blocks."""
    if count <= 0:
        return []
    order = np.argsort(scores, kind="stable")
    if group.balance is None:
        return sorted(int(u) for u in order[:count])
    blocks = int(group.balance.max()) + 1
    per_block = count // blocks
    chosen = []
    for b in range(blocks):
        chosen.extend(int(u) for u in order[group.balance[order] == b][:per_block])
    return sorted(chosen)


def uniform_plan(groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio: float,
                 round_to: int = 1, counts: dict[int, int] | None = None) -> list[GroupPlan]:
    """The same ratio in every prunable group (or ``counts``, per group): remove each group's
    lowest-scoring units."""
    plans = []
    for g in groups:
        count = removal_count(g, ratio, round_to) if counts is None else counts[g.id]
        remove = lowest(g, scores[g.id], count)
        if remove:
            plans.append(GroupPlan(g.id, g.name, g.size, remove))
    return plans
