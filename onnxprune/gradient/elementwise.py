"""Backward rules of elementwise arithmetic: the broadcasting ops (Add, Sub, Mul, Div, Pow,
Max/Min, Where, Sum/Mean, Expand), whose input gradients are summed back over broadcast
axes, and the pointwise functions of one tensor (Exp, Log, Sqrt, Erf...).
"""

from __future__ import annotations

import math

from onnxprune.gradient.broadcast import reduce_to
from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.registry import rule, unary


@rule("Add", "Sum")
def _add(b, n, g):
    ys = b.static.shape(n.output[0])
    return [reduce_to(b, g[0], i, ys) if b.needs(i) else None for i in n.input]


@rule("Mean")
def _mean(b, n, g):
    ys, gm = b.static.shape(n.output[0]), b.add("Div", [g[0], b.scalar(len(n.input), n.output[0])])
    return [reduce_to(b, gm, i, ys) if b.needs(i) else None for i in n.input]


@rule("Sub")
def _sub(b, n, g):
    (a, c), ys = n.input, b.static.shape(n.output[0])
    return [reduce_to(b, g[0], a, ys) if b.needs(a) else None,
            b.add("Neg", [reduce_to(b, g[0], c, ys)]) if b.needs(c) else None]


@rule("Mul")
def _mul(b, n, g):
    (a, c), ys = n.input, b.static.shape(n.output[0])
    if a == c:  # a square: one product, 2 g a (the second input's part is the same tensor's)
        return [reduce_to(b, b.add("Mul", [b.add("Mul", [b.compact(g[0], a), b.scalar(2.0, a)]), a]), a, ys)
                if b.needs(a) else None]
    return [reduce_to(b, b.add("Mul", [b.compact(g[0], c), c]), a, ys) if b.needs(a) else None,
            reduce_to(b, b.add("Mul", [b.compact(g[0], a), a]), c, ys) if b.needs(c) else None]


@rule("Div")
def _div(b, n, g):
    (a, c), y, ys = n.input, n.output[0], b.static.shape(n.output[0])
    dc = b.add("Neg", [b.add("Div", [b.add("Mul", [g[0], y]), c])]) if b.needs(c) else None
    return [reduce_to(b, b.add("Div", [g[0], c]), a, ys) if b.needs(a) else None,
            reduce_to(b, dc, c, ys) if dc else None]


@rule("Max", "Min")
def _max_min(b, n, g):
    if len(n.input) == 1:
        return [g[0]]
    if len(n.input) != 2:
        raise GradientUnsupported(f"{n.op_type} with {len(n.input)} inputs")
    (a, c), y, ys = n.input, n.output[0], b.static.shape(n.output[0])
    a_wins = b.add("Not", [b.add("Less" if n.op_type == "Max" else "Greater", [a, c])])
    zero = b.scalar(0.0, y)
    return [reduce_to(b, b.where(a_wins, g[0], zero), a, ys) if b.needs(a) else None,
            reduce_to(b, b.where(a_wins, zero, g[0]), c, ys) if b.needs(c) else None]


@rule("Where")
def _where(b, n, g):
    (c, p, q), y, ys = n.input, n.output[0], b.static.shape(n.output[0])
    zero = b.scalar(0.0, y)
    return [None, reduce_to(b, b.where(c, g[0], zero), p, ys) if b.needs(p) else None,
            reduce_to(b, b.where(c, zero, g[0]), q, ys) if b.needs(q) else None]


@rule("Expand")
def _expand(b, n, g):
    return [reduce_to(b, g[0], n.input[0], b.static.shape(n.output[0]))]


@rule("Pow")
def _pow(b, n, g):
    (x, p), y, ys = n.input, n.output[0], b.static.shape(n.output[0])
    out = [None, None]
    if b.needs(x):
        pv = b.static.const_value(p)
        if pv is not None:
            pv = pv.astype(b.static.np_dtype(x))
            coef = b.add("Mul", [b.const(pv), b.add("Pow", [x, b.const(pv - 1)])])
        else:
            pc = b.add("Cast", [p], to=b.static.elem(x))
            coef = b.add("Mul", [pc, b.add("Pow", [x, b.add("Sub", [pc, b.scalar(1.0, x)])])])
        out[0] = reduce_to(b, b.add("Mul", [g[0], coef]), x, ys)
    if b.needs(p):
        out[1] = reduce_to(b, b.add("Mul", [g[0], b.add("Mul", [y, b.add("Log", [x])])]), p, ys)
    return out


rule("Exp")(unary(lambda b, x, y: y))
rule("Log")(unary(lambda b, x, y: b.add("Reciprocal", [x])))
rule("Neg")(unary(lambda b, x, y: b.scalar(-1.0, x)))
rule("Reciprocal")(unary(lambda b, x, y: b.add("Neg", [b.add("Mul", [y, y])])))
rule("Abs")(unary(lambda b, x, y: b.add("Sign", [x])))
rule("Sqrt")(unary(lambda b, x, y: b.add("Div", [b.scalar(0.5, x), y])))
rule("Erf")(unary(lambda b, x, y: b.add("Mul", [  # 2/sqrt(pi) * exp(-x^2)
    b.scalar(2.0 / math.sqrt(math.pi), x), b.add("Exp", [b.add("Neg", [b.add("Mul", [x, x])])])])))
