"""Backward rules of the linear ops: MatMul and Gemm (products with the transposed other
factor), Conv (a transposed convolution, or a flipped-kernel Conv at stride 1) and
ConvTranspose (a plain Conv with the same weights)."""

from __future__ import annotations

import numpy as np

from onnxprune.gradient.broadcast import reduce_to
from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.registry import rule
from onnxprune.gradient.windows import kernel_shape, scatter_windows, window


@rule("MatMul")
def _matmul(b, n, g):
    """For Y = A @ C: dA = G @ C^T and dC = A^T @ G, summed over the batch dims each factor
    was broadcast along; rank-1 factors are the matrix-vector special cases."""
    (a, c), G = n.input, g[0]
    ys, sa, sc = b.static.required_shape(n.output[0]), b.static.required_shape(a), b.static.required_shape(c)
    ra, rc = len(sa), len(sc)
    need_a, need_c = b.needs(a), b.needs(c)

    def t(v, r):
        return b.add("Transpose", [v], perm=list(range(r - 2)) + [r - 1, r - 2])

    if ra == 1 and rc == 1:
        return [b.add("Mul", [G, c]) if need_a else None, b.add("Mul", [G, a]) if need_c else None]
    if rc == 1:  # [..., M, K] @ [K] -> [..., M]
        gu = b.unsqueeze(G, [len(ys)])
        return [reduce_to(b, b.add("Mul", [gu, c]), a, ys + [sc[0]]) if need_a else None,
                reduce_to(b, b.add("Mul", [a, gu]), c, ys + [sa[-1]]) if need_c else None]
    if ra == 1:  # [K] @ [..., K, M] -> [..., M]
        da = dc = None
        if need_a:
            d = b.add("MatMul", [c, b.unsqueeze(G, [len(ys)])])
            da = reduce_to(b, b.squeeze(d, [rc - 1]), a, ys[:-1] + [sa[0]])
        if need_c:
            outer = b.add("Mul", [b.unsqueeze(a, [1]), b.unsqueeze(G, [len(ys) - 1])])
            dc = reduce_to(b, outer, c, ys[:-1] + [sa[0], ys[-1]])
        return [da, dc]
    return [reduce_to(b, b.add("MatMul", [G, t(c, rc)]), a, ys[:-2] + sa[-2:]) if need_a else None,
            reduce_to(b, b.add("MatMul", [t(a, ra), G]), c, ys[:-2] + sc[-2:]) if need_c else None]


@rule("Gemm")
def _gemm(b, n, g):
    at, G = attrs(n), g[0]
    a, w = n.input[0], n.input[1]
    c = n.input[2] if len(n.input) > 2 else ""
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = at.get("transA", 0), at.get("transB", 0)

    def gemm(p, q, t_p, t_q):
        ins = [p, q] + ([] if b.opset.has("Gemm.optional_C") else [b.scalar(0.0, a)])
        return b.add("Gemm", ins, alpha=alpha, transA=t_p, transB=t_q)

    out = [None] * len(n.input)
    if b.needs(a):
        out[0] = gemm(w, G, tb, 1) if ta else gemm(G, w, 0, 1 - tb)
    if b.needs(w):
        out[1] = gemm(G, a, 1, ta) if tb else gemm(a, G, 1 - ta, 0)
    if c and b.needs(c):
        out[2] = reduce_to(b, b.add("Mul", [G, b.scalar(beta, c)]), c, b.static.shape(n.output[0]))
    return out


@rule("Conv")
def _conv(b, n, g):
    x, w, y = n.input[0], n.input[1], n.output[0]
    kernel = kernel_shape(b, n, w)
    pb, pe, s, d = window(b, n, x, y, kernel)
    group = attrs(n).get("group", 1)
    wv = b.static.const_value(w)
    span = [(k - 1) * dl for k, dl in zip(kernel, d)]
    if wv is not None and all(v == 1 for v in s) and all(p <= sp for p, sp in zip(pb + pe, span + span)):
        # Stride 1: the input gradient is a plain Conv with the weights flipped spatially and
        # in/out channels swapped per group; onnxruntime's Conv beats its ConvTranspose.
        m, cg = wv.shape[0], wv.shape[1]
        flipped = wv.reshape((group, m // group, cg) + wv.shape[2:]).swapaxes(1, 2)
        flipped = flipped.reshape((group * cg, m // group) + wv.shape[2:])
        flipped = flipped[(slice(None),) * 2 + (slice(None, None, -1),) * len(kernel)]
        pads = [sp - p for sp, p in zip(span + span, pb + pe)]
        return [b.add("Conv", [g[0], b.const(np.ascontiguousarray(flipped))], group=group, kernel_shape=kernel,
                      pads=pads, dilations=d, strides=s)]
    return [scatter_windows(b, g[0], w, x, y, kernel, group, pb, pe, s, d)]


@rule("ConvTranspose")
def _conv_transpose(b, n, g):
    a, w = attrs(n), n.input[1]
    if a.get("output_shape") or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise GradientUnsupported(f"ConvTranspose {n.name!r} with output_shape/auto_pad SAME")
    kernel = kernel_shape(b, n, w)
    nd = len(kernel)
    pads = list(a.get("pads") or [0] * (2 * nd)) if a.get("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * nd)
    return [b.add("Conv", [g[0], w], group=a.get("group", 1), kernel_shape=kernel, pads=pads,
                  strides=list(a.get("strides") or [1] * nd), dilations=list(a.get("dilations") or [1] * nd))]
