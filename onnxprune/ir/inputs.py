"""How synthetic inputs are laid out for models whose inputs are not all ``[batch, ...]``.

A recurrent state is ``[layers*dirs, batch, hidden]``: its batch is axis 1. A sample rate or
a flag is a scalar that selects an If branch. Synthetic inputs stack samples on each input's
*sample axis* (its first dynamic dimension; for a fully static model, the first axis of the
batch's size) and give a control scalar the value the model compares it with, so that the
branch real inputs take is the one measured.
"""

from __future__ import annotations

import onnx

from onnxprune.ir.shapes import Shape, control_values, input_specs

__all__ = ["control_values", "sample_axes", "stack_samples"]


def sample_axes(model: onnx.ModelProto, shapes: dict[str, Shape]) -> dict[str, int | None]:
    """Per real graph input, the axis samples stack on (None: a scalar or a shape without one,
    fed the same to every sample)."""
    specs = input_specs(model)
    first = shapes.get(specs[0].name, ()) if specs else ()
    batch = first[0] if first else 1
    axes: dict[str, int | None] = {}
    for spec in specs:
        shape = shapes.get(spec.name, ())
        dynamic = [k for k, d in enumerate(spec.dims or ()) if d is None]
        if dynamic:
            axes[spec.name] = dynamic[0]
        else:
            # a fully static input: the axis of the batch's size; none (a state of its own size, fed
            # the same to every sample) when no axis has it
            axes[spec.name] = next((k for k, d in enumerate(shape) if d == batch), None)
    return axes


def stack_samples(shape: Shape, axis: int | None, count: int) -> tuple[int, ...]:
    """The shape of ``count`` samples of an input of ``shape`` stacked on ``axis``."""
    if axis is None:
        return tuple(shape)
    out = list(shape)
    out[axis] = count
    return tuple(out)
