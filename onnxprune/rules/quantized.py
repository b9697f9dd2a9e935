"""Dynamically quantized models, as ``onnxruntime.quantization.quantize_dynamic`` writes them
(QOperator form): ``DynamicQuantizeLinear`` turns a float activation into uint8 with one scale
and zero point per tensor, ``ConvInteger`` and ``MatMulInteger`` multiply it by int8/uint8
weights into int32, and float arithmetic (Cast, Mul by the scales, Add of the bias) brings it
back. Channels prune through all of it and the model stays quantized: the integer weights
are sliced like float ones (their zero points with them when per channel), and their
magnitude is read after subtracting the zero point.

The integer ops take part as passive members: reconstruction, which would write float
corrections into integer weights, leaves them alone. Removing channels can change a
``DynamicQuantizeLinear``'s range (its scale is computed over the whole tensor at run time),
so a removed channel that held the extreme value moves the grid the others are rounded to:
pruning is exact only up to that rounding, unless the removed channels are zero.
"""

from __future__ import annotations

import numpy as np

from onnxprune.coupling import CONSUMER, PASSIVE, BlockKind, Coupling, OpRule, ParamSlice, blocked, register, same
from onnxprune.rules.linear import ConvRule, MatMulRule


def _present(node, slot: int) -> bool:
    return len(node.inputs) > slot and bool(node.inputs[slot].name)


@register("DynamicQuantizeLinear")
class DynamicQuantizeLinearRule(OpRule):
    """``y = saturate(round(x / scale) + zero_point)`` elementwise, scale and zero point scalars
    computed from the whole tensor: x and y are tied index for index."""

    def couple(self, node, tensor, axis, ctx):
        x, y = node.inputs[0], node.outputs[0]
        if tensor.name == x.name:
            return Coupling(PASSIVE, [same((y.name, axis), ctx.shape(x)[axis])])
        if tensor.name == y.name:
            return Coupling(PASSIVE, [same((x.name, axis), ctx.shape(y)[axis])])
        return blocked(BlockKind.CHANNEL_AS_PARAMETER, node,
                       f"DynamicQuantizeLinear '{node.name}' computes a per-tensor scale, not channels")


def _quantized(coupling: Coupling, node, weight_slot: int, zero_slot: int, per_channel_axis: int,
               ctx) -> Coupling:
    """A float rule's coupling made right for the integer op: the weight's magnitude is read
    from ``q - zero_point``, a per-channel zero point (along the weight's ``per_channel_axis``)
    is sliced with it, and the op is a passive member (no float corrections into its weights)."""
    if coupling.reason is not None:
        return coupling
    weight = node.inputs[weight_slot]
    zero = ctx.const(node.inputs[zero_slot]) if _present(node, zero_slot) else np.zeros((), np.int64)
    if zero is None:
        return blocked(BlockKind.RUNTIME_PARAMETER, node, f"{node.op} '{node.name}' has a weight zero point "
                       "computed at run time")
    rank = np.asarray(weight.values).ndim
    shape = [1] * rank
    if zero.size > 1:
        shape[per_channel_axis] = zero.size
    offset = zero.reshape(shape) if zero.size > 1 else zero.reshape(())
    params = []
    for p in coupling.params:
        if p.tensor is weight:
            params.append(ParamSlice(p.tensor, p.axis, p.space, p.param, p.kind, p.groups, offset))
            if zero.size > 1 and p.axis == per_channel_axis:
                params.append(ParamSlice(node.inputs[zero_slot], 0, p.space, p.param, "stat"))
        else:
            params.append(p)
    role = PASSIVE if coupling.role == CONSUMER else coupling.role
    return Coupling(role, coupling.links, params, coupling.balanced)


def _activation_operands(node, tensor, op: str):
    if tensor.name not in (node.inputs[0].name, node.outputs[0].name):
        return blocked(BlockKind.CHANNEL_AS_PARAMETER, node,
                       f"{op} '{node.name}' takes a zero point from a channel tensor")
    return None


@register("ConvInteger")
class ConvIntegerRule(ConvRule):
    """``ConvInteger(x, w, x_zero_point, w_zero_point)``: a Conv without a bias (the bias is
    added after it, in int32 or in float); the weight and a per-output-channel zero point are
    sliced along the output channels, the weight alone along the input channels."""

    @staticmethod
    def _bias(node):
        return None

    def couple(self, node, tensor, axis, ctx):
        refused = _activation_operands(node, tensor, "ConvInteger")
        if refused is not None:
            return refused
        return _quantized(super().couple(node, tensor, axis, ctx), node, 1, 3, 0, ctx)


@register("MatMulInteger")
class MatMulIntegerRule(MatMulRule):
    """``MatMulInteger(a, b, a_zero_point, b_zero_point)`` with a constant 2-D ``b``: as MatMul;
    a per-column zero point of ``b`` is sliced with the output's last axis."""

    def couple(self, node, tensor, axis, ctx):
        refused = _activation_operands(node, tensor, "MatMulInteger")
        if refused is not None:
            return refused
        if ctx.const(node.inputs[1]) is None:
            return blocked(BlockKind.UNSUPPORTED_FORM, node,
                           f"MatMulInteger '{node.name}' multiplies two activations")
        return _quantized(super().couple(node, tensor, axis, ctx), node, 1, 3, 1, ctx)


@register("com.microsoft::DynamicQuantizeLSTM", "com.microsoft::DynamicQuantizeMatMul",
          "com.microsoft::MatMulIntegerToFloat", "QLinearConv", "QLinearMatMul")
class QuantizedNotPrunedRule(OpRule):
    """Quantized ops whose weights onnxprune does not slice yet: blocked, and said so."""

    refuses_its_weights = True

    def couple(self, node, tensor, axis, ctx):
        return blocked(BlockKind.UNSUPPORTED_OP, node,
                       f"quantized {node.op} '{node.name}' is not pruned through (its integer weights and "
                       "scales are not sliced yet); the model stays quantized")
