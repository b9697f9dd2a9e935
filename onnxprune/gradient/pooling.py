"""Backward rules of the pools: MaxPool (each window's gradient goes to its argmax),
AveragePool (spread evenly over the window) and GlobalAveragePool."""

from __future__ import annotations

import math

import numpy as np

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.registry import rule
from onnxprune.gradient.windows import kernel_shape, scatter_windows, window
from onnxprune.ir import AVAILABLE_SINCE


def _indices_output(b, n) -> str:
    """The argmax output of a MaxPool node, added to the node if it had none."""
    if len(n.output) < 2:
        n.output.append(b.fresh("maxpool_indices"))
    elif not n.output[1]:
        n.output[1] = b.fresh("maxpool_indices")
    return n.output[1]


@rule("MaxPool")
def _maxpool(b, n, g):
    x, a = n.input[0], attrs(n)
    if a.get("storage_order", 0):
        raise GradientUnsupported(f"MaxPool {n.name!r} with storage_order=1")
    ind = _indices_output(b, n)
    kernel = kernel_shape(b, n)
    dil = list(a.get("dilations") or [1] * len(kernel))
    xs = b.static.spatial(x)
    strides = list(a.get("strides") or [1] * len(kernel))
    if all((k - 1) * dl + 1 <= st for k, dl, st in zip(kernel, dil, strides)) and (
            xs is not None or (a.get("auto_pad", "NOTSET") == "NOTSET" and not a.get("ceil_mode", 0))):
        return [_unpool(b, n, g[0], ind, kernel, strides)]
    if b.opset.has("ScatterElements.reduction"):  # scatter-add to the argmax positions (flat indices)
        return [b.scatter_flat(x, b.add("Size", [x]), ind, g[0], reduction="add")]
    return [_onehot_scatter(b, n, g[0], ind, kernel)]


def _unpool(b, n, G: str, ind: str, kernel: list[int], strides: list[int]) -> str:
    """Windows do not overlap, so no input is picked twice: MaxUnpool puts each output's
    gradient back where its max came from (any opset). Its pads only serve to check
    output_shape: widen them for windows that run past the end (ceil_mode)."""
    x, y = n.input[0], n.output[0]
    xs, ys = b.static.spatial(x), b.static.spatial(y)
    pb, pe, _, _ = window(b, n, x, y, kernel)
    if xs is not None:
        pe = [max(p1, (o - 1) * st + k - p0 - i) for p0, p1, o, st, k, i in zip(pb, pe, ys, strides, kernel, xs)]
    return b.add("MaxUnpool", [G, ind, b.add("Shape", [x])], kernel_shape=kernel, strides=strides, pads=pb + pe)


def _onehot_scatter(b, n, G: str, ind: str, kernel: list[int]) -> str:
    """Older opsets have no scatter-add, and overlapping windows may pick the same input
    twice. Exact alternative: one-hot the argmax's offset within its window (K offsets),
    then a depthwise ConvTranspose with one-hot kernels adds every window's share back."""
    x, y = n.input[0], n.output[0]
    xs, ys = b.static.spatial(x), b.static.spatial(y)
    if xs is None or ys is None:
        raise GradientUnsupported(f"MaxPool {n.name!r}: spatial shapes unknown "
                                  f"(opset < {AVAILABLE_SINCE['ScatterElements.reduction']})")
    channels, nd, k = b.static.shape(x)[1], len(kernel), math.prod(kernel)
    pb, pe, s, d = window(b, n, x, y, kernel)
    pos = np.full([k] + ys, -1, np.int64)  # flat input position of each offset of each window
    grids = np.meshgrid(*[np.arange(o) for o in ys], indexing="ij")
    for ai, off in enumerate(np.ndindex(*kernel)):
        coords = [grids[i] * s[i] - pb[i] + off[i] * d[i] for i in range(nd)]
        valid = np.logical_and.reduce([(c >= 0) & (c < xs[i]) for i, c in enumerate(coords)])
        flat = np.ravel_multi_index([np.clip(c, 0, xs[i] - 1) for i, c in enumerate(coords)], xs)
        pos[ai] = np.where(valid, flat, -1)
    plane = b.const(np.array(math.prod(xs), np.int64))
    in_plane = b.add("Sub", [ind, b.add("Mul", [b.add("Div", [ind, plane]), plane])])
    hit = b.add("Equal", [b.unsqueeze(in_plane, [2]), b.const(pos)])
    per_offset = b.where(hit, b.unsqueeze(G, [2]), b.scalar(0.0, x))
    stacked = b.add("Reshape", [per_offset, b.i64([0, channels * k] + ys)])
    onehot = np.zeros([channels * k, 1] + kernel, b.static.np_dtype(x))
    for c in range(channels):
        for ai, off in enumerate(np.ndindex(*kernel)):
            onehot[(c * k + ai, 0) + off] = 1
    return scatter_windows(b, stacked, b.const(onehot), x, y, kernel, channels, pb, pe, s, d)


@rule("AveragePool")
def _avgpool(b, n, g):
    x, y = n.input[0], n.output[0]
    kernel, xs, ys = kernel_shape(b, n), b.static.spatial(x), b.static.spatial(y)
    if xs is None or ys is None:
        raise GradientUnsupported(f"AveragePool {n.name!r}: spatial shapes unknown")
    pb, pe, s, d = window(b, n, x, y, kernel)
    counts = np.ones(ys)
    for i in range(len(kernel)):  # in-bounds elements of each window
        p = np.arange(ys[i])[:, None] * s[i] - pb[i] + np.arange(kernel[i])[None, :] * d[i]
        counts = counts * ((p >= 0) & (p < xs[i])).sum(1).reshape([-1 if j == i else 1 for j in range(len(ys))])
    dt = b.static.np_dtype(x)
    # 1/divisor per window, whatever the count_include_pad/ceil_mode convention: the pool
    # of ones gives in_bounds/divisor (a constant subgraph, folded by onnxruntime).
    ones = b.const(np.ones([1, 1] + xs, dt))
    pooled = b.add("AveragePool", [ones], **attrs(n))
    scale = b.add("Div", [pooled, b.const(np.maximum(counts, 1).reshape([1, 1] + ys).astype(dt))])
    channels = b.static.shape(x)[1]
    ones_k = b.const(np.ones([channels, 1] + kernel, dt))
    return [scatter_windows(b, b.add("Mul", [g[0], scale]), ones_k, x, y, kernel, channels, pb, pe, s, d)]


@rule("GlobalAveragePool")
def _global_avgpool(b, n, g):
    x, y = n.input[0], n.output[0]
    count = b.add("Cast", [b.add("Div", [b.add("Size", [x]), b.add("Size", [y])])], to=b.static.elem(x))
    return [b.add("Expand", [b.add("Div", [g[0], count]), b.add("Shape", [x])])]  # divide before broadcasting
