"""Reshape: splitting a channel axis into heads (or Q/K/V), merging it back, channel shuffles,
and targets that exporters compute at run time."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import PASSIVE, BlockKind, Coupling, Link, OpRule, RuleContext, blocked, identity, register
from onnxprune.rules.layout import attribute_axis, slice_params, split_link
from onnxprune.rules.recurrent import direction_axes
from onnxprune.rules.shape_expr import Element, input_elements, scale_input


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


def _selects(user: gs.Node, axis: int, rank: int, ctx: RuleContext) -> bool:
    """Whether ``user`` (a Gather, Split or Slice of the tensor) picks pieces along ``axis``."""
    if user.op == "Gather":
        return ctx.const(user.inputs[1]) is not None and attribute_axis(user, rank) == axis
    if user.op == "Split":
        return attribute_axis(user, rank) == axis
    params = slice_params(user, ctx)
    return params is not None and axis in [a % rank for a in params.axes]


def _selected_along(tensor: gs.Tensor, axis: int, ctx: RuleContext, depth: int = 0) -> bool:
    """Whether some user picks slices of ``tensor`` along ``axis`` (Gather, Split, Slice),
    looking through Transpose/Unsqueeze/Squeeze: the 3 of a fused QKV output reshaped to
    [.., 3, E] (or [.., 3, H, D]) is such an axis, and must not carry the channels."""
    if depth > 8:
        return False
    rank = len(ctx.shape(tensor))
    for user in tensor.outputs:
        if not user.inputs or user.inputs[0].name != tensor.name:
            continue
        nxt = None
        if user.op in ("Gather", "Split", "Slice"):
            if _selects(user, axis, rank, ctx):
                return True
        elif user.op == "Transpose":
            nxt = list(user.attrs.get("perm", reversed(range(rank)))).index(axis)
        elif user.op in ("Unsqueeze", "Squeeze"):
            given = ctx.const(user.inputs[1]) if len(user.inputs) > 1 else user.attrs.get("axes")
            if given is None:
                continue
            out_rank = len(ctx.shape(user.outputs[0]))
            axes = {int(a) % (out_rank if user.op == "Unsqueeze" else rank) for a in np.ravel(given)}
            if user.op == "Unsqueeze":
                nxt = [i for i in range(out_rank) if i not in axes][axis]
            elif axis not in axes:
                nxt = axis - sum(a < axis for a in axes)
        elif user.op == "Identity":
            nxt = axis
        if nxt is not None and _selected_along(user.outputs[0], nxt, ctx, depth + 1):
            return True
    return False


#: Ops between a head split (or merge) and the attention MatMuls in real exports.
_HEAD_PLUMBING = {"Transpose", "Reshape", "Mul", "Div", "Identity", "Unsqueeze", "Squeeze"}


def _next_to_attention(node: gs.Node, ctx: RuleContext) -> bool:
    """Whether this Reshape splits heads for (or merges heads from) a MatMul of two
    activations, a few layout ops away: only those choose the head size as their channel
    factor under ``prune_head_dim`` (a Flatten into a classifier must keep its channels)."""
    def batched(n: gs.Node) -> bool:
        return n.op == "MatMul" and all(not isinstance(t, gs.Constant) for t in n.inputs[:2])

    frontier, seen = [(node, 0)], set()
    while frontier:
        current, depth = frontier.pop()
        if id(current) in seen or depth > 6:
            continue
        seen.add(id(current))
        near = [u for u in current.outputs[0].outputs] + [p for p in current.inputs[0].inputs]
        for other in near:
            if batched(other):
                return True
            if other.op in _HEAD_PLUMBING and other.outputs:
                frontier.append((other, depth + 1))
    return False


def _channels_last_flatten(node: gs.Node, ctx: RuleContext) -> bool:
    """Whether this Reshape flattens a channels-last tensor whose channel axis is the last of
    the merged ones: ``Transpose(perm=[0, 2, 3, 1])`` then ``Reshape [N, H*W*C]``, as tf2onnx
    writes a Keras Flatten before a Dense. The channels then follow the last factor (feature
    ``(h*W + w)*C + c`` belongs to channel c), the merged spatial axes are blocks inside it."""
    x, y = node.inputs[0], node.outputs[0]
    producer = x.inputs[0] if x.inputs else None
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if producer is None or producer.op != "Transpose" or not in_shape or not out_shape:
        return False
    perm = list(producer.attrs.get("perm", []))
    rank = len(in_shape)
    if len(perm) != rank or rank < 3 or perm[0] != 0 or perm[-1] != 1:
        return False
    # The output keeps the leading axes and merges the trailing ones, channels last among them.
    kept = len(out_shape) - 1
    return (0 < kept < rank - 1 and list(out_shape[:kept]) == list(in_shape[:kept])
            and all(p >= 2 for p in perm[kept:-1]))


def _element_problem(node: gs.Node, elements: list[Element], axis: int, ctx: RuleContext) -> str | None:
    """Why element ``axis`` of a computed target cannot follow a pruning of that output axis."""
    if len(elements) != len(ctx.shape(node.outputs[0])):
        return "its computed target shape has an unexpected length"
    e = elements[axis]
    if e.literal_minus_one or (not e.dynamic and e.value == 0 and not node.attrs.get("allowzero", 0)):
        return None  # onnxruntime infers it
    if not e.dynamic or e.static == ctx.shape(node.outputs[0])[axis]:
        return None
    return "its target multiplies this axis by a dimension known only at run time"


@register("Reshape")
class ReshapeRule(OpRule):
    def couple(self, node, tensor, axis, ctx):
        x, target, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if tensor.name not in (x.name, y.name):
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"Reshape '{node.name}' reads its shape from a channel tensor")
        elements = None
        if ctx.const(target) is None:
            elements = input_elements(node, 1, ctx)
            if elements is None:
                return blocked(BlockKind.RUNTIME_SHAPE, node,
                               f"Reshape '{node.name}' has a shape computed at run time by ops onnxprune cannot read")
        else:
            shuffle = self._shuffle(node, tensor, axis, ctx)
            if shuffle is not None:
                return shuffle
        from_input = tensor.name == x.name
        stacked = frozenset(a for a, d in enumerate(ctx.shape(y)) if d > 1 and _selected_along(y, a, ctx))
        last = (bool(ctx.options.get("prune_head_dim")) and _next_to_attention(node, ctx)) \
            or _channels_last_flatten(node, ctx)
        directions = direction_axes(x, ctx)  # a bidirectional RNN's dirs merged with its hidden units
        if from_input:
            result = split_link(ctx.shape(x), ctx.shape(y), axis, stacked_src=directions, stacked_dst=stacked, last=last)
        else:
            result = split_link(ctx.shape(y), ctx.shape(x), axis, stacked_src=stacked, stacked_dst=directions, last=last)
        if isinstance(result, str):
            return blocked(BlockKind.AXIS_LAYOUT, node, f"Reshape '{node.name}': {result}")
        other_axis, here, there = result
        if elements is not None:
            problem = _element_problem(node, elements, other_axis if from_input else axis, ctx)
            if problem is not None:
                return blocked(BlockKind.RUNTIME_SHAPE, node, f"Reshape '{node.name}': {problem}")
        return Coupling(PASSIVE, [Link(((y if from_input else x).name, other_axis), here, there)])

    @staticmethod
    def _shuffle(node, tensor, axis, ctx) -> Coupling | None:
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
        return None

    def rewrite(self, node, removed, ctx):
        y = node.outputs[0]
        if not isinstance(node.inputs[1], gs.Constant):
            self._rewrite_computed(node, removed, ctx)
            return
        shape = np.array(node.inputs[1].values, copy=True)
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

    @staticmethod
    def _rewrite_computed(node, removed, ctx) -> None:
        """Scale the static factor of every pruned element; batch and sequence stay dynamic."""
        y, elements = node.outputs[0], input_elements(node, 1, ctx)
        scale = {}
        for axis, dim in enumerate(ctx.shape(y)):
            gone = removed.get((y.name, axis))
            if gone is None or not len(gone) or _element_problem(node, elements, axis, ctx) is not None:
                continue
            e = elements[axis]
            if e.literal_minus_one or (not e.dynamic and e.value == 0):
                continue
            scale[axis] = (e.static, e.static * (dim - len(gone)) // dim)
        if scale:
            scale_input(node, 1, len(elements), scale, ctx)
