"""Geometry shared by the windowed ops (Conv, pools): kernel size, explicit pads, and the
transposed convolution that sends each window's gradient back onto the input grid."""

from __future__ import annotations

import onnx

from onnxprune.gradient.emitter import INT_MAX, Emitter
from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.ir import PARAMS_AS_INPUTS_SINCE


def kernel_shape(b: Emitter, n: onnx.NodeProto, w: str | None = None) -> list[int]:
    """The static kernel size of a Conv/pool node (from the attribute or the weight shape)."""
    k = attrs(n).get("kernel_shape")
    if not k and w is not None:
        ws = b.static.shape(w)
        k = ws[2:] if ws else None
    if not k or not all(isinstance(v, int) and v > 0 for v in k):
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: kernel shape unknown")
    return list(k)


def window(b: Emitter, n: onnx.NodeProto, x: str, y: str, kernel: list[int]) -> tuple[list, list, list, list]:
    """Explicit (pads_begin, pads_end, strides, dilations) of a Conv/pool node."""
    a, nd = attrs(n), len(kernel)
    s, d = list(a.get("strides") or [1] * nd), list(a.get("dilations") or [1] * nd)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        xs, ys = b.static.spatial(x), b.static.spatial(y)
        if xs is None or ys is None:
            raise GradientUnsupported(f"{n.op_type} {n.name!r}: auto_pad needs static spatial shapes")
        total = [max((o - 1) * st + (k - 1) * dl + 1 - i, 0) for i, o, k, st, dl in zip(xs, ys, kernel, s, d)]
        lo, hi = [t // 2 for t in total], [t - t // 2 for t in total]
        pb, pe = (lo, hi) if auto == "SAME_UPPER" else (hi, lo)
    elif auto == "VALID":
        pb, pe = [0] * nd, [0] * nd
    else:
        pads = list(a.get("pads") or [0] * (2 * nd))
        pb, pe = pads[:nd], pads[nd:]
    return pb, pe, s, d


def scatter_windows(b: Emitter, g: str, w: str, x: str, y: str, kernel: list[int], group: int, pb: list, pe: list,
                    s: list, d: list) -> str:
    """ConvTranspose that sends each output window's gradient back onto the input grid,
    with the output size made exactly the input's (output_padding, or a crop)."""
    nd, xs, ys = len(kernel), b.static.spatial(x), b.static.spatial(y)
    common = dict(group=group, strides=s, dilations=d, kernel_shape=list(kernel))
    if xs is not None and ys is not None:
        op = [i + p0 + p1 - ((k - 1) * dl + 1) - st * (o - 1)
              for i, o, k, st, dl, p0, p1 in zip(xs, ys, kernel, s, d, pb, pe)]
        pe = [p1 - min(v, 0) for p1, v in zip(pe, op)]  # ceil_mode windows past the end: crop
        return b.add("ConvTranspose", [g, w], pads=pb + pe, output_padding=[max(v, 0) for v in op], **common)
    if not b.opset.params_as_inputs("Slice"):  # the crop is a Slice with dynamic ends
        raise GradientUnsupported("windowed op with dynamic spatial shape needs opset >= "
                                  f"{PARAMS_AS_INPUTS_SINCE['Slice']}")
    ct = b.add("ConvTranspose", [g, w], pads=pb + pe, output_padding=[st - 1 for st in s], **common)
    ends = b.slice(b.add("Shape", [x]), [2], [INT_MAX], [0])
    return b.slice(ct, [0] * nd, ends, list(range(2, 2 + nd)))
