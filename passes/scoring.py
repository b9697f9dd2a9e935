"""Scorers: an importance per unit of a group (higher means keep). They see groups and arrays."""

from __future__ import annotations

import zlib

import numpy as np

from onnxprune.depgraph import ChannelGroup


class Scorer:
    def score(self, group: ChannelGroup) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class MagnitudeScorer(Scorer):
    """L2 norm of every weight the group slices for a unit.

    Each sliced weight (a producer's filters, a consumer's input columns, a norm's scale) is
    normalised by its mean over the group's units before summing, so that one large layer
    does not drown the others in a residual group.
    """

    def score(self, group: ChannelGroup) -> np.ndarray:
        total = np.zeros(group.size)
        for space, param in group.param_slices(kinds=("weight",)):
            per_unit = group.unit_squared_norms(space, param)
            mean = per_unit.mean()
            if mean > 0:
                total += per_unit / mean
        return np.sqrt(total)


class RandomScorer(Scorer):
    """Uniform random importances, seeded per group: the floor every method must beat."""


    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, group: ChannelGroup) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(group.name.encode()), group.size])
        return rng.random(group.size)
