"""Undoing numpy-style broadcasting in the backward pass: an input that was broadcast to
the output's shape receives the output gradient summed over the broadcast axes."""

from __future__ import annotations

from onnxprune.gradient.emitter import Emitter
from onnxprune.gradient.errors import GradientUnsupported


def reduce_to(b: Emitter, g: str, target: str, gshape: list | None) -> str:
    """Sum ``g`` (of shape ``gshape``) over the axes along which ``target`` was broadcast."""
    ts = b.static.shape(target)
    if ts is None or gshape is None:
        raise GradientUnsupported(f"broadcast reduction to {target!r}: shapes unknown")
    lead = len(gshape) - len(ts)
    if lead < 0:
        raise GradientUnsupported(f"broadcast reduction to {target!r}: rank mismatch")
    axes, ambiguous = list(range(lead)), False
    for i, d in enumerate(ts):
        od = gshape[lead + i]
        if d == 1:
            if od != 1:
                axes.append(lead + i)
        elif not (isinstance(d, int) or (d is not None and d == od) or od == 1):
            ambiguous = True
    if ambiguous:
        if not b.opset.params_as_inputs("ReduceSum"):
            raise GradientUnsupported(f"broadcast reduction to {target!r}: dims unknown")
        return _reduce_to_dynamic(b, g, target, lead)
    if not axes:
        return g
    r = b.reduce_sum(g, axes, keepdims=1)
    return b.reshape_like(r, target) if lead else r


def _reduce_to_dynamic(b: Emitter, g: str, target: str, lead: int) -> str:
    """The broadcast axes found at run time: where ``target`` has 1 and ``g`` has not."""
    st = b.add("Shape", [target])
    full = b.add("Concat", [b.i64([1] * lead), st], axis=0) if lead else st
    one = b.i64([1])
    mask = b.add("And", [b.add("Equal", [full, one]),
                         b.add("Not", [b.add("Equal", [b.add("Shape", [g]), one])])])
    axes = b.add("Reshape", [b.add("NonZero", [mask]), b.i64([-1])])
    r = b.add("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
    return b.add("Reshape", [r, st])
