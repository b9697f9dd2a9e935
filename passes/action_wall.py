"""The cost of per-group removal counts, many count vectors at once, and AMC's action wall.

:class:`CountCost` is :class:`~onnxprune.passes.cost.MacModel` as a function of how many
units each group loses (a unit's atoms counted at the group's average per space, as
``MacModel.after_uniform`` counts them): every Conv/Gemm/MatMul costs ``macs * prod keep(space)``
with ``keep = 1 - sum_g counts_g * atoms_g(space) / size(space)``; counting channels, the cost
is the number of units kept. Vectorised, so an agent step can price every count it might
choose in one call.

:class:`ActionWall` keeps a layer-by-layer agent's budget reachable (He et al., AMC, 2018):
before group ``t`` is decided, the earlier groups' counts are known; ``t`` must remove at least
what leaves the goal reachable if every later group loses its most (``lo``), and at most what
leaves the goal still ahead if no later group loses anything (``hi``). The last group is then
pinned to the goal, within one aligned step of its own.
"""

from __future__ import annotations

import numpy as np
from onnxprune.passes.cost import MacModel

from onnxprune.depgraph import ChannelGroup

#: Up to this many groups, settling also tries moving two groups at once (a step up in one, a
#: step down in another: what a small net's coarse groups need to land near the goal).
PAIRED_MOVES = 64


class CountCost:
    def __init__(self, groups: list[ChannelGroup], cost: MacModel | None):
        """``cost``: the MAC (or parameter) model of the target; None counts kept units."""
        self.sizes = np.array([g.size for g in groups], dtype=np.float64)
        self.linear = cost is None
        if self.linear:
            self.base = float(self.sizes.sum())
            return
        spaces = sorted({s for g in groups for s in cost.atoms[g.id]})
        index = {s: i for i, s in enumerate(spaces)}
        self.share = np.zeros((len(spaces), len(groups)))  # atoms per unit / space size
        for j, g in enumerate(groups):
            for s, counts in cost.atoms[g.id].items():
                if cost.size.get(s):
                    self.share[index[s], j] = counts.mean() / cost.size[s]
        terms = [(m, [index[k] for k in keys if k in index]) for m, keys in cost.terms]
        self.constant = float(sum(m for m, keys in terms if not keys))
        terms = [(m, keys) for m, keys in terms if keys]
        width = max((len(keys) for _, keys in terms), default=1)
        self.macs = np.array([m for m, _ in terms], dtype=np.float64)
        # each term's spaces, padded with the index of a column of ones
        self.keys = np.full((len(terms), width), len(spaces), dtype=np.int64)
        for i, (_, keys) in enumerate(terms):
            self.keys[i, :len(keys)] = keys
        self.base = float(self.totals(np.zeros((1, len(groups))))[0])

    def totals(self, counts: np.ndarray) -> np.ndarray:
        """The cost left for each row of ``counts`` [n, groups]."""
        counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
        if self.linear:
            return (self.sizes[None] - counts).sum(axis=1)
        keep = np.clip(1.0 - counts @ self.share.T, 0.0, 1.0)
        keep = np.concatenate([keep, np.ones((len(keep), 1))], axis=1)
        return self.constant + np.prod(keep[:, self.keys], axis=2) @ self.macs

    def touching(self, j: int) -> float:
        """The cost of the terms group ``j`` scales (all of it for a channel count)."""
        if self.linear:
            return float(self.sizes[j])
        spaces = np.flatnonzero(self.share[:, j] > 0)
        return float(self.macs[np.isin(self.keys, spaces).any(axis=1)].sum())


class ActionWall:
    """Per group, in the agent's order: the removal counts that keep ``goal`` reachable.
    ``options[t]``: the counts group ``t`` may take (ascending, 0 first: its aligned steps up to
    its cap)."""

    def __init__(self, cost: CountCost, goal: float, options: list[np.ndarray]):
        self.cost, self.goal, self.options = cost, goal, options
        self.caps = np.array([o[-1] for o in options], dtype=np.float64)

    def bounds(self, counts: np.ndarray, t: int) -> tuple[int, int]:
        """(lo, hi): the fewest removals from group ``t`` that still reach the goal with every
        later group at its cap, and the most that do not pass it with no later removal. The
        earlier groups' counts are ``counts[:t]``. ``lo > hi`` where a step of ``t`` jumps
        over the goal; ``lo`` is the cap where even that cannot reach it."""
        options = self.options[t]
        rows = np.tile(np.asarray(counts, dtype=np.float64), (len(options), 1))
        rows[:, t] = options
        rows[:, t + 1:] = self.caps[t + 1:]
        reach = np.flatnonzero(self.cost.totals(rows) <= self.goal + 1e-9)
        lo = int(options[reach[0]]) if len(reach) else int(options[-1])
        rows[:, t + 1:] = 0
        short = np.flatnonzero(self.cost.totals(rows) >= self.goal - 1e-9)
        hi = int(options[short[-1]]) if len(short) else 0
        return lo, hi

    def clamp(self, counts: np.ndarray, t: int, want: float) -> int:
        """The option of group ``t`` nearest ``want`` removals, within the wall; where the wall
        is narrower than a step, the side that keeps the goal reachable (on the last group:
        whichever lands nearer the goal)."""
        lo, hi = self.bounds(counts, t)
        options = self.options[t]
        if lo <= hi:
            inside = options[(options >= lo) & (options <= hi)]
            return int(inside[np.argmin(np.abs(inside - want))])
        if t == len(self.options) - 1:
            rows = np.tile(np.asarray(counts, dtype=np.float64), (2, 1))
            rows[:, t] = [lo, hi]
            over = np.abs(self.cost.totals(rows) - self.goal)
            return hi if over[1] < over[0] else lo
        return lo

    def settle(self, counts: np.ndarray) -> np.ndarray:
        """``counts`` moved, one option of one group (else of two groups at once) at a time,
        while that brings the cost nearer the goal: the walls leave the last group one step of
        its own from it, which on coarse groups is a few percent of the model."""
        counts = np.asarray(counts, dtype=np.float64).copy()
        gap = abs(float(self.cost.totals(counts)[0]) - self.goal)
        while True:
            moves = self._moves(counts)
            rows = np.array([counts + m for m in moves]) if moves else np.zeros((0, len(counts)))
            if len(rows) and len(self.options) <= PAIRED_MOVES:
                # two groups' steps at once (none where one group alone can move)
                pairs = [counts + a + b for i, a in enumerate(moves) for b in moves[i + 1:]
                         if not np.any((a != 0) & (b != 0))]
                if pairs:
                    rows = np.concatenate([rows, pairs])
            if not len(rows):
                return counts
            gaps = np.abs(self.cost.totals(rows) - self.goal)
            k = int(np.argmin(gaps))
            if gaps[k] >= gap - 1e-9:
                return counts
            counts, gap = rows[k], float(gaps[k])

    def _moves(self, counts: np.ndarray) -> list[np.ndarray]:
        """Each group's step to its next option down or up, as a change of ``counts``."""
        moves = []
        for t, options in enumerate(self.options):
            at = int(np.searchsorted(options, counts[t]))
            for k in (at - 1, at + 1):
                if 0 <= k < len(options):
                    move = np.zeros(len(counts))
                    move[t] = options[k] - counts[t]
                    moves.append(move)
        return moves
