"""Attention: MatMul of two activations (Q K^T, attention @ V), and ONNX Runtime's fused
com.microsoft Attention and MultiHeadAttention.

Heads are found, not declared: the Reshape that splits a projection's output into [.., H, D]
maps each channel to its head, the batched MatMuls tie head h of Q, K and V (a batch axis of
both operands and of the output), and the Reshape that merges heads back maps head h to the D
input rows of the output projection. Every channel of head h thus lands in one unit; the group
of a layer's heads is what a ratio prunes. The contracted axis (D of Q and K) is not followed.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import (
    CONSUMER,
    PASSIVE,
    PRODUCER,
    BlockKind,
    Coupling,
    Link,
    OpRule,
    ParamSlice,
    RuleContext,
    blocked,
    identity,
    register,
    same,
    slice_all,
)


def batched_matmul(node: gs.Node, tensor: gs.Tensor, axis: int, ctx: RuleContext) -> Coupling:
    """``Y = A @ B`` with two activations: numpy matmul semantics.

    Leading (batch) axes of A, B and Y are aligned from the right and tied where they are not
    broadcast; A's rows are Y's rows, B's columns are Y's columns; A's last axis is contracted
    with B's second-to-last and is not followed (removing from it is not zero-contribution).
    """
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if a.name == b.name:
        return blocked(BlockKind.UNSUPPORTED_FORM, node, f"MatMul '{node.name}' multiplies an activation by itself")
    ra, rb, ry = len(ctx.shape(a)), len(ctx.shape(b)), len(ctx.shape(y))
    if min(ra, rb) < 2:
        return blocked(BlockKind.UNSUPPORTED_FORM, node, f"MatMul '{node.name}' has a vector operand")

    def source(rank: int, side: str, out_axis: int) -> int | None:
        """The axis of an operand (side "a" or "b") that output axis ``out_axis`` comes from."""
        if out_axis == ry - 1:
            return rank - 1 if side == "b" else None
        if out_axis == ry - 2:
            return rank - 2 if side == "a" else None
        k = out_axis - (ry - rank)
        return k if k >= 0 else None

    if tensor.name == y.name:
        out_axis = axis
    else:
        side, rank = ("a", ra) if tensor.name == a.name else ("b", rb)
        out_axis = next((o for o in range(ry) if source(rank, side, o) == axis), None)
        if out_axis is None:
            return _contracted(node, tensor, axis, ctx)
    size = ctx.shape(tensor)[axis]
    if ctx.shape(y)[out_axis] != size:
        return blocked(BlockKind.BROADCAST, node, f"MatMul '{node.name}' broadcasts this axis")
    links = [] if tensor.name == y.name else [same((y.name, out_axis), size)]
    for operand, side, rank in ((a, "a", ra), (b, "b", rb)):
        k = source(rank, side, out_axis)
        if k is None or operand.name == tensor.name:
            continue
        if ctx.shape(operand)[k] == size:
            links.append(same((operand.name, k), size))
        elif ctx.shape(operand)[k] != 1:
            return blocked(BlockKind.BROADCAST, node, f"MatMul '{node.name}' broadcasts this axis")
    return Coupling(PASSIVE, links)


def _contracted(node: gs.Node, tensor: gs.Tensor, axis: int, ctx: RuleContext) -> Coupling:
    """A's last axis against B's second-to-last. Removing index d from both drops the term
    a_d * b_d of every dot product: a zero-contribution removal when Q's (or K's) d-th channel
    is zero. Followed only for head-size pruning (``prune_head_dim``), where it ties the head
    size of Q to that of K."""
    if not ctx.options.get("prune_head_dim"):
        return blocked(BlockKind.OPT_IN, node, f"MatMul '{node.name}' contracts this axis of two activations")
    a, b = node.inputs[0], node.inputs[1]
    other, other_axis = (b, len(ctx.shape(b)) - 2) if tensor.name == a.name else (a, len(ctx.shape(a)) - 1)
    size = ctx.shape(tensor)[axis]
    if ctx.shape(other)[other_axis] != size:
        return blocked(BlockKind.UNSUPPORTED_FORM, node, f"MatMul '{node.name}' contracts axes of different sizes")
    return Coupling(PASSIVE, [same((other.name, other_axis), size)])


def _heads(node: gs.Node) -> int:
    return int(node.attrs["num_heads"])


def _head_tie(key, size: int, head_size: int) -> Link:
    """Every channel of a head tied to the head's first channel: a head is one unit."""
    return Link(key, identity(size), (identity(size) // head_size) * head_size)


def _present(node: gs.Node, slot: int) -> bool:
    return len(node.inputs) > slot and bool(node.inputs[slot].name)


@register("com.microsoft::Attention")
class OrtAttentionRule(OpRule):
    """ONNX Runtime's fused self-attention: ``input @ W + bias`` split into Q, K, V (sizes
    ``qkv_hidden_sizes`` or three equal), ``num_heads`` heads, output [N, S, V width]. A head
    is removed with its columns of W and bias in Q, K and V; ``num_heads`` follows."""

    def seeds(self, node, ctx):
        return [(node.outputs[0].name, 2)]

    def _sizes(self, node, ctx) -> tuple[int, int, int]:
        """Q, K, V widths as analysed (by rewrite time the weight is already sliced)."""
        sizes = node.attrs.get("qkv_hidden_sizes")
        if sizes:
            return tuple(int(s) for s in sizes)
        width = ctx.shape(node.outputs[0])[2]
        return width, width, width

    def couple(self, node, tensor, axis, ctx):
        weight = ctx.const(node.inputs[1])
        if weight is None or (_present(node, 2) and ctx.const(node.inputs[2]) is None):
            return blocked(BlockKind.RUNTIME_PARAMETER, node, f"Attention '{node.name}' has weights computed at run time")
        if any(out.outputs for out in node.outputs[1:]) or _present(node, 4) or _present(node, 6):
            return blocked(BlockKind.UNSUPPORTED_FORM, node, f"Attention '{node.name}' uses a key/value cache (past/present)")
        x, y = node.inputs[0], node.outputs[0]
        if tensor.name == x.name and axis == 2:
            return Coupling(CONSUMER, params=[slice_all(node.inputs[1], 0, weight.shape[0], "weight")])
        if tensor.name == x.name or (tensor.name == y.name and axis != 2):
            other = (y.name, axis) if tensor.name == x.name else (x.name, axis)
            return Coupling(PASSIVE, [same(other, ctx.shape(tensor)[axis])])
        if tensor.name != y.name:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node,
                           f"Attention '{node.name}' reads a mask or bias that onnxprune does not slice")
        if _present(node, 5):
            return blocked(BlockKind.UNSUPPORTED_FORM, node, f"Attention '{node.name}' adds a per-head attention bias")
        heads = _heads(node)
        q, k, v = self._sizes(node, ctx)
        if q % heads or k % heads or v % heads or q != k:
            return blocked(BlockKind.UNSUPPORTED_FORM, node,
                           f"Attention '{node.name}' has Q, K, V widths that do not split into {heads} heads")
        dq, dv = q // heads, v // heads
        head_of_v = identity(v) // dv
        # Every column of W (and bias) is owned by the first output channel of its head.
        space = np.concatenate([(identity(q) // dq) * dv, (identity(k) // dq) * dv, head_of_v * dv])
        param = identity(q + k + v)
        params = [ParamSlice(node.inputs[1], 1, space, param, "weight")]
        if _present(node, 2):
            params.append(ParamSlice(node.inputs[2], 0, space, param, "shift"))
        return Coupling(PRODUCER, [_head_tie((y.name, 2), v, dv)], params)

    def rewrite(self, node, removed, ctx):
        gone = removed.get((node.outputs[0].name, 2))
        if gone is None or not len(gone):
            return
        heads = _heads(node)
        q, k, v = self._sizes(node, ctx)
        lost = len(gone) // (v // heads)
        node.attrs["num_heads"] = heads - lost
        if node.attrs.get("qkv_hidden_sizes"):
            node.attrs["qkv_hidden_sizes"] = [s - lost * (s // heads) for s in (q, k, v)]


@register("com.microsoft::MultiHeadAttention")
class OrtMultiHeadAttentionRule(OpRule):
    """ONNX Runtime's attention on projected Q, K, V [N, S, H*D] (unpacked form): head h of the
    output is head h of Q, K and V; the value's channels are the output's channel for channel."""

    def couple(self, node, tensor, axis, ctx):
        names = [t.name for t in node.inputs[:3]]
        y = node.outputs[0]
        if any(out.outputs for out in node.outputs[1:]) or any(_present(node, s) for s in (5, 6, 7)):
            return blocked(BlockKind.UNSUPPORTED_FORM, node,
                           f"MultiHeadAttention '{node.name}' uses an attention bias or a key/value cache")
        if not all(names) or any(len(ctx.shape(node.inputs[s])) != 3 for s in range(3)):
            return blocked(BlockKind.UNSUPPORTED_FORM, node, f"MultiHeadAttention '{node.name}' takes packed or pre-split heads")
        if tensor.name not in names + [y.name]:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node,
                           f"MultiHeadAttention '{node.name}' reads a mask that onnxprune does not slice")
        if axis != 2:  # batch and sequence: the query's are the output's
            size = ctx.shape(tensor)[axis]
            return Coupling(PASSIVE, [same((n, axis), size) for n in (names[0], y.name)
                                      if n != tensor.name and tensor.name in (names[0], y.name)])
        heads = _heads(node)
        q, v = ctx.shape(node.inputs[0])[2], ctx.shape(node.inputs[2])[2]
        if q % heads or v % heads or ctx.shape(node.inputs[1])[2] != q:
            return blocked(BlockKind.UNSUPPORTED_FORM, node,
                           f"MultiHeadAttention '{node.name}' has widths that do not split into {heads} heads")
        dq, dv = q // heads, v // heads
        out_key = (y.name, 2)
        # Everything is expressed on the output's channels: one unit per head.
        links = [_head_tie(out_key, v, dv), Link((names[2], 2), identity(v), identity(v))]
        for name in names[:2]:
            links.append(Link((name, 2), (identity(q) // dq) * dv, identity(q)))
        if _present(node, 3) and ctx.const(node.inputs[3]) is None:
            return blocked(BlockKind.RUNTIME_PARAMETER, node,
                           f"MultiHeadAttention '{node.name}' adds a bias computed at run time")
        if tensor.name != y.name:  # asked from an input: its tie to the output's heads
            here_is_v = tensor.name == names[2]
            there = identity(v) if here_is_v else (identity(q) // dq) * dv
            return Coupling(PASSIVE, [Link(out_key, identity(len(there)), there)])
        params = []
        if _present(node, 3):  # declared on the output's channels, like the ties
            space = np.concatenate([(identity(q) // dq) * dv, (identity(q) // dq) * dv, identity(v)])
            params.append(ParamSlice(node.inputs[3], 0, space, identity(2 * q + v), "shift"))
        return Coupling(PASSIVE, links, params)

    def rewrite(self, node, removed, ctx):
        gone = removed.get((node.outputs[0].name, 2))
        if gone is not None and len(gone):
            v = ctx.shape(node.inputs[2])[2]
            node.attrs["num_heads"] = _heads(node) - len(gone) // (v // _heads(node))
