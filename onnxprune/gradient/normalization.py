"""Backward rules of the normalisations: BatchNormalization in inference mode (a per-channel
scale), LayerNormalization and InstanceNormalization (statistics of the input itself), and
LRN (local response normalisation across channels)."""

from __future__ import annotations

import numpy as np

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.registry import rule


@rule("BatchNormalization")
def _batchnorm(b, n, g):
    a = attrs(n)
    if a.get("training_mode", 0) or any(gi is not None for gi in g[1:]):
        raise GradientUnsupported(f"BatchNormalization {n.name!r} in training mode")
    x, scale, var = n.input[0], n.input[1], n.input[4]
    coef = b.add("Div", [scale, b.add("Sqrt", [b.add("Add", [var, b.scalar(a.get("epsilon", 1e-5), var)])])])
    r = b.static.rank(x)
    if r > 2:
        coef = b.add("Reshape", [coef, b.i64([-1] + [1] * (r - 2))])
    return [b.add("Mul", [g[0], coef])]


def _normalization_grad(b, x, G, scale, axes, eps) -> str:
    """d/dx of scale * (x - mean) / sqrt(var + eps), statistics over ``axes``.

    With xhat the normalised x, inv = 1/sqrt(var + eps) and gs = G * scale:
    dx = inv * (gs - mean(gs) - xhat * mean(gs * xhat)).
    """
    xc = b.add("Sub", [x, b.reduce_mean(x, axes)])
    var = b.reduce_mean(b.add("Mul", [xc, xc]), axes)
    inv = b.add("Reciprocal", [b.add("Sqrt", [b.add("Add", [var, b.scalar(eps, x)])])])
    xhat = b.add("Mul", [xc, inv])
    gs = b.add("Mul", [G, scale])
    proj = b.add("Mul", [xhat, b.reduce_mean(b.add("Mul", [gs, xhat]), axes)])
    return b.add("Mul", [inv, b.add("Sub", [b.add("Sub", [gs, b.reduce_mean(gs, axes)]), proj])])


@rule("LayerNormalization")
def _layernorm(b, n, g):
    if any(gi is not None for gi in g[1:]):
        raise GradientUnsupported(f"LayerNormalization {n.name!r}: Mean/InvStdDev outputs used")
    a, x = attrs(n), n.input[0]
    r = b.static.rank(x)
    axes = list(range(a.get("axis", -1) % r, r))
    return [_normalization_grad(b, x, g[0], n.input[1], axes, a.get("epsilon", 1e-5))]


@rule("InstanceNormalization")
def _instancenorm(b, n, g):
    x = n.input[0]
    r = b.static.rank(x)
    scale = b.add("Reshape", [n.input[1], b.i64([-1] + [1] * (r - 2))])
    return [_normalization_grad(b, x, g[0], scale, list(range(2, r)), attrs(n).get("epsilon", 1e-5))]


@rule("LRN")
def _lrn(b, n, g):
    """y = x / den^beta with den = bias + alpha/size * (window sum of x^2 over channels):
    dx = g * den^-beta - x * 2 alpha beta / size * (window sum, mirrored, of g * y / den)."""
    x, y, a = n.input[0], n.output[0], attrs(n)
    size, alpha, beta, bias = a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    r = b.static.rank(x)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    ones = b.const(np.ones([1, 1, size] + [1] * (r - 2), b.static.np_dtype(x)))

    def channel_window_sum(t, before, after):
        conv = b.add("Conv", [b.unsqueeze(t, [1]), ones], kernel_shape=[size] + [1] * (r - 2),
                     pads=[before] + [0] * (r - 2) + [after] + [0] * (r - 2))
        return b.squeeze(conv, [1])

    def s(v):
        return b.scalar(v, x)

    den = b.add("Add", [s(bias), b.add("Mul", [channel_window_sum(b.add("Mul", [x, x]), lo, hi), s(alpha / size)])])
    direct = b.add("Mul", [g[0], b.add("Pow", [den, s(-beta)])])
    spread = channel_window_sum(b.add("Div", [b.add("Mul", [g[0], y]), den]), hi, lo)
    cross = b.add("Mul", [x, b.add("Mul", [spread, s(2 * alpha * beta / size)])])
    return [b.add("Sub", [direct, cross])]
