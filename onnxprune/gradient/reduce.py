"""Backward rules of ReduceSum and ReduceMean: the gradient is broadcast back over the
reduced axes (divided by the count for a mean, before it is broadcast)."""

from __future__ import annotations

import numpy as np

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.registry import rule


@rule("ReduceMean", "ReduceSum")
def _reduce(b, n, g):
    x, y, a, G = n.input[0], n.output[0], attrs(n), g[0]
    if b.opset.params_as_inputs(n.op_type):
        axes = b.static.const_value(n.input[1]) if len(n.input) > 1 and n.input[1] else np.zeros(0)
        if axes is None:
            raise GradientUnsupported(f"{n.op_type} {n.name!r}: dynamic axes")
        axes = [int(v) for v in axes.reshape(-1)]
    else:
        axes = list(a.get("axes") or [])
    if not axes and a.get("noop_with_empty_axes", 0):
        return [G]
    if axes and not a.get("keepdims", 1):
        r = b.static.rank(x)
        G = b.unsqueeze(G, sorted(v % r for v in axes))
    if n.op_type == "ReduceMean":  # divided while it is small, then broadcast
        count = b.add("Cast", [b.add("Div", [b.add("Size", [x]), b.add("Size", [y])])], to=b.static.elem(x))
        G = b.add("Div", [G, count])
    return [b.expand_like(G, x)]
