"""Allocation of the progressive methods: how much each group may lose, step by step.

The budget is what a uniform ratio removes: as many channels (default) or, with ``--budget
macs``, as many MACs. Measured impact decides where it comes from, within per-group caps;
grouped convolutions follow a per-group schedule instead.
"""

from __future__ import annotations

import math

import numpy as np
from onnxprune.passes.candidates import Candidate
from onnxprune.passes.cost import MacModel

from onnxprune.depgraph import ChannelGroup
from onnxprune.plan import GroupPlan


def cap(group: ChannelGroup, ratio: float, target: int) -> int:
    """The most a group may lose in global selection: twice its share, at most 90%."""
    return min(group.size - 1, max(target, round(group.size * min(0.9, 2 * ratio))))


def units_for(cost: MacModel, groups: list[ChannelGroup], plans: dict[int, GroupPlan], caps: dict[int, int],
              goal: float) -> int:
    """About how many more units reach ``goal`` MACs, at the current average saving."""
    excess = cost.total() - goal
    if excess <= 0:
        return 0
    savings = np.concatenate([cost.marginal(g) for g in groups if caps[g.id] > len(plans[g.id].remove)] or [[0]])
    return max(1, math.ceil(excess / max(float(np.median(savings)), 1e-9)))


def global_quota(groups: list[ChannelGroup], plans: dict[int, GroupPlan], caps: dict[int, int],
                 want: int) -> dict[int, int]:
    """How many candidates each group may contribute this step (room left under its cap,
    and a fair share of the step so that no group is measured for nothing)."""
    room = {g.id: caps[g.id] - len(plans[g.id].remove) for g in groups}
    left = sum(max(r, 0) for r in room.values())
    if want <= 0 or left <= 0:
        return {}
    return {gid: min(r, max(1, math.ceil(2 * want * r / left))) for gid, r in room.items() if r > 0}


def scheduled_quota(groups: list[ChannelGroup], plans: dict[int, GroupPlan], targets: dict[int, int],
                    step: int, steps: int) -> dict[int, int]:
    """Scheduled groups lose their target in equal parts: what is due by the end of ``step``."""
    return {g.id: round(targets[g.id] * (step + 1) / steps) - len(plans[g.id].remove) for g in groups}


def take_feasible(balance: np.ndarray | None, pool: list[Candidate], order, quota: int) -> list[Candidate]:
    """Take candidates in ``order``: a unit that absorbs another this step stays, and
    balanced groups lose the same count per block."""
    blocks = 1 if balance is None else int(balance.max()) + 1
    per_block = quota // blocks if blocks > 1 else quota
    taken, targets, removed, counts = [], set(), set(), {}
    for r in order:
        c = pool[r]
        if c.unit in targets or c.into in removed:
            continue
        block = 0 if balance is None else int(balance[c.unit])
        if counts.get(block, 0) >= per_block:
            continue
        taken.append(c)
        removed.add(c.unit)
        if c.merges:
            targets.add(c.into)
        counts[block] = counts.get(block, 0) + 1
        if len(taken) == per_block * blocks:
            break
    if blocks > 1 and len(taken) < per_block * blocks:
        # The pool ran dry in some block: keep as many in every block as in the poorest one,
        # or the grouped convolution's channel count stops dividing by its groups.
        fewest = min(counts.get(b, 0) for b in range(blocks))
        kept = {b: 0 for b in range(blocks)}
        trimmed = []
        for c in taken:
            block = int(balance[c.unit])
            if kept[block] < fewest:
                trimmed.append(c)
                kept[block] += 1
        taken = trimmed
    return taken
