"""Channel statistics measured on synthetic inputs, and least-squares reconstruction from them.

A removed channel need not be replaced by a constant (its mean) or by one look-alike (a
pair merge): its consumers can read the best linear estimate of it from every channel that
stays, ``x_R ~ mu_R + B (x_K - mu_K)``. The estimate needs the channels' covariance, which
onnxruntime measures on the seeded synthetic (BatchNorm-distilled) probe inputs, on the graph
as it is at that moment, so that every progressive step fits what earlier steps left.

Under a Gaussian with covariance ``S + lambda*I`` the estimate is the conditional mean,
``B = -P_RR^{-1} P_RK`` with ``P`` the precision matrix: one inverse per tensor serves every
candidate removal, and the ridge ``lambda`` shrinks towards mean replacement where the
synthetic inputs say little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.shapes import session

#: Ridge, relative to the mean channel variance of the tensor.
RIDGE = 1e-2
#: Positions (batch x spatial) kept per tensor and per run, evenly strided.
MAX_POSITIONS = 16384
#: Wider tensors (a flattened VGG feature map) keep variances only: removal by the mean.
MAX_CHANNELS = 4096


@dataclass
class ChannelStats:
    mean: np.ndarray  # [C]
    var: np.ndarray   # [C]
    cov: np.ndarray | None  # [C, C]; None for tensors wider than MAX_CHANNELS
    count: int = 0  # positions measured

    def _precision(self, channels: np.ndarray, live: int, ridge: float | None) -> tuple[np.ndarray, float]:
        """``(inverse of cov + lambda I over channels, lambda)``: lambda is at least the ridge
        (default RIDGE) times the mean variance, more when there are few positions per coefficient."""
        sub = self.cov[np.ix_(channels, channels)]
        factor = max(RIDGE if ridge is None else ridge, 0.1 * live / max(self.count, 1))
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
        for k, atoms in enumerate(units):
            rows = where[atoms]
            p_rr = precision[np.ix_(rows, rows)]
            b = -np.linalg.solve(p_rr, precision[rows])
            b[:, rows] = 0.0
            out[k] = (b, np.maximum(np.diag(np.linalg.inv(p_rr)) - lam, 0.0))
        return out


def measure(graph: gs.Graph, template: onnx.ModelProto, inputs: dict[str, np.ndarray],
            spaces: list[tuple[str, int]], chunk: int = 4) -> dict[tuple[str, int], ChannelStats]:
    """Means and covariances of the channels of each ``(tensor, axis)`` on ``inputs``."""
    from onnxprune.pipeline import _to_model
    from onnxprune.probes import make_batch_dynamic

    names = sorted({t for t, _ in spaces})
    if not names:
        return {}
    g = graph.copy()
    tensors = g.tensors()
    g.outputs = [tensors[n] for n in names]
    for t in g.outputs:
        t.dtype = t.dtype or np.float32
    model = _to_model(g, template)
    make_batch_dynamic(model)  # the inputs come in chunks
    sess = session(model)
    count = len(next(iter(inputs.values())))
    sums: dict[tuple[str, int], np.ndarray] = {}
    prods: dict[tuple[str, int], np.ndarray] = {}
    seen: dict[tuple[str, int], int] = {}
    for start in range(0, count, chunk):
        feeds = {k: v[start:start + chunk] for k, v in inputs.items()}
        outs = dict(zip(names, sess.run(names, feeds)))
        for tensor, axis in spaces:
            x = np.moveaxis(np.asarray(outs[tensor], np.float64), axis, -1)
            x = x.reshape(-1, x.shape[-1])
            x = x[np.isfinite(x).all(axis=1)]  # overflowing positions (random weights) say nothing
            if len(x) > MAX_POSITIONS:
                x = x[:: int(np.ceil(len(x) / MAX_POSITIONS))]
            key = (tensor, axis)
            if not len(x):
                continue
            sums[key] = sums.get(key, 0) + x.sum(axis=0)
            prods[key] = prods.get(key, 0) + (x.T @ x if x.shape[1] <= MAX_CHANNELS else (x * x).sum(axis=0))
            seen[key] = seen.get(key, 0) + len(x)
    stats = {}
    for key in spaces:
        if key not in seen:  # nothing finite was seen: no estimate, no compensation
            width = np.asarray(outs[key[0]]).shape[key[1]]
            stats[key] = ChannelStats(np.zeros(width), np.zeros(width), None, 0)
            continue
        n = max(seen[key], 1)
        mean = sums[key] / n
        if prods[key].ndim == 2:
            cov = prods[key] / n - np.outer(mean, mean)
            cov = (cov + cov.T) / 2
            stats[key] = ChannelStats(mean, np.maximum(np.diag(cov), 0.0), cov, n)
        else:
            stats[key] = ChannelStats(mean, np.maximum(prods[key] / n - mean**2, 0.0), None, n)
    return stats
