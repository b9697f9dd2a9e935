"""Normalisations written out op by op, as tf2onnx and jax2tf export Keras and Flax LayerNorms:
``mean = ReduceSum(x) * (1/n)`` (or ReduceMean), ``var = ReduceSum(x*x) * (1/n) - mean^2``
(or ReduceMean of Pow(x - mean, 2)), then ``(x - mean) / sqrt(var + eps) * gamma + beta``.

The reductions compute statistics that are broadcast back over the very axis they reduce. Like
the LayerNormalization op (:mod:`onnxprune.rules.norms`), removing a channel there changes the
statistics every other channel is normalised with, so it is pruned only when asked
(``prune_hidden``): the reductions are then passive members, a ReduceMean averages the kept
channels by itself, and a ReduceSum followed by a multiplication by ``1/n`` (or a division by
``n``) has that factor rescaled to the kept count. The result is a LayerNorm over the kept
channels, as for the op: close, not exact.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import PASSIVE, BlockKind, Coupling, RuleContext, blocked

#: Ops a statistic flows through before it is combined with the tensor again.
_STAT_PATH = {"Mul", "Div", "Add", "Sub", "Pow", "Sqrt", "Reciprocal", "Reshape", "Expand", "Unsqueeze",
              "Squeeze", "Max", "Min", "Cast", "Identity", "Neg", "Clip"}
_MAX_HOPS = 10


def broadcast_back(node: gs.Node, shape: tuple[int, ...], ctx: RuleContext) -> bool:
    """Whether the reduction's output, through elementwise arithmetic and reshapes, is combined
    (Sub, Div, Mul: centred or scaled) into a tensor of the reduced input's ``shape`` again."""
    frontier, seen = [(node.outputs[0], 0)], set()
    while frontier:
        tensor, hops = frontier.pop()
        if tensor.name in seen or hops > _MAX_HOPS:
            continue
        seen.add(tensor.name)
        for user in tensor.outputs:
            if not user.outputs:
                continue
            out = user.outputs[0]
            if user.op in ("Sub", "Div", "Mul") and tuple(ctx.shape(out) or ()) == tuple(shape):
                return True
            if user.op in _STAT_PATH:
                frontier.append((out, hops + 1))
    return False


def _mean_factor(node: gs.Node, n: int, ctx: RuleContext) -> gs.Node | None:
    """The Mul by 1/n (or Div by n) that turns a ReduceSum into a mean, if it follows it."""
    users = node.outputs[0].outputs
    if len(users) != 1 or users[0].op not in ("Mul", "Div"):
        return None
    user = users[0]
    others = [t for t in user.inputs if t.name != node.outputs[0].name]
    value = ctx.const(others[0]) if len(others) == 1 else None
    if value is None or value.size != 1:
        return None
    c = float(np.ravel(value)[0])
    if user.op == "Div" and user.inputs[1].name != others[0].name:
        return None
    expected = float(n) if user.op == "Div" else 1.0 / n
    return user if np.isclose(c, expected, rtol=1e-4) else None


def statistic_coupling(node: gs.Node, tensor: gs.Tensor, axis: int, axes: list[int], ctx: RuleContext) -> Coupling | None:
    """How a ReduceMean / ReduceSum over ``axis`` takes part when it is a written-out
    normalisation's statistic; None when it is not one (the caller blocks as for any reduction)."""
    if node.op not in ("ReduceMean", "ReduceSum") or axes != [axis] or tensor.name != node.inputs[0].name:
        return None
    if not broadcast_back(node, ctx.shape(tensor), ctx):
        return None
    n = ctx.shape(tensor)[axis]
    if not ctx.options.get("prune_hidden"):
        return blocked(BlockKind.OPT_IN, node, f"{node.op} '{node.name}' computes a normalisation statistic over "
                       "this axis (a LayerNorm written out; the prune_hidden option prunes it, approximately)")
    if node.op == "ReduceSum":
        factor = _mean_factor(node, n, ctx)
        if factor is None:
            return blocked(BlockKind.CROSS_CHANNEL, node, f"ReduceSum '{node.name}' sums over this axis without "
                           "dividing by its size")
        ctx.memo.setdefault("mean_factors", {})[node.name] = factor.name
    return Coupling(PASSIVE)


def rescale_mean(node: gs.Node, removed: dict, ctx: RuleContext) -> None:
    """After pruning ``k`` of the ``n`` channels a ReduceSum averages, its 1/n becomes 1/(n-k)."""
    factor_name = ctx.memo.get("mean_factors", {}).get(node.name)
    x = node.inputs[0]
    gone = [g for (name, _), g in removed.items() if name == x.name and len(g)]
    if factor_name is None or not gone:
        return
    axis = next(a for (name, a), g in removed.items() if name == x.name and len(g))
    n = ctx.shape(x)[axis]
    kept = n - len(gone[0])
    user = next(u for u in node.outputs[0].outputs if u.name == factor_name)
    slot = next(i for i, t in enumerate(user.inputs) if t.name != node.outputs[0].name)
    value = np.asarray(user.inputs[slot].values)
    scaled = value * (n / kept) if user.op == "Mul" else value * (kept / n)
    user.inputs[slot] = gs.Constant(f"{user.name}_kept_mean", np.asarray(scaled, dtype=value.dtype))
