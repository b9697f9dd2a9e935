"""The emitter backward rules write with: fresh tensor names, deduplicated constants, and
helper ops written the way the model's opset wants them (axes as attribute or input...),
so that rules never test the opset for those.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from numpy.typing import ArrayLike
from onnx import helper, numpy_helper

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.opsets import PARAMS_AS_INPUTS_SINCE
from onnxprune.gradient.static import StaticInfo

#: "To the end" as a Slice bound.
INT_MAX = 2**63 - 1

Ints = Sequence[int] | np.ndarray


class Emitter:
    """Nodes and initializers appended to one model, named so as not to clash with ``names``.

    ``static`` answers questions about the forward tensors (shapes, types, constant values),
    ``opset`` about the opset, and :meth:`needs` whether a tensor needs a gradient at all.
    """

    def __init__(self, static: StaticInfo, names: set[str], needed: Iterable[str] = ()) -> None:
        self.static = static
        self.opset = static.opset
        self.names = names
        self.needed = set(needed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._const_cache: dict = {}
        self._counter = 0

    def needs(self, name: str) -> bool:
        """Whether ``name`` is on the input->output path, so needs a gradient."""
        return bool(name) and name in self.needed

    # ----------------------------------------------------------------- naming / emission
    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"grad/{hint}_{self._counter}"
            if name not in self.names:
                self.names.add(name)
                return name

    def add(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str | list[str]:
        """Emit one node; return its output name (a list of names if ``n_out`` > 1)."""
        outs = [self.fresh(op_type) for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0] + "/node", **attrs))
        return outs[0] if n_out == 1 else outs

    def append(self, node: onnx.NodeProto) -> None:
        """Emit a node built by the caller (its outputs named with :meth:`fresh`)."""
        self.nodes.append(node)

    def const(self, value: ArrayLike, hint: str = "const") -> str:
        arr = np.asarray(value)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = self.fresh(hint)
            self.inits.append(numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def i64(self, values: Ints) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1))

    def ints(self, values: str | Ints) -> str:
        """A tensor name as is, or an int64 constant of ``values``."""
        return values if isinstance(values, str) else self.i64(values)

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant of the element type of ``like``."""
        return self.const(np.array(value, dtype=self.static.np_dtype(like)))

    # ----------------------------------------------------------------- opset-aware ops
    def _with_axes(self, op_type: str, x: str, axes: Ints, **attrs) -> str:
        """``op_type`` on ``x`` over ``axes``: an input from the opset where the op takes it
        so (see :data:`~onnxprune.gradient.opsets.PARAMS_AS_INPUTS_SINCE`), else an attribute."""
        if self.opset.params_as_inputs(op_type):
            return self.add(op_type, [x, self.ints(axes)], **attrs)
        return self.add(op_type, [x], axes=list(axes), **attrs)

    def reduce_sum(self, x: str, axes: Ints, keepdims: int = 1) -> str:
        return self._with_axes("ReduceSum", x, axes, keepdims=keepdims)

    def reduce_mean(self, x: str, axes: Ints, keepdims: int = 1) -> str:
        return self._with_axes("ReduceMean", x, axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Ints) -> str:
        return self._with_axes("Unsqueeze", x, axes)

    def squeeze(self, x: str, axes: Ints) -> str:
        return self._with_axes("Squeeze", x, axes)

    def slice(self, x: str, starts: str | Ints, ends: str | Ints, axes: Ints, steps: Ints | None = None) -> str:
        if not self.opset.params_as_inputs("Slice"):
            if steps is not None or isinstance(starts, str) or isinstance(ends, str):
                raise GradientUnsupported(f"strided or dynamic Slice needs opset >= {PARAMS_AS_INPUTS_SINCE['Slice']}")
            return self.add("Slice", [x], starts=list(starts), ends=list(ends), axes=list(axes))
        ins = [x, self.ints(starts), self.ints(ends), self.i64(axes)]
        return self.add("Slice", ins + ([self.i64(steps)] if steps is not None else []))

    def pad(self, x: str, pads: Ints) -> str:
        """Zero-pad ``x`` by ``pads`` (begins then ends, every axis)."""
        if not self.opset.params_as_inputs("Pad"):
            return self.add("Pad", [x], pads=list(pads), mode="constant", value=0.0)
        return self.add("Pad", [x, self.i64(pads)], mode="constant")

    def zeros_like(self, x: str) -> str:
        zero = numpy_helper.from_array(np.zeros(1, self.static.np_dtype(x)))
        return self.add("ConstantOfShape", [self.add("Shape", [x])], value=zero)

    def scatter_flat(self, x: str, size: str, indices: str, values: str, reduction: str | None = None) -> str:
        """A tensor shaped like ``x`` (``size`` elements), zero but at the flat positions
        ``indices``, which receive ``values`` (summed where repeated if ``reduction`` is 'add')."""
        zeros = self.add("ConstantOfShape", [self.add("Reshape", [size, self.i64([1])])],
                         value=numpy_helper.from_array(np.zeros(1, self.static.np_dtype(x))))
        flat = [self.add("Reshape", [t, self.i64([-1])]) for t in (indices, values)]
        scattered = self.add("ScatterElements", [zeros] + flat, axis=0, reduction=reduction)
        return self.reshape_like(scattered, x)

    def reshape_like(self, g: str, x: str) -> str:
        return self.add("Reshape", [g, self.add("Shape", [x])])

    def where(self, cond: str, a: str, b: str) -> str:
        return self.add("Where", [cond, a, b])
