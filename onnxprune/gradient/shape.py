"""Backward rules of the ops that move data without computing: pass-throughs (Identity,
Dropout, Cast, reshapes), Transpose, Concat/Split, and Slice/Gather/Pad, whose gradient is
the output gradient put back where each element came from."""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxprune.gradient.emitter import INT_MAX
from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.registry import rule
from onnxprune.ir import AVAILABLE_SINCE, PARAMS_AS_INPUTS_SINCE


@rule("Identity", "Dropout")
def _identity(b, n, g):
    return [g[0]]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(b, n, g):
    return [b.reshape_like(g[0], n.input[0])]


@rule("Cast")
def _cast(b, n, g):
    return [b.add("Cast", [g[0]], to=b.static.elem(n.input[0]))]


@rule("Transpose")
def _transpose(b, n, g):
    perm = attrs(n).get("perm") or list(reversed(range(b.static.rank(n.input[0]))))
    return [b.add("Transpose", [g[0]], perm=[int(v) for v in np.argsort(perm)])]


@rule("Concat")
def _concat(b, n, g):
    y = n.output[0]
    axis = attrs(n)["axis"] % b.static.rank(y)
    sizes = []
    for i in n.input:
        s = b.static.shape(i)
        sizes.append(s[axis] if s is not None and isinstance(s[axis], int) else None)
    if all(v is not None for v in sizes):
        out, offset = [], 0
        for i, size in zip(n.input, sizes):
            out.append(b.slice(g[0], [offset], [offset + size], [axis]) if b.needs(i) else None)
            offset += size
        return out
    if not b.opset.params_as_inputs("Split"):  # the sizes are known at run time only
        raise GradientUnsupported(f"Concat {n.name!r}: sizes unknown (opset < {PARAMS_AS_INPUTS_SINCE['Split']})")
    split = b.add("Concat", [b.slice(b.add("Shape", [i]), [axis], [axis + 1], [0]) for i in n.input], axis=0)
    parts = b.add("Split", [g[0], split], n_out=len(n.input), axis=axis)
    parts = [parts] if isinstance(parts, str) else parts
    return [p if b.needs(i) else None for p, i in zip(parts, n.input)]


@rule("Split")
def _split(b, n, g):
    axis = attrs(n).get("axis", 0) % b.static.rank(n.input[0])
    parts = [gi if gi is not None else b.zeros_like(o) for gi, o in zip(g, n.output)]
    return [b.add("Concat", parts, axis=axis)]


def _scatter_back(b, n, G, repeats: bool, blank: tuple[int, ...] = ()) -> str:
    """Gradient of a pure data-movement op (Slice, Gather, Pad reflect/edge...): replay it
    on the flat element indices of its input, then scatter(-add) G to those positions."""
    features = ("Range", "ScatterElements") + (("ScatterElements.reduction",) if repeats else ())
    if not all(b.opset.has(f) for f in features):
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: needs opset >= {max(AVAILABLE_SINCE[f] for f in features)}")
    x = n.input[0]
    size = b.add("Size", [x])
    flat_ids = b.add("Range", [b.const(np.array(0, np.int64)), size, b.const(np.array(1, np.int64))])
    ins = list(n.input)
    ins[0] = b.reshape_like(flat_ids, x)
    for i in blank:
        if i < len(ins):
            ins[i] = ""
    outs = [b.fresh("replay") for _ in n.output]
    replay = helper.make_node(n.op_type, ins, outs, name=outs[0] + "/node", domain=n.domain)
    replay.attribute.extend(n.attribute)
    b.append(replay)
    return b.scatter_flat(x, size, outs[0], G, reduction="add" if repeats else None)


@rule("Slice")
def _slice(b, n, g):
    x, G = n.input[0], g[0]
    if not b.opset.params_as_inputs("Slice"):
        a = attrs(n)
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        params = [b.static.const_value(i) if i else None for i in (list(n.input[1:]) + [""] * 4)[:4]]
        dynamic = any(i and v is None for i, v in zip(n.input[1:], params))
        if dynamic:
            return [_scatter_back(b, n, G, repeats=False)]
        starts, ends, axes, steps = (None if v is None else [int(e) for e in v.reshape(-1)] for v in params)
    xs = b.static.shape(x)
    axes = axes if axes is not None else list(range(len(starts)))
    if xs is not None and all(v == 1 for v in (steps or [1])) and all(isinstance(xs[ax], int) for ax in axes):
        r = len(xs)
        pads = [0] * (2 * r)
        for st, en, ax in zip(starts, ends, axes):
            dim, ax = xs[ax], ax % r
            st = min(max(st + dim if st < 0 else st, 0), dim)
            en = max(min(max(en + dim if en < 0 else en, 0), dim), st)
            pads[ax], pads[r + ax] = st, dim - en
        return [b.pad(G, pads)]
    return [_scatter_back(b, n, G, repeats=False)]


@rule("Gather")
def _gather(b, n, g):
    x, ind = n.input[0], b.static.const_value(n.input[1])
    s = b.static.shape(x)
    if ind is not None and ind.ndim == 0 and s is not None:  # x[..., i, ...]: pad the slice back
        axis = attrs(n).get("axis", 0) % len(s)
        if isinstance(s[axis], int):
            i = int(ind) % s[axis]
            pads = [0] * (2 * len(s))
            pads[axis], pads[len(s) + axis] = i, s[axis] - 1 - i
            return [b.pad(b.unsqueeze(g[0], [axis]), pads)]
    repeats = True
    if ind is not None:
        dim = s[attrs(n).get("axis", 0) % len(s)] if s is not None else None
        if isinstance(dim, int):
            repeats = len(np.unique(ind % dim)) != ind.size
        elif (ind >= 0).all():
            repeats = len(np.unique(ind)) != ind.size
    return [_scatter_back(b, n, g[0], repeats)]


@rule("Pad")
def _pad(b, n, g):
    a, x, G = attrs(n), n.input[0], g[0]
    if a.get("mode", "constant") != "constant":
        return [_scatter_back(b, n, G, repeats=True, blank=(2,))]
    axes = None
    if not b.opset.params_as_inputs("Pad"):
        pads = a["pads"]
    else:
        pads = b.static.const_value(n.input[1])
        if pads is None:
            raise GradientUnsupported(f"Pad {n.name!r}: dynamic pads")
        if len(n.input) > 3 and n.input[3]:
            axes = b.static.const_value(n.input[3])
            if axes is None:
                raise GradientUnsupported(f"Pad {n.name!r}: dynamic axes")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    k = len(pads) // 2
    if axes is None:
        axes = list(range(k))
    else:
        axes = [int(v) % b.static.rank(x) for v in np.asarray(axes).reshape(-1)]
    crop = [(ax, max(p0, 0), max(p1, 0)) for ax, p0, p1 in zip(axes, pads[:k], pads[k:]) if p0 > 0 or p1 > 0]
    out = G
    if crop:  # what the forward padded: slice it off
        out = b.slice(out, [c[1] for c in crop], [-c[2] if c[2] else INT_MAX for c in crop], [c[0] for c in crop])
    if any(p < 0 for p in pads):  # what the forward cropped: zero-pad it back
        r = b.static.rank(x)
        back = [0] * (2 * r)
        for ax, p0, p1 in zip(axes, pads[:k], pads[k:]):
            back[ax], back[r + ax] = max(-p0, 0), max(-p1, 0)
        out = b.pad(out, back)
    return [out]
