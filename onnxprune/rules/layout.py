"""Ops that move channels around without computing on them: Concat, Split, Slice, Transpose,
Flatten/Squeeze/Unsqueeze (and how any reshape maps an axis), Gather and Expand. Reshape itself
is in :mod:`onnxprune.rules.reshape`, Shape in :mod:`onnxprune.rules.shape_expr`."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import (
    PASSIVE,
    PRODUCER,
    BlockKind,
    Coupling,
    Link,
    OpRule,
    RuleContext,
    blocked,
    identity,
    register,
    same,
    slice_all,
)
from onnxprune.rules.opsets import placement
from onnxprune.rules.shape_expr import input_elements, shape_elements


def attribute_axis(node: gs.Node, rank: int, default: int = 0) -> int:
    """The node's ``axis`` attribute as an axis of a rank-``rank`` tensor (negative counts from the end)."""
    return int(node.attrs.get("axis", default)) % rank


@register("Concat")
class ConcatRule(OpRule):
    """Input i's channel k is output channel k + (sizes of inputs before i)."""

    def couple(self, node, tensor, axis, ctx):
        out = node.outputs[0]
        cat = attribute_axis(node, len(ctx.shape(out)))
        links, params, offset = [], [], 0
        is_output = tensor.name == out.name
        for operand in node.inputs:
            size = ctx.shape(operand)[cat]
            if axis == cat:
                span = identity(size)
                if ctx.const(operand) is not None:
                    pass  # a constant block of channels: its output channels belong to no producer
                elif is_output:
                    links.append(Link((operand.name, axis), span + offset, span))
                elif operand.name == tensor.name:
                    links.append(Link((out.name, axis), span, span + offset))
            else:
                n = ctx.shape(tensor)[axis]
                if ctx.const(operand) is not None:
                    params.append(slice_all(operand, axis, n, "shift"))
                elif operand.name != tensor.name:
                    links.append(same((operand.name, axis), n))
            offset += size
        if axis != cat and not is_output:
            links.append(same((out.name, axis), ctx.shape(tensor)[axis]))
        return Coupling(PASSIVE, links, params)


def _split_sizes(node, ctx) -> list[int] | None:
    rank = len(ctx.shape(node.inputs[0]))
    axis = attribute_axis(node, rank)
    if len(node.inputs) > 1 and node.inputs[1].name:
        return _static_ints(node, 1, ctx)
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    return [ctx.shape(o)[axis] for o in node.outputs]


@register("Split")
class SplitRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        x = node.inputs[0]
        if tensor.name != x.name and tensor.name not in {o.name for o in node.outputs}:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"Split '{node.name}' reads its sizes from a channel tensor")
        split_axis = attribute_axis(node, len(ctx.shape(x)))
        sizes = _split_sizes(node, ctx)
        if sizes is None:
            return blocked(BlockKind.RUNTIME_SHAPE, node, f"Split '{node.name}' has sizes that depend on the input shapes")
        links, offset = [], 0
        for out, size in zip(node.outputs, sizes):
            span = identity(size)
            if axis != split_axis:
                n = ctx.shape(tensor)[axis]
                if tensor.name == x.name:
                    links.append(same((out.name, axis), n))
                elif out.name == tensor.name:
                    links.append(same((x.name, axis), n))
            elif tensor.name == x.name:
                links.append(Link((out.name, axis), span + offset, span))
            elif out.name == tensor.name:
                links.append(Link((x.name, axis), span, span + offset))
            offset += size
        return Coupling(PASSIVE, links)

    def rewrite(self, node, removed, ctx):
        split_axis = attribute_axis(node, len(ctx.shape(node.inputs[0])))
        if (node.inputs[0].name, split_axis) not in removed:
            return
        old = _split_sizes(node, ctx)
        new = [s - len(removed.get((o.name, split_axis), ())) for o, s in zip(node.outputs, old)]
        place = placement("Split", "split", ctx.graph.opset)
        if len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(f"{node.name}_split_sizes", np.asarray(new, dtype=np.int64))
        elif place.is_input:
            node.attrs.pop("num_outputs", None)
            node.inputs.append(gs.Constant(f"{node.name}_split_sizes", np.asarray(new, dtype=np.int64)))
        else:
            node.attrs[place.attribute] = new


def _static_ints(node, slot: int, ctx) -> list[int] | None:
    """A constant input's values, or a computed one's when it does not depend on the input
    shapes (``chunk`` exported as bounds computed from the channel count); else None."""
    value = ctx.const(node.inputs[slot])
    if value is not None:
        return [int(v) for v in np.ravel(value)]
    elements = input_elements(node, slot, ctx)
    if elements is None or any(e.dynamic for e in elements):
        return None
    return [e.value for e in elements]


class SliceBounds(NamedTuple):
    starts: list[int]
    ends: list[int]
    axes: list[int]
    steps: list[int]


def slice_params(node: gs.Node, ctx: RuleContext) -> SliceBounds | None:
    """A Slice's starts, ends, axes and steps, or None when any depends on the input shapes."""
    if len(node.inputs) == 1:  # opset < 10: attributes
        a = node.attrs
        starts, ends = list(a["starts"]), list(a["ends"])
        return SliceBounds(starts, ends, list(a.get("axes", range(len(starts)))), [1] * len(starts))
    values = [_static_ints(node, slot, ctx) if t.name else None for slot, t in enumerate(node.inputs[1:], 1)]
    if any(v is None for v in values[:2]) or any(v is None for t, v in zip(node.inputs[3:], values[2:]) if t.name):
        return None
    starts, ends = values[0], values[1]
    axes = values[2] if len(values) > 2 and values[2] is not None else list(range(len(starts)))
    steps = values[3] if len(values) > 3 and values[3] is not None else [1] * len(starts)
    return SliceBounds(starts, ends, axes, steps)


@register("Slice")
class SliceRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        x, y = node.inputs[0], node.outputs[0]
        if tensor.name not in (x.name, y.name):
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"Slice '{node.name}' reads its bounds from a channel tensor")
        params = slice_params(node, ctx)
        if params is None:
            return blocked(BlockKind.RUNTIME_SHAPE, node, f"Slice '{node.name}' has bounds that depend on the input shapes")
        starts, ends, axes, steps = params
        rank = len(ctx.shape(x))
        axes = [a % rank for a in axes]
        if axis not in axes:
            return Coupling(PASSIVE, [same((y.name if tensor.name == x.name else x.name, axis),
                                           ctx.shape(tensor)[axis])])
        j = axes.index(axis)
        if steps[j] != 1:
            return blocked(BlockKind.AXIS_LAYOUT, node, f"Slice '{node.name}' strides over the channel axis")
        start = int(np.clip(starts[j] + (ctx.shape(x)[axis] if starts[j] < 0 else 0), 0, ctx.shape(x)[axis]))
        span = identity(ctx.shape(y)[axis])
        if tensor.name == x.name:
            return Coupling(PASSIVE, [Link((y.name, axis), span + start, span)])
        return Coupling(PASSIVE, [Link((x.name, axis), span, span + start)])

    def rewrite(self, node, removed, ctx):
        x, y = node.inputs[0], node.outputs[0]
        starts, ends, axes, _ = slice_params(node, ctx)
        rank = len(ctx.shape(x))
        for j, axis in enumerate(a % rank for a in axes):
            gone_in = removed.get((x.name, axis))
            if gone_in is None:
                continue
            size = ctx.shape(x)[axis]
            start = int(np.clip(starts[j] + (size if starts[j] < 0 else 0), 0, size))
            new_start = start - int(np.sum(gone_in < start))
            new_len = ctx.shape(y)[axis] - len(removed.get((y.name, axis), ()))
            starts[j], ends[j] = new_start, new_start + new_len
        if len(node.inputs) == 1:
            node.attrs["starts"], node.attrs["ends"] = starts, ends
        else:  # computed bounds were static: they become constants
            node.inputs[1] = gs.Constant(f"{node.name}_starts", np.asarray(starts, dtype=np.int64))
            node.inputs[2] = gs.Constant(f"{node.name}_ends", np.asarray(ends, dtype=np.int64))


@register("Transpose")
class TransposeRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        rank = len(ctx.shape(node.inputs[0]))
        perm = list(node.attrs.get("perm", reversed(range(rank))))
        size = ctx.shape(tensor)[axis]
        if tensor.name == node.inputs[0].name:
            return Coupling(PASSIVE, [same((node.outputs[0].name, perm.index(axis)), size)])
        return Coupling(PASSIVE, [same((node.inputs[0].name, perm[axis]), size)])


def _segment(src, dst, axis: int) -> tuple[list[int], list[int]]:
    """The non-1 axes of each side in the block of equal element counts that holds ``src[axis]``.

    Row-major reshapes only regroup: wherever the running products of both shapes agree, the
    element layout agrees too, so the shapes cut into blocks (``[S, N, 3E] -> [S, N, 3, E]``
    is ``[S] [N] [3E|3,E]``).
    """
    cum_src = [math.prod(src[:i]) for i in range(len(src) + 1)]
    cum_dst = [math.prod(dst[:i]) for i in range(len(dst) + 1)]
    bounds = sorted(set(cum_src) & set(cum_dst))
    lo = max(b for b in bounds if b <= cum_src[axis])
    hi = min(b for b in bounds if b > cum_src[axis])
    return ([i for i in range(len(src)) if src[i] > 1 and lo <= cum_src[i] < hi],
            [i for i in range(len(dst)) if dst[i] > 1 and lo <= cum_dst[i] < hi])


def _digit(flat: int, sizes: list[int], k: int) -> np.ndarray:
    """Digit ``k`` of every index below ``flat`` in the mixed radix ``sizes`` (row-major)."""
    return (identity(flat) // math.prod(sizes[k + 1:])) % sizes[k]


def split_link(src, dst, axis: int, stacked_src: frozenset = frozenset(), stacked_dst: frozenset = frozenset(),
               last: bool = False):
    """How axis ``axis`` of shape ``src`` maps to shape ``dst`` across a reshape:
    ``(other_axis, here, there)`` or a string saying why it cannot be followed.

    When one side splits the channel axis into several (heads x head size, or 3 x hidden for a
    fused QKV projection), the channels follow the first factor that is not *stacked* (an axis
    that is later indexed, like the 3 of a QKV split): a unit is then a whole head, or the same
    channel of Q, K and V. The other factors are blocks inside a unit. With ``last`` they follow
    the last factor instead: a unit is then one channel of every head (head-size pruning).
    """
    n = src[axis]
    if n <= 1 or math.prod(src) != math.prod(dst) or math.prod(src) == 0:
        return "reshape of an empty or size-1 axis"
    src_axes, dst_axes = _segment(src, dst, axis)
    if len(src_axes) == 1 and len(dst_axes) == 1:
        return dst_axes[0], identity(n), identity(n)
    if len(src_axes) > 1 and len(dst_axes) > 1:
        return "reshape splits or scatters this axis"
    if len(src_axes) == 1:  # the other side splits this axis into factors
        target = next((a for a in (dst_axes[::-1] if last else dst_axes) if a not in stacked_dst), None)
        if target is None:
            return "reshape splits this axis into stacked factors only"
        return target, identity(n), _digit(n, [dst[a] for a in dst_axes], dst_axes.index(target))
    carrier = next((a for a in (src_axes[::-1] if last else src_axes) if a not in stacked_src), None)
    if carrier != axis:  # this axis is a factor of a flattened axis, but not the one channels follow
        return f"reshape splits this axis (only its {'last' if last else 'leading'} factor carries channels)"
    flat = dst[dst_axes[0]]
    return dst_axes[0], _digit(flat, [src[a] for a in src_axes], src_axes.index(axis)), identity(flat)


def reshape_link(in_shape, out_shape, axis: int, from_input: bool):
    """:func:`split_link` from the input side (``from_input``) or from the output side."""
    src, dst = (in_shape, out_shape) if from_input else (out_shape, in_shape)
    return split_link(src, dst, axis)


class _ReshapeLike(OpRule):
    def couple(self, node, tensor, axis, ctx):
        x, y = node.inputs[0], node.outputs[0]
        if tensor.name not in (x.name, y.name):
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"{node.op} '{node.name}' reads its shape from a channel tensor")
        from_input = tensor.name == x.name
        result = reshape_link(ctx.shape(x), ctx.shape(y), axis, from_input)
        if isinstance(result, str):
            return blocked(BlockKind.AXIS_LAYOUT, node, f"{node.op} '{node.name}': {result}")
        other_axis, here, there = result
        return Coupling(PASSIVE, [Link(((y if from_input else x).name, other_axis), here, there)])


register("Flatten", "Squeeze", "Unsqueeze")(type("ShapeOnlyReshapeRule", (_ReshapeLike,), {}))


@register("Gather")
class GatherRule(OpRule):
    """Indexing along one axis: the other axes pass through. A constant table gathered by
    token ids (an embedding) produces the channels of its other axis."""

    def couple(self, node, tensor, axis, ctx):
        data, index, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if tensor.name == index.name:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"Gather '{node.name}' reads its indices from a channel tensor")
        gathered = attribute_axis(node, len(ctx.shape(data)))
        index_rank = len(ctx.shape(index))
        if tensor.name == y.name:
            if gathered <= axis < gathered + index_rank:
                return blocked(BlockKind.AXIS_LAYOUT, node, f"Gather '{node.name}' builds this axis from its indices")
            data_axis, out_axis = (axis, axis) if axis < gathered else (axis - index_rank + 1, axis)
        else:
            if axis == gathered:
                return blocked(BlockKind.AXIS_LAYOUT, node, f"Gather '{node.name}' selects along this axis")
            data_axis, out_axis = (axis, axis) if axis < gathered else (axis, axis + index_rank - 1)
        size = ctx.shape(tensor)[axis]
        if ctx.const(data) is not None:  # an embedding table: its rows are looked up, its columns produced
            return Coupling(PRODUCER, params=[slice_all(data, data_axis, size, "weight")])
        other = (y.name, out_axis) if tensor.name == data.name else (data.name, data_axis)
        return Coupling(PASSIVE, [same(other, size)])


@register("Expand")
class ExpandRule(OpRule):
    """Broadcasting to a computed shape: an axis that keeps its size passes through when the
    target asks for 1 there (a class token expanded over the batch)."""

    def couple(self, node, tensor, axis, ctx):
        x, target, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if tensor.name == target.name:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"Expand '{node.name}' reads its shape from a channel tensor")
        rank, x_rank = len(ctx.shape(y)), len(ctx.shape(x))
        out_axis = axis if tensor.name == y.name else axis + rank - x_rank
        x_axis = out_axis - (rank - x_rank)
        if x_axis < 0 or ctx.shape(x)[x_axis] != ctx.shape(y)[out_axis]:
            return blocked(BlockKind.BROADCAST, node, f"Expand '{node.name}' broadcasts over this axis")
        elements = shape_elements(target, ctx)
        k = out_axis - (rank - len(elements)) if elements is not None else -1
        if elements is None or (k >= 0 and (elements[k].dynamic or elements[k].value != 1)):
            return blocked(BlockKind.BROADCAST, node, f"Expand '{node.name}' names the size of this axis in its target shape")
        size = ctx.shape(tensor)[axis]
        if ctx.const(x) is not None:
            return Coupling(PASSIVE, params=[slice_all(x, x_axis, size, "shift")])
        other = (y.name, out_axis) if tensor.name == x.name else (x.name, x_axis)
        return Coupling(PASSIVE, [same(other, size)])
