"""Ops that act on each element or each channel alone: activations, broadcasting arithmetic,
pooling, padding, resizing, softmax and reductions over other axes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import PASSIVE, BlockKind, Coupling, OpRule, blocked, register, same, slice_all
from onnxprune.rules.opsets import SOFTMAX_AXES
from onnxprune.rules.shape_expr import element_source, shape_elements
from onnxprune.rules.statistics import rescale_mean, statistic_coupling


def _through(node, tensor, axis, ctx, out_axis=None) -> Coupling:
    """Tie axis ``axis`` of the data input to ``out_axis`` (default the same) of output 0."""
    x, y = node.inputs[0], node.outputs[0]
    out_axis = axis if out_axis is None else out_axis
    if tensor.name == x.name:
        return Coupling(PASSIVE, [same((y.name, out_axis), ctx.shape(x)[axis])])
    return Coupling(PASSIVE, [same((x.name, axis), ctx.shape(y)[axis])])


def _only_first_output_used(node) -> bool:
    return all(not out.outputs for out in node.outputs[1:])


@register("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Elu",
          "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Exp", "Log", "Abs", "Neg",
          "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast",
          "Dropout", "Clip", "Not", "IsNaN", "Shrink")
class UnaryRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        if tensor.name != node.inputs[0].name and tensor.name != node.outputs[0].name:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"{node.op} '{node.name}' uses a channel tensor as a parameter")
        if not _only_first_output_used(node):
            return blocked(BlockKind.EXTRA_OUTPUT, node, f"{node.op} '{node.name}' has a second output in use")
        return _through(node, tensor, axis, ctx)


@register("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu", "Where",
          "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor")
class BroadcastRule(OpRule):
    """Numpy broadcasting: equal-sized operands are tied, constants are sliced, size-1 broadcast.
    Where(condition, a, b) too: a causal or padding mask broadcast over heads is left alone.
    Comparisons and logic as well (a one-hot written as Equal(ids, classes), as tf2onnx and
    jax2tf export it, compares with one class per channel)."""

    _SCALES = {"Mul", "Div", "PRelu", "Pow"}

    def couple(self, node, tensor, axis, ctx):
        out = node.outputs[0]
        out_shape = ctx.shape(out)
        rank = len(out_shape)
        out_axis = axis if tensor.name == out.name else axis + rank - len(ctx.shape(tensor))
        size = out_shape[out_axis]
        if ctx.shape(tensor)[axis] != size:
            return blocked(BlockKind.BROADCAST, node, f"{node.op} '{node.name}' broadcasts one channel over {size}")
        kind = "weight" if node.op in self._SCALES else "shift"
        links, params = [], []
        for operand in node.inputs:
            shape = ctx.shape(operand)
            a = out_axis - (rank - len(shape))
            if a < 0 or shape[a] == 1:
                continue
            if ctx.const(operand) is not None:
                params.append(slice_all(operand, a, size, kind))
            elif operand.name != tensor.name:
                links.append(same((operand.name, a), size))
        if tensor.name != out.name:
            links.append(same((out.name, out_axis), size))
        return Coupling(PASSIVE, links, params)


@register("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
class PoolRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        if axis >= 2:
            return blocked(BlockKind.CROSS_CHANNEL, node, f"{node.op} '{node.name}' pools over this axis")
        if not _only_first_output_used(node):
            return blocked(BlockKind.EXTRA_OUTPUT, node, f"{node.op} '{node.name}' uses its indices output")
        return _through(node, tensor, axis, ctx)


def _pads(node, ctx):
    if len(node.inputs) > 1:
        return ctx.const(node.inputs[1])
    return np.asarray(node.attrs.get("pads", node.attrs.get("paddings", [])))


def _padded(node, axis: int, ctx) -> list[int] | None:
    """(before, after) padding of ``axis``: from constant pads, or from pads computed at run time
    whose two elements for this axis are constants (tf2onnx computes SAME padding from the
    spatial sizes and puts literal zeros for batch and channels). None when not known."""
    rank = len(ctx.shape(node.inputs[0]))
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3].name:
        given = ctx.const(node.inputs[3])
        if given is None:
            return None
        axes = [int(a) % rank for a in np.ravel(given)]
        if axis not in axes:
            return [0, 0]
    pads = _pads(node, ctx)
    k = axes.index(axis)
    if pads is not None:
        return [int(pads[k]), int(pads[k + len(axes)])]
    elements = shape_elements(node.inputs[1], ctx)
    if elements is None or len(elements) != 2 * len(axes) or any(e.dynamic for e in (elements[k], elements[k + len(axes)])):
        return None
    return [elements[k].value, elements[k + len(axes)].value]


@register("Pad")
class PadRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        if tensor.name not in (node.inputs[0].name, node.outputs[0].name):
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"Pad '{node.name}' reads its pads from a channel tensor")
        padded = _padded(node, axis, ctx)
        if padded is None:
            return blocked(BlockKind.RUNTIME_SHAPE, node, f"Pad '{node.name}' pads axis {axis} by an amount computed "
                           "at run time")
        if padded != [0, 0]:
            return blocked(BlockKind.AXIS_LAYOUT, node, f"Pad '{node.name}' pads the channel axis")
        return _through(node, tensor, axis, ctx)


@register("Resize", "Upsample")
class ResizeRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        if tensor.name not in (node.inputs[0].name, node.outputs[0].name):
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"{node.op} '{node.name}' reads its sizes from a channel tensor")
        if ctx.shape(node.inputs[0])[axis] != ctx.shape(node.outputs[0])[axis]:
            return blocked(BlockKind.AXIS_LAYOUT, node, f"{node.op} '{node.name}' resizes this axis")
        sizes = node.inputs[3] if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name else None
        if sizes is not None and ctx.const(sizes) is None \
                and element_source(sizes, axis, ctx) != (node.inputs[0].name, axis):
            # Sizes computed at run time are fine on an axis they read from the resized tensor itself.
            return blocked(BlockKind.RUNTIME_SHAPE, node, f"Resize '{node.name}' has sizes computed at run time "
                           f"that fix axis {axis} (not read from its input's own axis {axis})")
        return _through(node, tensor, axis, ctx)

    def rewrite(self, node, removed, ctx):
        if node.op != "Resize" or len(node.inputs) <= 3 or not isinstance(node.inputs[3], gs.Constant):
            return
        sizes = np.array(node.inputs[3].values, copy=True)
        for (name, axis), gone in removed.items():
            if name == node.outputs[0].name:
                sizes[axis] -= len(gone)
        node.inputs[3].values = sizes


def _softmax_axes(node, ctx) -> set[int]:
    rank = len(ctx.shape(node.inputs[0]))
    axes = SOFTMAX_AXES.at(ctx.graph.opset)
    first = int(node.attrs.get("axis", axes.default)) % rank
    return set(range(first, rank)) if axes.through_last else {first}


@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        if axis in _softmax_axes(node, ctx):
            return blocked(BlockKind.CROSS_CHANNEL, node, f"{node.op} '{node.name}' normalises over this axis")
        return _through(node, tensor, axis, ctx)


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")
class ReduceRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        rank = len(ctx.shape(node.inputs[0]))
        if node.op in ("ArgMax", "ArgMin"):
            axes = [int(node.attrs.get("axis", 0))]
        elif len(node.inputs) > 1 and node.inputs[1].name:
            value = ctx.const(node.inputs[1])
            if value is None:
                return blocked(BlockKind.RUNTIME_SHAPE, node, f"{node.op} '{node.name}' reduces over axes computed at run time")
            axes = [int(a) for a in value.ravel()]
        else:
            axes = node.attrs.get("axes")
        if not axes:
            return blocked(BlockKind.CROSS_CHANNEL, node, f"{node.op} '{node.name}' reduces over every axis")
        axes = sorted(a % rank for a in axes)
        keep = int(node.attrs.get("keepdims", 1))
        if tensor.name == node.inputs[0].name:
            if axis in axes:
                statistic = statistic_coupling(node, tensor, axis, axes, ctx)
                if statistic is not None:
                    return statistic
                return blocked(BlockKind.CROSS_CHANNEL, node, f"{node.op} '{node.name}' reduces over this axis")
            out_axis = axis if keep else axis - sum(a < axis for a in axes)
            return Coupling(PASSIVE, [same((node.outputs[0].name, out_axis), ctx.shape(tensor)[axis])])
        in_axis = axis if keep else [a for a in range(rank) if a not in axes][axis]
        return Coupling(PASSIVE, [same((node.inputs[0].name, in_axis), ctx.shape(tensor)[axis])])

    def rewrite(self, node, removed, ctx):
        if node.op == "ReduceSum":
            rescale_mean(node, removed, ctx)
