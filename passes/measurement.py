"""Measurement of the progressive methods: candidates' impact on the output layer, batched.

Each row of one probe run applies one candidate of one group (removal, merge into its
target, compensation); the output layer's change over the probe inputs is its impact.
"""

from __future__ import annotations

import numpy as np
from onnxprune.passes.candidates import Candidate

from onnxprune.depgraph import ChannelGroup
from onnxprune.evidence.probes import Impact, ProbeModel, mask_name, merge_dst_name, merge_src_name


def measured_counts(groups: list[ChannelGroup], pools: dict[int, list[Candidate]], limit: int | None) -> dict[int, int]:
    """How many of each pool's best-nominated candidates get a row: all, or under a row
    ``limit`` (large models) a share proportional to the pool, at least one."""
    total = sum(len(pools[g.id]) for g in groups)
    if limit is None or total <= limit:
        return {g.id: len(pools[g.id]) for g in groups}
    return {g.id: max(1, min(len(pools[g.id]), limit * len(pools[g.id]) // total)) for g in groups}


def candidate_rows(groups: list[ChannelGroup], pools: dict[int, list[Candidate]],
                   measured: dict[int, int]) -> tuple[dict[str, np.ndarray], dict[int, slice]]:
    """The probe feeds (mask, merge source and destination per group) with one row per
    measured candidate, and each group's span of rows."""
    n = sum(measured.values())
    feeds, spans, row = {}, {}, 0
    for g in groups:
        mask = np.ones((n, g.size), np.float32)
        src = np.zeros((n, g.size), np.float32)
        dst = np.zeros((n, g.size), np.float32)
        for k, c in enumerate(pools[g.id][:measured[g.id]]):
            mask[row + k, c.unit] = 0
            if c.merges:
                src[row + k, c.unit], dst[row + k, c.into] = 1, c.scale
        feeds.update({mask_name(g): mask, merge_src_name(g): src, merge_dst_name(g): dst})
        spans[g.id] = slice(row, row + measured[g.id])
        row += measured[g.id]
    return feeds, spans


def measure(probe: ProbeModel, groups: list[ChannelGroup], pools: dict[int, list[Candidate]],
            limit: int | None = None) -> dict[int, Impact]:
    """One batched run: each row ablates one candidate of one group.

    With a row ``limit`` (large models), each group measures its best-nominated candidates
    in proportion to its pool, and the others get the group's measured impact per unit of
    saliency times their own saliency: the cheap estimate, calibrated by measurement."""
    measured = measured_counts(groups, pools, limit)
    feeds, spans = candidate_rows(groups, pools, measured)
    impact = probe.measure(feeds)
    out = {}
    for g in groups:
        fields = [getattr(impact, f)[spans[g.id]] for f in Impact.__dataclass_fields__]
        missing = len(pools[g.id]) - measured[g.id]
        if missing:
            saliency = np.array([c.saliency for c in pools[g.id]])
            seen = saliency[:measured[g.id]]
            rest = saliency[measured[g.id]:]
            fields = [np.concatenate([f, rest * float(np.mean(f / np.maximum(seen, 1e-12)))]) for f in fields]
        out[g.id] = Impact(*fields)
    return out
