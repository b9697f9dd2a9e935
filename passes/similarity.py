"""Channel similarity of a group, its cluster structure, and the order its units go in.

AutoDFP's premise: a removed channel's information is partly kept by the most similar channel
that stays. Similarity is the cosine of two units' effective filters (every producer's weights
for the unit, the following BatchNorm folded in, the folded bias one more coordinate:
:func:`~onnxprune.passes.candidates.unit_vectors`).

- :func:`dbscan` clusters the units on the cosine distance ``1 - cos``; its statistics
  (clusters per unit, the share of units in no cluster, the mean nearest-neighbour cosine) tell
  the agent how redundant a layer is;
- :func:`redundancy_order` says which unit goes first: the one whose information its most
  similar kept unit covers best (see there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: DBSCAN's density: a unit with at least this many units (itself included) within ``eps`` is a
#: core unit (two neighbours: one look-alike is a pair, not a cluster).
MIN_SAMPLES = 3


def cosine_matrix(vectors: np.ndarray, balance: np.ndarray | None = None) -> np.ndarray:
    """Pairwise cosines of the rows of ``vectors``; -inf on the diagonal and, for grouped
    convolutions, between units of different blocks (they can never stand in for each other)."""
    unit = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(cos, -np.inf)
    if balance is not None:
        cos = np.where(balance[:, None] == balance[None, :], cos, -np.inf)
    return cos


def dbscan(distance: np.ndarray, eps: float, min_samples: int = MIN_SAMPLES) -> np.ndarray:
    """Cluster labels (0, 1, ...; -1 for noise) of points given their pairwise ``distance``
    (Ester et al., 1996): core points have ``min_samples`` points (themselves included) within
    ``eps``; clusters are the core points connected through each other's neighbourhoods, and
    the border points they reach. Deterministic: clusters grow from the lowest index up."""
    n = len(distance)
    near = distance <= eps
    np.fill_diagonal(near, True)
    core = near.sum(axis=1) >= min_samples
    labels = np.full(n, -1)
    cluster = 0
    for start in range(n):
        if not core[start] or labels[start] >= 0:
            continue
        labels[start] = cluster
        frontier = [start]
        while frontier:
            point = frontier.pop()
            for other in np.flatnonzero(near[point] & (labels < 0)):
                labels[other] = cluster
                if core[other]:
                    frontier.append(other)
        cluster += 1
    return labels


@dataclass
class SimilarityStats:
    """What the agent sees of a group's similarity structure."""

    clusters_per_unit: float   # DBSCAN clusters / units
    noise_share: float         # units in no cluster / units
    nearest_cosine: float      # mean over units of the best cosine with another unit


def nearest_cosine(cos: np.ndarray) -> np.ndarray:
    """Each unit's best cosine with another unit (0 when it has none)."""
    best = cos.max(axis=1) if len(cos) > 1 else np.zeros(len(cos))
    return np.where(np.isfinite(best), best, 0.0)


def similarity_stats(cos: np.ndarray, eps: float) -> SimilarityStats:
    """DBSCAN on ``1 - cos`` at ``eps`` (see :func:`model_eps`), summarised."""
    n = len(cos)
    distance = np.where(np.isfinite(cos), 1.0 - cos, np.inf)
    labels = dbscan(distance, eps)
    return SimilarityStats(float(labels.max() + 1) / n, float(np.mean(labels < 0)), float(nearest_cosine(cos).mean()))


def model_eps(coses: list[np.ndarray]) -> float:
    """DBSCAN's radius, one for the whole model: the median over every unit of every group of
    its nearest-neighbour distance ``1 - cos``. Half the units have a look-alike within it, so
    layers differ in how many of theirs do (a radius per layer would make every layer look
    alike), and it needs no constant that depends on the architecture."""
    nearest = np.concatenate([1.0 - nearest_cosine(c) for c in coses if len(c) > 1] or [np.ones(1)])
    return float(np.median(nearest))


def redundancy_order(cos: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Each unit's rank in the order units are removed (0 goes first).

    Greedy: the next unit to go is the kept one whose information is best covered by its most
    similar *kept* unit: least ``weight_u (1 - cos_u^2)``, the variance a merge into that unit
    leaves unexplained times what the consumers put on ``u`` (``weight``: consumer weight norm
    times the unit's data-free variance); a unit with no positively correlated partner counts
    its whole weight. When a unit goes, those that had it as their partner find their best kept
    one again, so a pair of look-alikes never both go on the strength of each other."""
    n = len(cos)
    rank = np.zeros(n, dtype=np.int64)
    if n == 0:
        return rank
    cos = cos.copy()
    partner = cos.argmax(axis=1)
    best = cos[np.arange(n), partner]
    kept = np.ones(n, dtype=bool)
    for step in range(n):
        covered = np.clip(np.where(np.isfinite(best), best, 0.0), 0.0, 1.0)
        saliency = np.where(kept, weight * (1 - covered**2), np.inf)
        u = int(np.argmin(saliency))
        rank[u] = step
        kept[u] = False
        cos[:, u] = -np.inf
        stale = np.flatnonzero(kept & (partner == u))
        if len(stale):
            partner[stale] = cos[stale].argmax(axis=1)
            best[stale] = cos[stale, partner[stale]]
    return rank


#: Wider spaces rank by the leave-one-out residuals once instead of greedily (a downdate per
#: removed unit costs C^2).
GREEDY_CHANNELS = 1024


def least_squares_order(spaces: list[tuple[np.ndarray, float, np.ndarray]], weight: np.ndarray) -> np.ndarray:
    """Each unit's rank in the order units are removed (0 goes first), by how well *every*
    kept channel covers it: the variance of the unit that the least-squares estimate from the
    kept channels leaves unexplained, ``1 / P_uu - lambda`` (``P`` the precision of the
    ridged covariance over the kept channels), summed over its channels and consumer spaces,
    times ``weight`` (what the consumers put on it). Greedy: when a unit goes, the precision
    is downdated to the channels still kept (a Schur complement), so the units that leaned on
    it lose their cover. ``spaces``: per consumer space, (covariance, ridge lambda, the unit of
    each channel or -1 for another group's)."""
    n = len(weight)
    rank = np.zeros(n, dtype=np.int64)
    precisions = [np.linalg.inv(cov + lam * np.eye(len(cov))) for cov, lam, _ in spaces]
    greedy = all(len(cov) <= GREEDY_CHANNELS for cov, _, _ in spaces)
    kept = np.ones(n, dtype=bool)
    for step in range(n):
        saliency = np.zeros(n)
        for precision, (_, lam, unit) in zip(precisions, spaces):
            with np.errstate(divide="ignore"):
                residual = np.maximum(1.0 / np.diag(precision) - lam, 0.0)
            mine = unit >= 0
            saliency += np.bincount(unit[mine], weights=residual[mine], minlength=n)
        saliency = np.where(kept, weight * saliency, np.inf)
        if not greedy:
            order = np.argsort(saliency, kind="stable")
            rank[order] = np.arange(n)
            return rank
        u = int(np.argmin(saliency))
        rank[u] = step
        kept[u] = False
        for i, (_, _, unit) in enumerate(spaces):
            gone = np.flatnonzero(unit == u)
            if len(gone):
                p = precisions[i]
                p = p - p[:, gone] @ np.linalg.solve(p[np.ix_(gone, gone)], p[gone, :])
                p[gone, :] = 0.0
                p[:, gone] = 0.0
                p[gone, gone] = np.inf  # no residual left to count
                precisions[i] = p
    return rank
