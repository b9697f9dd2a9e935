"""Ops that move channels around without computing on them: Concat, Split, Slice, Transpose,
Reshape/Flatten/Squeeze/Unsqueeze, and Shape (which only reads dimensions)."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import PASSIVE, Coupling, Link, OpRule, blocked, identity, register, same, slice_all


def _axis(node, rank: int, default: int = 0) -> int:
    return int(node.attrs.get("axis", default)) % rank


@register("Concat")
class ConcatRule(OpRule):
    """Input i's channel k is output channel k + (sizes of inputs before i)."""

    def couple(self, node, tensor, axis, ctx):
        out = node.outputs[0]
        cat = _axis(node, len(ctx.shape(out)))
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
    axis = _axis(node, rank)
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = ctx.const(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    return [ctx.shape(o)[axis] for o in node.outputs]


@register("Split")
class SplitRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        x = node.inputs[0]
        if tensor.name != x.name and tensor.name not in {o.name for o in node.outputs}:
            return blocked(f"Split '{node.name}' reads its sizes from a channel tensor")
        split_axis = _axis(node, len(ctx.shape(x)))
        sizes = _split_sizes(node, ctx)
        if sizes is None:
            return blocked(f"Split '{node.name}' has sizes computed at run time")
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
        split_axis = _axis(node, len(ctx.shape(node.inputs[0])))
        if (node.inputs[0].name, split_axis) not in removed:
            return
        old = _split_sizes(node, ctx)
        new = [s - len(removed.get((o.name, split_axis), ())) for o, s in zip(node.outputs, old)]
        if len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1].values = np.asarray(new, dtype=np.int64)
        elif ctx.graph.opset >= 13:
            node.attrs.pop("num_outputs", None)
            node.inputs.append(gs.Constant(f"{node.name}_split_sizes", np.asarray(new, dtype=np.int64)))
        else:
            node.attrs["split"] = new


def _slice_params(node, ctx):
    """starts, ends, axes, steps as lists, or None when any is computed at run time."""
    if len(node.inputs) == 1:  # opset < 10: attributes
        a = node.attrs
        starts, ends = list(a["starts"]), list(a["ends"])
        return starts, ends, list(a.get("axes", range(len(starts)))), [1] * len(starts)
    values = [ctx.const(t) if t.name else None for t in node.inputs[1:]]
    if any(v is None for v in values[:2]) or any(v is None for t, v in zip(node.inputs[3:], values[2:]) if t.name):
        return None
    starts, ends = [int(v) for v in values[0]], [int(v) for v in values[1]]
    axes = [int(v) for v in values[2]] if len(values) > 2 and values[2] is not None else list(range(len(starts)))
    steps = [int(v) for v in values[3]] if len(values) > 3 and values[3] is not None else [1] * len(starts)
    return starts, ends, axes, steps


@register("Slice")
class SliceRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        x, y = node.inputs[0], node.outputs[0]
        if tensor.name not in (x.name, y.name):
            return blocked(f"Slice '{node.name}' reads its bounds from a channel tensor")
        params = _slice_params(node, ctx)
        if params is None:
            return blocked(f"Slice '{node.name}' has bounds computed at run time")
        starts, ends, axes, steps = params
        rank = len(ctx.shape(x))
        axes = [a % rank for a in axes]
        if axis not in axes:
            return Coupling(PASSIVE, [same((y.name if tensor.name == x.name else x.name, axis),
                                           ctx.shape(tensor)[axis])])
        j = axes.index(axis)
        if steps[j] != 1:
            return blocked(f"Slice '{node.name}' strides over the channel axis")
        start = int(np.clip(starts[j] + (ctx.shape(x)[axis] if starts[j] < 0 else 0), 0, ctx.shape(x)[axis]))
        span = identity(ctx.shape(y)[axis])
        if tensor.name == x.name:
            return Coupling(PASSIVE, [Link((y.name, axis), span + start, span)])
        return Coupling(PASSIVE, [Link((x.name, axis), span, span + start)])

    def rewrite(self, node, removed, ctx):
        x, y = node.inputs[0], node.outputs[0]
        starts, ends, axes, _ = _slice_params(node, ctx)
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
        else:
            node.inputs[1].values = np.asarray(starts, dtype=node.inputs[1].values.dtype)
            node.inputs[2].values = np.asarray(ends, dtype=node.inputs[2].values.dtype)


@register("Transpose")
class TransposeRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        rank = len(ctx.shape(node.inputs[0]))
        perm = list(node.attrs.get("perm", reversed(range(rank))))
        size = ctx.shape(tensor)[axis]
        if tensor.name == node.inputs[0].name:
            return Coupling(PASSIVE, [same((node.outputs[0].name, perm.index(axis)), size)])
        return Coupling(PASSIVE, [same((node.inputs[0].name, perm[axis]), size)])


def reshape_link(in_shape, out_shape, axis: int, from_input: bool):
    """How axis ``axis`` of one side of a reshape maps to the other: (other_axis, here, there)
    or a string saying why it cannot be followed."""
    src, dst = (in_shape, out_shape) if from_input else (out_shape, in_shape)
    before = math.prod(src[:axis])
    other = next((b for b in range(len(dst)) if math.prod(dst[:b]) == before and dst[b] != 1), None)
    if other is None:
        return "reshape splits or scatters this axis"
    n_src, n_dst = src[axis], dst[other]
    if n_src == n_dst:
        return other, identity(n_src), identity(n_src)
    small, big = min(n_src, n_dst), max(n_src, n_dst)
    merged_side = dst if n_dst > n_src else src
    merged_axis = other if n_dst > n_src else axis
    small_side = src if n_dst > n_src else dst
    small_axis = axis if n_dst > n_src else other
    block = big // small
    trailing = [math.prod(small_side[small_axis + 1:j]) for j in range(small_axis + 1, len(small_side) + 1)]
    if big % small or block not in trailing or merged_side[merged_axis] != big:
        return "reshape splits this axis (e.g. into heads or groups)"
    fine = identity(big)
    coarse = fine // block
    if n_dst > n_src:  # this side is the channel axis, the other a flattened (channel, rest) axis
        return other, coarse, fine
    return other, fine, coarse


class _ReshapeLike(OpRule):
    def couple(self, node, tensor, axis, ctx):
        x, y = node.inputs[0], node.outputs[0]
        if tensor.name not in (x.name, y.name):
            return blocked(f"{node.op} '{node.name}' reads its shape from a channel tensor")
        from_input = tensor.name == x.name
        result = reshape_link(ctx.shape(x), ctx.shape(y), axis, from_input)
        if isinstance(result, str):
            return blocked(f"{node.op} '{node.name}': {result}")
        other_axis, here, there = result
        return Coupling(PASSIVE, [Link(((y if from_input else x).name, other_axis), here, there)])


register("Flatten", "Squeeze", "Unsqueeze")(type("ShapeOnlyReshapeRule", (_ReshapeLike,), {}))


def _sole_user(tensor, op: str):
    users = tensor.outputs
    return users[0] if len(users) == 1 and users[0].op == op else None


def channel_shuffle(head, ctx):
    """(axis, groups, tail) when ``head`` starts a channel shuffle, else None.

    ShuffleNet's shuffle is Reshape [.., C, ..] -> [.., g, C/g, ..], Transpose swapping those
    two axes, Reshape back to [.., C, ..]: channel i*(C/g)+j moves to j*g+i.
    """
    x, y = head.inputs[0], head.outputs[0]
    in_shape, mid_shape = ctx.shape(x), ctx.shape(y)
    if head.op != "Reshape" or not in_shape or not mid_shape or len(mid_shape) != len(in_shape) + 1:
        return None
    axis = next((a for a in range(len(in_shape)) if in_shape[a] != mid_shape[a]), None)
    if axis is None or mid_shape[axis] * mid_shape[axis + 1] != in_shape[axis]:
        return None
    transpose = _sole_user(y, "Transpose")
    perm = list(range(len(mid_shape)))
    perm[axis], perm[axis + 1] = axis + 1, axis
    if transpose is None or list(transpose.attrs.get("perm", [])) != perm:
        return None
    tail = _sole_user(transpose.outputs[0], "Reshape")
    if tail is None or ctx.shape(tail.outputs[0]) != in_shape:
        return None
    return axis, mid_shape[axis], tail


def _shuffle_head(tail, ctx):
    transpose = tail.inputs[0].inputs[0] if tail.inputs[0].inputs else None
    head = transpose.inputs[0].inputs[0] if transpose is not None and transpose.inputs[0].inputs else None
    if head is None or head.op != "Reshape":
        return None
    found = channel_shuffle(head, ctx)
    return (head, *found) if found is not None and found[2] is tail else None


def _shuffle_links(x_key, y_key, channels: int, groups: int, from_input: bool) -> list[Link]:
    """Channel j of every block is one unit: the shuffle stays a shuffle only if each block
    keeps the same j's. Input i*(C/g)+j <-> output j*g+i, and blocks tied to block 0."""
    per = channels // groups
    i, j = np.divmod(identity(channels), per)
    src, dst = i * per + j, j * groups + i
    here_key = x_key if from_input else y_key
    cross = Link(y_key if from_input else x_key, src if from_input else dst, dst if from_input else src)
    tie_src = src if from_input else dst
    tie_dst = j if from_input else j * groups
    return [cross, Link(here_key, tie_src, tie_dst)]


@register("Reshape")
class ReshapeRule(_ReshapeLike):
    def couple(self, node, tensor, axis, ctx):
        if ctx.const(node.inputs[1]) is None:
            return blocked(f"Reshape '{node.name}' has a shape computed at run time")
        shuffle = channel_shuffle(node, ctx) if tensor.name == node.inputs[0].name else None
        if shuffle is not None and shuffle[0] == axis:
            _, groups, tail = shuffle
            links = _shuffle_links((tensor.name, axis), (tail.outputs[0].name, axis),
                                   ctx.shape(tensor)[axis], groups, True)
            return Coupling(PASSIVE, links)
        found = _shuffle_head(node, ctx) if tensor.name == node.outputs[0].name else None
        if found is not None and found[1] == axis:
            head, _, groups, _ = found
            links = _shuffle_links((head.inputs[0].name, axis), (tensor.name, axis),
                                   ctx.shape(tensor)[axis], groups, False)
            return Coupling(PASSIVE, links)
        return super().couple(node, tensor, axis, ctx)

    def rewrite(self, node, removed, ctx):
        shape = np.array(node.inputs[1].values, copy=True)
        y = node.outputs[0]
        for axis, dim in enumerate(ctx.shape(y)):
            gone = removed.get((y.name, axis))
            if gone is not None and shape[axis] != -1:
                shape[axis] = dim - len(gone)
        shuffle = channel_shuffle(node, ctx)
        if shuffle is not None and (node.inputs[0].name, shuffle[0]) in removed:
            axis, groups, _ = shuffle
            kept = ctx.shape(node.inputs[0])[axis] - len(removed[(node.inputs[0].name, axis)])
            if shape[axis + 1] != -1:
                shape[axis + 1] = kept // groups
        node.inputs[1].values = shape


@register("Shape")
class ShapeRule(OpRule):
    """Reading dimensions is harmless unless someone reads the pruned one."""

    def couple(self, node, tensor, axis, ctx):
        start = int(node.attrs.get("start", 0))
        for user in node.outputs[0].outputs:
            index = ctx.const(user.inputs[1]) if user.op == "Gather" and len(user.inputs) > 1 else None
            if index is None or index.size != 1:
                return blocked(f"Shape '{node.name}' lets the channel count be read at run time")
            if int(index.ravel()[0]) % len(ctx.shape(tensor)) + start == axis:
                return blocked(f"Shape '{node.name}' reads the channel count at run time")
        return Coupling(PASSIVE)
