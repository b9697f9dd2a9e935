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
    if wv is None:
        return [scatter_windows(b, g[0], w, x, y, kernel, group, pb, pe, s, d)]
    if all(v == 1 for v in s) and all(p <= sp for p, sp in zip(pb + pe, span + span)):
        # Stride 1: the input gradient is a plain Conv with the weights flipped spatially and
        # in/out channels swapped per group; onnxruntime's Conv beats its ConvTranspose.
        pads = [sp - p for sp, p in zip(span + span, pb + pe)]
        return [b.add("Conv", [g[0], _flipped(b, wv, group)], group=group, kernel_shape=kernel,
                      pads=pads, dilations=d, strides=s)]
    strided = _strided_grouped(b, g[0], wv, x, y, kernel, group, pb, s, d) if group > 1 else None
    return [strided or scatter_windows(b, g[0], w, x, y, kernel, group, pb, pe, s, d)]


def _flipped(b, wv: np.ndarray, group: int) -> str:
    """The weights of the input gradient's Conv: flipped spatially, in/out channels swapped
    within each group."""
    m, cg = wv.shape[0], wv.shape[1]
    flipped = wv.reshape((group, m // group, cg) + wv.shape[2:]).swapaxes(1, 2)
    flipped = flipped.reshape((group * cg, m // group) + wv.shape[2:])
    return b.const(np.ascontiguousarray(flipped[(slice(None),) * 2 + (slice(None, None, -1),) * (wv.ndim - 2)]))


def _strided_grouped(b, g: str, wv: np.ndarray, x: str, y: str, kernel: list[int], group: int, pb: list,
                     s: list, d: list) -> str | None:
    """The input gradient of a strided grouped (depthwise) Conv as a stride-1 Conv over the
    gradient with ``stride - 1`` zeros put after each element: onnxruntime runs a grouped
    ConvTranspose one group at a time (the digits MobileNet's two strided depthwise convs took
    12 of the inversion step's 60 ms), and its blocked depthwise Conv fast. None where the
    spatial sizes are not static or the geometry needs a negative pad."""
    xs, ys, nd = b.static.spatial(x), b.static.spatial(y), len(kernel)
    if xs is None or ys is None or not all(isinstance(v, int) for v in list(xs) + list(ys)):
        return None
    span = [(k - 1) * dl for k, dl in zip(kernel, d)]
    left = [sp - p for sp, p in zip(span, pb)]
    right = [i - o * st + p for i, o, st, p in zip(xs, ys, s, pb)]  # may be < 0: crop instead
    if min(left) < 0 or b.opset.version < 11:  # Resize with these attributes is opset 11
        return None
    # Each element repeated stride times per axis (nearest Resize), then every repeat but the
    # first zeroed by a [o1*s1, o2*s2] mask that broadcasts over batch and channels. Resize
    # and that Mul run on contiguous rows; a Pad or a one-hot Mul spreading the elements
    # (innermost axis 1) ran slower than the grouped ConvTranspose it replaces.
    scales = b.const(np.array([1.0, 1.0] + [float(st) for st in s], np.float32))
    roi = "" if b.opset.version >= 13 else b.const(np.zeros(0, np.float32))  # required, and unused, before 13
    u = b.add("Resize", [g, roi, scales], mode="nearest", coordinate_transformation_mode="asymmetric",
              nearest_mode="floor")
    mask = np.zeros([o * st for o, st in zip(ys, s)], b.static.np_dtype(x))
    mask[tuple(slice(None, None, st) for st in s)] = 1.0
    u = b.add("Mul", [u, b.const(mask)])
    if min(right) < 0:  # spread positions whose windows fall past the input's end: none reach it
        u = b.slice(u, [0] * nd, [o * st + min(r, 0) for o, st, r in zip(ys, s, right)], list(range(2, 2 + nd)))
    return b.add("Conv", [u, _flipped(b, wv, group)], group=group, kernel_shape=kernel,
                 pads=left + [max(r, 0) for r in right], dilations=d, strides=[1] * nd)


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
