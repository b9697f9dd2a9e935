"""The emitter backward rules write with: the shared :class:`~onnxprune.ir.NodeEmitter`
(fresh names, helper ops written the way the model's opset wants them, so that rules never
test the opset for those) with deduplicated constants and what is known of the forward
tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from numpy.typing import ArrayLike
from onnx import numpy_helper

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.static import StaticInfo
from onnxprune.ir import PARAMS_AS_INPUTS_SINCE, NodeEmitter, runtime
from onnxprune.ir.held import held_tensors

#: "To the end" as a Slice bound.
INT_MAX = 2**63 - 1

Ints = Sequence[int] | np.ndarray


class Emitter(NodeEmitter):
    """Nodes and initializers appended to one model, named so as not to clash with ``names``.

    ``static`` answers questions about the forward tensors (shapes, types, constant values),
    ``opset`` about the opset, and :meth:`needs` whether a tensor needs a gradient at all.
    Equal constants are one initializer: backward graphs ask for the same few often.
    """

    def __init__(self, static: StaticInfo, names: set[str], needed: Iterable[str] = ()) -> None:
        super().__init__(static.opset, "grad/{hint}_{n}", names)
        self.static = static
        self.needed = set(needed)
        self._const_cache: dict = {}
        self.hold_large = bool(held_tensors(static.model))  # flipped kernels as large as the weights
        #: Gradients broadcast from a reduction: expanded name -> (unexpanded, forward tensor
        #: whose shape it was expanded to). See :meth:`expand_like` and :meth:`compact`.
        self.broadcasts: dict[str, tuple[str, str]] = {}

    def needs(self, name: str) -> bool:
        """Whether ``name`` is on the input->output path, so needs a gradient."""
        return bool(name) and name in self.needed

    def append(self, node: onnx.NodeProto) -> None:
        """Emit a node built by the caller (its outputs named with :meth:`fresh`)."""
        self.nodes.append(node)

    def const(self, value: ArrayLike, hint: str = "const") -> str:
        arr = np.asarray(value)
        if arr.nbytes >= runtime.LEAN_TENSOR_BYTES:  # a kernel, asked for once: no key of its bytes
            return super().const(arr, hint)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            self._const_cache[key] = super().const(arr, hint)
        return self._const_cache[key]

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant of the element type of ``like``."""
        return self.const(np.array(value, dtype=self.static.np_dtype(like)))

    # ----------------------------------------------------------------- gradient-side ops
    def slice(self, x: str, starts: str | Ints, ends: str | Ints, axes: Ints, steps: Ints | None = None) -> str:
        if not self.opset.params_as_inputs("Slice"):
            if steps is not None or isinstance(starts, str) or isinstance(ends, str):
                raise GradientUnsupported(f"strided or dynamic Slice needs opset >= {PARAMS_AS_INPUTS_SINCE['Slice']}")
            return self.add("Slice", [x], starts=list(starts), ends=list(ends), axes=list(axes))
        ins = [x, self.ints(starts), self.ints(ends), self.i64(axes)]
        return self.add("Slice", ins + ([self.i64(steps)] if steps is not None else []))

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

    def expand_like(self, g: str, x: str) -> str:
        """``g`` broadcast to the shape of the forward tensor ``x``, remembered: a consumer that
        broadcasts anyway can read ``g`` itself (:meth:`compact`)."""
        out = self.add("Expand", [g, self.add("Shape", [x])])
        self.broadcasts[out] = (g, x)
        return out

    def compact(self, g: str, full: str | None = None) -> str:
        """``g``, or what it was expanded from when the elementwise op reading it broadcasts
        to the full shape anyway: ``full`` is a forward tensor of that shape read by the same
        op (None: another operand is a gradient of the same tensor, so it is full already).
        A reduction's gradient (ReduceMean in every BatchNorm-matching term) then never
        materialises its broadcast copy."""
        if g not in self.broadcasts:
            return g
        small, like = self.broadcasts[g]
        if full is None:
            return small
        have, want = self.static.shape(full), self.static.shape(like)
        known = have is not None and want is not None and all(d is not None for d in have)
        return small if known and list(have) == list(want) else g

    def reshape_like(self, g: str, x: str) -> str:
        return self.add("Reshape", [g, self.add("Shape", [x])])

    def where(self, cond: str, a: str, b: str) -> str:
        return self.add("Where", [cond, a, b])
