"""Normalisations: per-channel ones are passive members, cross-channel ones block."""

from __future__ import annotations

from onnxprune.coupling import PASSIVE, BlockKind, Coupling, OpRule, blocked, register, same, slice_all


def _other_side(node, tensor, axis):
    x, y = node.inputs[0].name, node.outputs[0].name
    return (y, axis) if tensor.name == x else (x, axis)


@register("BatchNormalization", "InstanceNormalization")
class ChannelNormRule(OpRule):
    """Affine and statistics per channel (axis 1): a channel's parameters go with it."""

    _KINDS = ("weight", "shift", "stat", "stat")

    def couple(self, node, tensor, axis, ctx):
        if tensor.name not in (node.inputs[0].name, node.outputs[0].name):
            return blocked(BlockKind.EXTRA_OUTPUT, node, f"{node.op} '{node.name}' training outputs are used")
        size = ctx.shape(tensor)[axis]
        link = same(_other_side(node, tensor, axis), size)
        if axis != 1:
            if node.op == "InstanceNormalization" and axis >= 2:
                return blocked(BlockKind.CROSS_CHANNEL, node,
                               f"InstanceNormalization '{node.name}' normalises over spatial axis {axis}")
            return Coupling(PASSIVE, [link])
        params = []
        for param, kind in zip(node.inputs[1:5], self._KINDS):
            if ctx.const(param) is None:
                return blocked(BlockKind.RUNTIME_PARAMETER, node, f"{node.op} '{node.name}' has parameters computed at run time")
            params.append(slice_all(param, 0, size, kind))
        return Coupling(PASSIVE, [link], params)


@register("LayerNormalization")
class LayerNormRule(OpRule):
    """Normalises over the axes from ``axis`` on: those are blocked, leading axes pass through.

    A transformer's hidden width is such an axis. Removing a channel there changes the mean and
    variance every other channel is normalised with, even when the channel is zero, so it is
    only pruned when asked (option ``prune_hidden``): then LayerNorm over that single last axis
    is a passive member slicing its scale and bias, and the result is close, not exact.
    """

    def couple(self, node, tensor, axis, ctx):
        rank = len(ctx.shape(node.inputs[0]))
        first = int(node.attrs.get("axis", -1)) % rank
        if tensor.name != node.inputs[0].name and tensor.name != node.outputs[0].name:
            return blocked(BlockKind.EXTRA_OUTPUT, node, f"LayerNormalization '{node.name}' statistics outputs are used")
        link = same(_other_side(node, tensor, axis), ctx.shape(tensor)[axis])
        if axis < first:
            return Coupling(PASSIVE, [link])
        if first != rank - 1:
            return blocked(BlockKind.CROSS_CHANNEL, node, f"LayerNormalization '{node.name}' normalises over this axis")
        if not ctx.options.get("prune_hidden"):
            return blocked(BlockKind.OPT_IN, node, f"LayerNormalization '{node.name}' normalises over this axis "
                                                   "(the prune_hidden option prunes it, approximately)")
        params = []
        for param, kind in zip(node.inputs[1:3], ("weight", "shift")):
            if not param.name:
                continue
            if ctx.const(param) is None or ctx.const(param).ndim != 1:
                return blocked(BlockKind.RUNTIME_PARAMETER, node,
                               f"LayerNormalization '{node.name}' has parameters computed at run time or broadcast")
            params.append(slice_all(param, 0, ctx.shape(tensor)[axis], kind))
        return Coupling(PASSIVE, [link], params)


@register("LRN", "GroupNormalization", "MeanVarianceNormalization", "LpNormalization")
class CrossChannelNormRule(OpRule):
    """Each output channel depends on its neighbours: removing one changes the others."""

    def couple(self, node, tensor, axis, ctx):
        if axis >= 2 or (axis == 0 and node.op != "LpNormalization"):
            return Coupling(PASSIVE, [same(_other_side(node, tensor, axis), ctx.shape(tensor)[axis])])
        return blocked(BlockKind.CROSS_CHANNEL, node,
                       f"{node.op} '{node.name}' mixes channels (removing one changes its neighbours)")
