"""Backward rules of Resize and Upsample (nearest and linear modes, batch and channels kept).

Along each resized spatial axis, nearest and linear interpolation are a fixed matrix ``A``
(output positions x input positions) worked out from the sizes, the scale and the
coordinate transformation as the ONNX specification defines them; the forward op is
``A_h X A_w^T`` per channel, so the gradient is ``A_h^T G A_w``: two MatMuls with constant
matrices. Feature pyramids and detector necks upsample this way (YOLO, FPN, U-Net decoders);
cubic interpolation, antialiasing and crop-and-resize are refused.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.registry import rule


@rule("Resize", "Upsample")
def _resize(b, n, g):
    x, y = n.input[0], n.output[0]
    a = attrs(n)
    mode = _text(a.get("mode", "nearest"))
    if mode not in ("nearest", "linear", "bilinear"):
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: mode {mode!r}")
    if a.get("antialias", 0) or a.get("axes") is not None:
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: antialias or axes")
    # Upsample and opset-10 Resize have no coordinate transformation: their outputs index the
    # input at o / scale (asymmetric), rounded down for nearest.
    legacy = n.op_type == "Upsample" or not b.opset.has("Resize.coordinate_transformation_mode")
    transform = "asymmetric" if legacy else _text(a.get("coordinate_transformation_mode", "half_pixel"))
    rounding = "floor" if legacy else _text(a.get("nearest_mode", "round_prefer_floor"))
    xs, ys = b.static.spatial(x), b.static.spatial(y)
    if xs is None or ys is None or len(xs) not in (1, 2) or len(ys) != len(xs) or \
            b.static.shape(x)[1] != b.static.shape(y)[1]:
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: spatial shapes unknown, or it resizes batch or channels")
    scales = _scales(b, n, len(xs) + 2)
    grad = g[0]
    dtype = b.static.np_dtype(x)
    for i, (lin, lout) in enumerate(zip(xs, ys)):
        scale = scales[i + 2] if scales is not None else lout / lin
        if lin == lout and scale == 1:
            continue
        m = interpolation_matrix(lin, lout, scale, mode, transform, rounding).astype(dtype)  # [out, in]
        if i == len(xs) - 1:  # G [.., out] @ A [out, in]
            grad = b.add("MatMul", [grad, b.const(m)])
        else:  # A^T [in, out] @ G [.., out, W]
            grad = b.add("MatMul", [b.const(np.ascontiguousarray(m.T)), grad])
    return [grad] + [None] * (len(n.input) - 1)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scales(b, n, rank: int) -> list[float] | None:
    """The scales the node was given (Upsample's attribute or input, Resize's input), None
    when it was given sizes instead (then a scale is output / input)."""
    a = attrs(n)
    if n.op_type == "Upsample" and a.get("scales") is not None:
        value = np.asarray(a["scales"], np.float64)
    else:
        index = 1 if n.op_type == "Upsample" or len(n.input) == 2 else 2
        name = n.input[index] if len(n.input) > index else ""
        value = b.static.const_value(name) if name else None
        if name and value is None:
            raise GradientUnsupported(f"{n.op_type} {n.name!r}: scales computed at run time")
    if value is None or value.size == 0:
        return None
    if value.size != rank or value[0] != 1 or value[1] != 1:
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: it resizes batch or channels")
    return [float(v) for v in value]


def interpolation_matrix(lin: int, lout: int, scale: float, mode: str, transform: str, rounding: str) -> np.ndarray:
    """``A`` with ``out = A @ in`` along one axis, as the ONNX specification of Resize defines
    nearest and linear interpolation (float64)."""
    m = np.zeros((lout, lin))
    for o in range(lout):
        src = _source(o, lin, lout, scale, transform)
        if mode == "nearest":
            m[o, min(max(_round(src, rounding), 0), lin - 1)] = 1.0
            continue
        src = min(max(src, 0.0), lin - 1.0)
        i0 = int(math.floor(src))
        i1, w = min(i0 + 1, lin - 1), src - i0
        m[o, i0] += 1.0 - w
        m[o, i1] += w
    return m


def _source(o: int, lin: int, lout: int, scale: float, transform: str) -> float:
    """The input coordinate of output position ``o``."""
    if transform == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if lout > 1 else 0.0
    if transform == "align_corners":
        return o * (lin - 1) / (lout - 1) if lout > 1 else 0.0
    if transform == "asymmetric":
        return o / scale
    if transform == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    if transform == "half_pixel_symmetric":
        adjustment = lout / (scale * lin)
        return lin / 2 * (1 - adjustment) + (o + 0.5) / scale - 0.5
    raise GradientUnsupported(f"Resize coordinate_transformation_mode {transform!r}")


def _round(v: float, rounding: str) -> int:
    if rounding == "round_prefer_floor":
        return int(math.ceil(v - 0.5))
    if rounding == "round_prefer_ceil":
        return int(math.floor(v + 0.5))
    if rounding == "floor":
        return int(math.floor(v))
    if rounding == "ceil":
        return int(math.ceil(v))
    raise GradientUnsupported(f"Resize nearest_mode {rounding!r}")
