"""Backward rules of activations: rectifiers, sigmoids, GELU, hard approximations, Clip,
and Softmax/LogSoftmax (the Jacobian-vector product y * (g - sum(g * y)))."""

from __future__ import annotations

import math

from onnxprune.gradient.protos import attrs
from onnxprune.gradient.registry import rule, unary


def _positive(b, x):
    return b.add("Greater", [x, b.scalar(0.0, x)])


@rule("Relu")
def _relu(b, n, g):
    x = n.input[0]  # g * (x > 0): a multiply by the cast mask runs twice as fast as Where
    return [b.add("Mul", [b.compact(g[0], x), b.add("Cast", [_positive(b, x)], to=b.static.elem(x))])]


@rule("LeakyRelu")
def _leaky_relu(b, n, g):
    x = n.input[0]
    slope = b.add("Mul", [g[0], b.scalar(attrs(n).get("alpha", 0.01), x)])
    return [b.where(_positive(b, x), g[0], slope)]


@rule("PRelu")
def _prelu(b, n, g):
    x = n.input[0]
    return [b.where(_positive(b, x), g[0], b.add("Mul", [g[0], n.input[1]]))]


@rule("Elu")
def _elu(b, n, g):
    x, y = n.input[0], n.output[0]
    neg = b.add("Mul", [g[0], b.add("Add", [y, b.scalar(attrs(n).get("alpha", 1.0), x)])])
    return [b.where(_positive(b, x), g[0], neg)]


@rule("Selu")
def _selu(b, n, g):
    x, y, a = n.input[0], n.output[0], attrs(n)
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    pos = b.add("Mul", [g[0], b.scalar(gamma, x)])
    neg = b.add("Mul", [g[0], b.add("Add", [y, b.scalar(alpha * gamma, x)])])
    return [b.where(_positive(b, x), pos, neg)]


def _one_minus(b, v):
    return b.add("Sub", [b.scalar(1.0, v), v])


rule("Sigmoid")(unary(lambda b, x, y: b.add("Mul", [y, _one_minus(b, y)])))
rule("Tanh")(unary(lambda b, x, y: _one_minus(b, b.add("Mul", [y, y]))))
rule("Softplus")(unary(lambda b, x, y: b.add("Sigmoid", [x])))


@rule("Gelu")
def _gelu(b, n, g):
    x = n.input[0]

    def s(v):
        return b.scalar(v, x)

    def mul(*vs):
        out = vs[0]
        for v in vs[1:]:
            out = b.add("Mul", [out, v])
        return out

    x2 = mul(x, x)
    if attrs(n).get("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = b.add("Tanh", [mul(x, b.add("Add", [mul(x2, s(0.044715)), s(1.0)]), s(c))])
        du = mul(b.add("Add", [mul(x2, s(3 * 0.044715)), s(1.0)]), s(c))
        d = b.add("Add", [mul(b.add("Add", [t, s(1.0)]), s(0.5)), mul(x, s(0.5), _one_minus(b, mul(t, t)), du)])
    else:
        cdf = mul(b.add("Add", [b.add("Erf", [mul(x, s(1 / math.sqrt(2.0)))]), s(1.0)]), s(0.5))
        pdf = mul(b.add("Exp", [mul(x2, s(-0.5))]), s(1 / math.sqrt(2 * math.pi)))
        d = b.add("Add", [cdf, mul(x, pdf)])
    return [b.add("Mul", [g[0], d])]


@rule("HardSigmoid")
def _hard_sigmoid(b, n, g):
    x, y = n.input[0], n.output[0]
    inside = b.add("And", [b.add("Greater", [y, b.scalar(0.0, y)]), b.add("Less", [y, b.scalar(1.0, y)])])
    slope = b.add("Mul", [g[0], b.scalar(attrs(n).get("alpha", 0.2), x)])
    return [b.where(inside, slope, b.scalar(0.0, x))]


@rule("HardSwish")
def _hard_swish(b, n, g):
    x = n.input[0]
    mid = b.add("Mul", [g[0], b.add("Add", [b.add("Div", [x, b.scalar(3.0, x)]), b.scalar(0.5, x)])])
    upper = b.where(b.add("Greater", [x, b.scalar(3.0, x)]), g[0], mid)
    return [b.where(b.add("Less", [x, b.scalar(-3.0, x)]), b.scalar(0.0, x), upper)]


@rule("Clip")
def _clip(b, n, g):
    x = n.input[0]
    if not b.opset.params_as_inputs("Clip"):
        a = attrs(n)
        lo = b.scalar(a["min"], x) if "min" in a else None
        hi = b.scalar(a["max"], x) if "max" in a else None
    else:
        lo = n.input[1] if len(n.input) > 1 and n.input[1] else None
        hi = n.input[2] if len(n.input) > 2 and n.input[2] else None
    mask = None
    if lo:
        mask = b.add("Not", [b.add("Less", [x, lo])])
    if hi:
        upper = b.add("Not", [b.add("Greater", [x, hi])])
        mask = b.add("And", [mask, upper]) if mask else upper
    return [b.where(mask, g[0], b.scalar(0.0, x)) if mask else g[0]]


def _softmax_axes(b, n) -> list[int]:
    one_axis = b.opset.has("Softmax.one_axis")
    axis = attrs(n).get("axis", -1 if one_axis else 1)
    if one_axis:
        return [axis]
    r = b.static.rank(n.input[0])  # opsets < 13 normalise over all trailing dims from axis on
    return list(range(axis % r, r))


@rule("Softmax")
def _softmax(b, n, g):
    y = n.output[0]
    dot = b.reduce_sum(b.add("Mul", [g[0], y]), _softmax_axes(b, n), keepdims=1)
    return [b.add("Mul", [y, b.add("Sub", [g[0], dot])])]


@rule("LogSoftmax")
def _log_softmax(b, n, g):
    y = n.output[0]
    total = b.reduce_sum(g[0], _softmax_axes(b, n), keepdims=1)
    return [b.add("Sub", [g[0], b.add("Mul", [b.add("Exp", [y]), total])])]
