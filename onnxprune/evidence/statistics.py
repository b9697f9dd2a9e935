"""Channel statistics measured on synthetic inputs, and least-squares reconstruction from them.

A removed channel need not be replaced by a constant (its mean) or by one look-alike (a
pair merge): its consumers can read the best linear estimate of it from every channel that
stays, ``x_R ~ mu_R + B (x_K - mu_K)``. The estimate needs the channels' covariance, which
onnxruntime measures on the seeded synthetic (BatchNorm-distilled) probe inputs, on the graph
as it is at that moment, so that every progressive step fits what earlier steps left.

Under a Gaussian with covariance ``S + lambda*I`` the estimate is the conditional mean,
``B = -P_RR^{-1} P_RK`` with ``P`` the precision matrix: one inverse per tensor serves every
candidate removal, and the ridge ``lambda`` shrinks towards mean replacement where the
synthetic inputs say little. How much they say differs per tensor (a classifier head after
global pooling sees one position per input, a stem conv thousands), so ``lambda`` is chosen per
tensor by two-fold cross-validation: the inputs are split in two, each half's covariance fits
every channel from the others, and the other half scores the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ir import Model, make_batch_dynamic, sample_bytes, session, to_model

#: Ridge, relative to the mean channel variance of the tensor.
RIDGE = 1e-2
#: Ridges tried by cross-validation (relative to the mean variance); RIDGE is the floor.
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: Without cross-validation (too few inputs to split): this much per coefficient-to-position
#: ratio, so that fits with few positions per coefficient are shrunk harder.
RIDGE_PER_POSITION = 0.1
#: Positions (batch x spatial) kept per tensor and per run, evenly strided.
MAX_POSITIONS = 16384
#: Wider tensors (a flattened VGG feature map) keep variances only: removal by the mean.
MAX_CHANNELS = 4096
#: Bytes of measured tensors a run returns at most: past it a chunk of inputs runs in parts,
#: which see the same positions (a layout detector at 800x608 returned 1.6 GB for 4 inputs).
RUN_BYTES = 1e8


@dataclass
class ChannelStats:
    mean: np.ndarray  # [C]
    var: np.ndarray   # [C]
    cov: np.ndarray | None  # [C, C]; None for tensors wider than MAX_CHANNELS
    count: int = 0  # positions measured
    ridge: float | None = None  # chosen by cross-validation, relative to the mean variance

    def _precision(self, channels: np.ndarray, live: int, ridge: float | None) -> tuple[np.ndarray, float]:
        """``(inverse of cov + lambda I over channels, lambda)``: lambda is the given ridge, else
        the cross-validated one, else RIDGE raised where there are few positions per coefficient,
        times the mean variance."""
        sub = self.cov[np.ix_(channels, channels)]
        if ridge is not None:
            factor = ridge
        else:
            factor = max(self.ridge or RIDGE, RIDGE_PER_POSITION * live / max(self.count, 1))
        lam = factor * max(float(np.mean(np.diag(sub))), 1e-12)
        return np.linalg.inv(sub + lam * np.eye(len(channels))), lam

    def estimator(self, removed: np.ndarray, live: np.ndarray, ridge: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(B, residual_variance)`` for channels ``removed`` estimated from ``live`` (both
        index arrays into the tensor's channels, disjoint): ``x_removed ~ mu + B (x_live - mu)``."""
        if len(removed) == 0:
            return np.zeros((0, len(live))), np.zeros(0)
        if len(live) == 0 or self.cov is None:
            return np.zeros((len(removed), len(live))), self.var[removed].copy()
        precision, lam = self._precision(np.concatenate([removed, live]), len(live), ridge)
        r = len(removed)
        p_rr, p_rk = precision[:r, :r], precision[:r, r:]
        b = -np.linalg.solve(p_rr, p_rk)
        residual = np.maximum(np.diag(np.linalg.inv(p_rr)) - lam, 0.0)
        return b, residual

    def leave_one_out(self, units: list[np.ndarray], live: np.ndarray, ridge: float | None = None) -> dict[int, tuple]:
        """For each unit (its channels, a subset of ``live``) alone: ``(B, residual variance)``
        estimating it from the other live channels. B's columns follow ``live``."""
        if self.cov is None or len(live) == 0:
            return {k: (np.zeros((len(atoms), len(live))), self.var[atoms].copy()) for k, atoms in enumerate(units)}
        precision, lam = self._precision(live, len(live), ridge)
        where = np.full(int(live.max()) + 1 if len(live) else 0, -1)
        where[live] = np.arange(len(live))
        out = {}
        # Single channels (most units) in one go: B's row is -P_u / P_uu, the residual 1 / P_uu.
        single = [k for k, atoms in enumerate(units) if len(atoms) == 1]
        if single:
            rows = where[np.array([units[k][0] for k in single])]
            diag = precision[rows, rows]
            b = -precision[rows] / diag[:, None]
            b[np.arange(len(rows)), rows] = 0.0
            residual = np.maximum(1.0 / diag - lam, 0.0)
            out.update({k: (b[i:i + 1], residual[i:i + 1]) for i, k in enumerate(single)})
        for k, atoms in enumerate(units):
            if k in out:
                continue
            rows = where[atoms]
            p_rr = precision[np.ix_(rows, rows)]
            b = -np.linalg.solve(p_rr, precision[rows])
            b[:, rows] = 0.0
            out[k] = (b, np.maximum(np.diag(np.linalg.inv(p_rr)) - lam, 0.0))
        return out


def cross_validated_ridge(folds: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The ridge of RIDGE_GRID (relative to the mean variance) whose leave-one-channel-out fits
    on one fold's ``(mean, second moment)`` best predict the other fold's channels, halved
    because the final fit sees both folds; each channel's error counts relative to its variance."""
    covs = [m2 - np.outer(mu, mu) for mu, m2 in folds]
    errors = np.zeros(len(RIDGE_GRID))
    for fit, test, (mu_fit, _), (mu_test, _) in zip(covs, covs[::-1], folds, folds[::-1]):
        # Centred on the fitting fold's mean, as the estimate will be used.
        shift = mu_test - mu_fit
        scored = test + np.outer(shift, shift)
        scale = np.diag(test).copy()
        alive = scale > 1e-12 * max(float(scale.max()), 1e-30)
        if alive.sum() < 2:
            return RIDGE
        fit, scored, scale = fit[np.ix_(alive, alive)], scored[np.ix_(alive, alive)], scale[alive]
        values, vectors = np.linalg.eigh((fit + fit.T) / 2)
        values = np.maximum(values, 0.0)
        rotated = vectors.T @ scored @ vectors
        mean_var = max(float(np.mean(np.diag(fit))), 1e-12)
        for k, factor in enumerate(RIDGE_GRID):
            d = 1.0 / (values + factor * mean_var)
            # Residual of x_i - estimate from the rest is (P x)_i / P_ii, P the precision.
            p_diag = (vectors**2) @ d
            quad = np.einsum("ij,ij->i", (vectors * d) @ rotated * d, vectors)
            errors[k] += float(np.sum(quad / (p_diag**2 * scale)))
    return max(RIDGE, RIDGE_GRID[int(np.argmin(errors))] / 2)


def measure(graph: gs.Graph, template: Model, inputs: dict[str, np.ndarray],
            spaces: list[tuple[str, int]], chunk: int = 4,
            ridges: dict[tuple[str, int], float] | None = None,
            shapes: dict[str, tuple] | None = None) -> dict[tuple[str, int], ChannelStats]:
    """Means and covariances of the channels of each ``(tensor, axis)`` on ``inputs``, with a
    ridge per tensor chosen by two-fold cross-validation (alternate chunks of inputs), unless
    ``ridges`` has it already; new choices are added to ``ridges``. ``shapes`` (as analysed,
    batch first) size the runs: see RUN_BYTES."""
    if not spaces:
        return {}
    g = graph.copy()
    tensors = g.tensors()
    names = sorted({t for t, _ in spaces})
    g.outputs = [tensors[n] for n in names]
    for t in g.outputs:
        t.dtype = t.dtype or np.float32
    model = to_model(g, template)
    make_batch_dynamic(model)  # the inputs come in chunks
    sess = session(model)
    count = len(next(iter(inputs.values())))
    ridges = {} if ridges is None else ridges
    folds = 2 if count >= 2 * chunk else 1
    moments: dict[tuple[str, int], list[_Moments]] = {}
    widths: dict[tuple[str, int], int] = {}
    part = _part(shapes or {}, names, chunk)
    for start in range(0, count, chunk):
        fold = (start // chunk) % folds
        stop = min(count, start + chunk)
        for lo in range(start, stop, part):
            hi = min(stop, lo + part)
            feeds = {k: v[lo:hi] for k, v in inputs.items()}
            outs = dict(zip(names, sess.run(names, feeds)))
            for tensor, axis in spaces:
                key = (tensor, axis)
                out = np.asarray(outs[tensor])
                widths[key] = out.shape[axis]
                if key not in moments:
                    moments[key] = [_Moments(out.shape[axis]) for _ in range(folds)]
                moments[key][fold].add(out, axis, (lo - start, hi - lo, stop - start))
            del outs
    stats = {}
    del sess  # its activations and buffers, before the products are finished
    for key in dict.fromkeys(spaces):
        # Each space's moments go as its statistics come: on resnet50 at 224x224 the two
        # folds' products of every space (346 MB in float64) and the covariances made from them
        # (173 MB) were all alive at the end of the loop.
        parts = moments.pop(key)
        folded = [m.finish() for m in parts]
        seen = [m.count for m in parts]
        if not sum(seen):  # nothing finite was seen: no estimate, no compensation
            stats[key] = ChannelStats(np.zeros(widths[key]), np.zeros(widths[key]), None, 0)
            continue
        n = sum(seen)
        mean = sum(f[0] for f in folded) / n
        second = sum(f[1] for f in folded) / n
        if second.ndim == 2:
            cov = second - np.outer(mean, mean)
            cov = (cov + cov.T) / 2
            if key not in ridges and folds == 2 and min(seen) > 0:
                ridges[key] = cross_validated_ridge([(s / m, p / m) for (s, p), m in zip(folded, seen)])
            stats[key] = ChannelStats(mean, np.maximum(np.diag(cov), 0.0), cov, n, ridges.get(key))
        else:
            stats[key] = ChannelStats(mean, np.maximum(second - mean**2, 0.0), None, n)
    return stats


def _part(shapes: dict[str, tuple], names: list[str], chunk: int) -> int:
    """Inputs a run takes: ``chunk``, or fewer where that many inputs' measured tensors pass
    RUN_BYTES (``shapes`` batch first; unknown sizes count nothing)."""
    return int(np.clip(RUN_BYTES // max(sample_bytes(shapes, names), 1), 1, chunk))


class _Moments:
    """Sum and second moment (``X^T X``, or the squares alone past MAX_CHANNELS) of the
    positions of one tensor's channels, accumulated run by run in float64.

    A run's positions are kept as a ``[channels, positions]`` block (channels-first layouts
    need no transposing copy) or ``[positions, channels]`` (channels last), evenly strided to
    MAX_POSITIONS. Blocks are buffered until they hold about as many positions as channels,
    then multiplied in one product: a flattened feature map of 2048 channels seen 4 positions
    at a time would otherwise rewrite its whole 2048 x 2048 moment per run."""

    def __init__(self, channels: int):
        self.channels = channels
        self.count = 0
        self.sum = np.zeros(channels)
        self.prod = np.zeros((channels, channels) if channels <= MAX_CHANNELS else channels)
        self._blocks: list[tuple[np.ndarray, bool]] = []  # (block, channels last)
        self._buffered = 0

    def add(self, out: np.ndarray, axis: int, part: tuple[int, int, int] | None = None) -> None:
        """One run's positions of ``out``; ``part`` ``(first, inputs, of)`` where the run
        holds inputs ``first`` to ``first + inputs`` of a run of ``of`` split in parts: the
        positions kept are those the whole run keeps (its inputs' positions lie one after
        another). Parts are multiplied out as they come, as runs are (holding every tensor's
        parts until the last part of the run peaked at 1.1 GB on a layout detector): the same
        products summed in another order, equal to rounding (about 1e-15)."""
        axis %= out.ndim
        if not np.isfinite(out).all():
            # Overflowing positions (random weights) say nothing: drop them, position by position.
            x = np.moveaxis(out, axis, -1).reshape(-1, self.channels)
            x = x[np.isfinite(x).all(axis=1)]
            block, last = x, True
        elif axis == out.ndim - 1:
            block, last = out.reshape(-1, self.channels), True
        else:  # [lead, C, trail] -> [C, lead * trail], positions in the same (row-major) order
            lead = int(np.prod(out.shape[:axis], dtype=np.int64))
            block = out.reshape(lead, self.channels, -1).transpose(1, 0, 2).reshape(self.channels, -1)
            last = False
        positions = block.shape[0] if last else block.shape[1]
        first, inputs, of = part or (0, 1, 1)
        offset, total = positions * first // inputs, positions * of // inputs
        if total > MAX_POSITIONS:
            step = int(np.ceil(total / MAX_POSITIONS))
            keep = slice(-offset % step, None, step)
            block = block[keep] if last else block[:, keep]
            positions = block.shape[0] if last else block.shape[1]
        if not positions:
            return
        self._blocks.append((np.asarray(block, np.float64), last))
        self._buffered += positions
        self.count += positions
        if self._buffered >= max(self.channels, 1024):
            self._flush()

    def _flush(self) -> None:
        for last in (False, True):
            blocks = [b for b, at_end in self._blocks if at_end == last]
            if not blocks:
                continue
            x = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0 if last else 1)
            x = x.T if last else x  # [C, positions], a view
            self.sum += x.sum(axis=1)
            if self.prod.ndim == 2:
                self.prod += x @ x.T  # symmetric: one rank-k update
            else:
                self.prod += np.einsum("ij,ij->i", x, x)
        self._blocks, self._buffered = [], 0

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sum, second moment)`` over every position added."""
        self._flush()
        return self.sum, self.prod
