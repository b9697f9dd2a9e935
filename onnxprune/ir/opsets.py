"""What changed between opsets 9 and 21, as data: nodes are emitted in the model's own opset,
so every emitter and rule that depends on the version asks :class:`Opset` instead of comparing
version numbers itself.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Opset from which each op takes its parameters (starts/ends/axes, pads, min/max, axes,
#: split sizes) as inputs rather than as attributes.
PARAMS_AS_INPUTS_SINCE = {
    "Slice": 10,
    "Pad": 11,
    "Clip": 11,
    "ReduceSum": 13,
    "Squeeze": 13,
    "Unsqueeze": 13,
    "Split": 13,
    "ReduceMean": 18,
}

#: Opset from which an op, or a feature of one, exists.
AVAILABLE_SINCE = {
    "Range": 11,
    "ScatterElements": 11,
    "ScatterElements.reduction": 16,  # scatter-add
    "Gemm.optional_C": 11,
    "Softmax.one_axis": 13,  # before 13, Softmax coerces to 2-D at `axis` (default 1)
    "Resize.coordinate_transformation_mode": 11,  # opset-10 Resize indexes the input at o / scale
}


@dataclass(frozen=True)
class Opset:
    """The default-domain opset version of a model, and what it allows."""

    version: int

    def params_as_inputs(self, op_type: str) -> bool:
        """Whether ``op_type`` takes its parameters as inputs (else as attributes)."""
        return self.version >= PARAMS_AS_INPUTS_SINCE[op_type]

    def has(self, feature: str) -> bool:
        """Whether ``feature`` (a key of :data:`AVAILABLE_SINCE`) exists in this opset."""
        return self.version >= AVAILABLE_SINCE[feature]
