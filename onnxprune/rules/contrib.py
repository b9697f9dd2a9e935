"""ONNX Runtime's fused ops (com.microsoft), as its transformer optimizer leaves them.

Attention and MultiHeadAttention are in :mod:`onnxprune.rules.attention`. Here: fused
activations with a bias (prunable like any activation, the bias sliced), the fused layer norms
and the embedding layer norm (members of the hidden width, which only ``prune_hidden`` lets
go), and the fused ops onnxprune does not prune through, blocked with their reason.
"""

from __future__ import annotations

from onnxprune.coupling import PASSIVE, PRODUCER, BlockKind, Coupling, OpRule, blocked, register, same, slice_all

MS = "com.microsoft::"


def _present(node, slot: int) -> bool:
    return len(node.inputs) > slot and bool(node.inputs[slot].name)


@register(*(MS + op for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd")))
class FusedActivationRule(OpRule):
    """``act(x + bias)`` elementwise (BiasAdd: ``x + bias + skip``): x, skip and the output are
    tied; the bias, over the last axis, is sliced with them."""

    def couple(self, node, tensor, axis, ctx):
        x, y = node.inputs[0], node.outputs[0]
        bias = node.inputs[1] if _present(node, 1) else None
        skip = node.inputs[2] if node.op == "BiasAdd" and _present(node, 2) else None
        data = [t for t in (x, skip, y) if t is not None]
        if tensor.name not in {t.name for t in data}:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node, f"{node.op} '{node.name}' takes its bias from a channel tensor")
        size = ctx.shape(tensor)[axis]
        links = [same((t.name, axis), size) for t in data if t.name != tensor.name]
        params = []
        if bias is not None and axis == len(ctx.shape(y)) - 1:
            if ctx.const(bias) is None:
                return blocked(BlockKind.RUNTIME_PARAMETER, node, f"{node.op} '{node.name}' adds a bias computed at run time")
            params.append(slice_all(bias, 0, size, "shift"))
        return Coupling(PASSIVE, links, params)


def _hidden_off(node) -> Coupling:
    return blocked(BlockKind.OPT_IN, node,
                   f"{node.op} '{node.name}' normalises over this axis (the prune_hidden option prunes it, "
                   "approximately)")


@register(MS + "SkipLayerNormalization", MS + "SkipSimplifiedLayerNormalization")
class SkipLayerNormRule(OpRule):
    """``LayerNorm(input + skip + bias) * gamma + beta`` over the last axis; output 3, when used,
    is the sum before normalisation. Leading axes pass through; the last one is the hidden
    width: with ``prune_hidden`` gamma, beta and bias are sliced with it."""

    def couple(self, node, tensor, axis, ctx):
        data = [node.inputs[0], node.inputs[1], node.outputs[0]]
        if len(node.outputs) > 3 and node.outputs[3].outputs:
            data.append(node.outputs[3])
        if any(out.outputs for out in node.outputs[1:3]):
            return blocked(BlockKind.EXTRA_OUTPUT, node, f"{node.op} '{node.name}' statistics outputs are used")
        if tensor.name not in {t.name for t in data}:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node,
                           f"{node.op} '{node.name}' takes its parameters from a channel tensor")
        size = ctx.shape(tensor)[axis]
        links = [same((t.name, axis), size) for t in data if t.name != tensor.name]
        if axis != len(ctx.shape(node.outputs[0])) - 1:
            return Coupling(PASSIVE, links)
        if not ctx.options.get("prune_hidden"):
            return _hidden_off(node)
        simplified = "Simplified" in node.op
        slots = {2: "weight", 3: "shift", 4: "shift"} if not simplified else {2: "weight", 3: "shift"}
        params = []
        for slot, kind in slots.items():
            if not _present(node, slot):
                continue
            if ctx.const(node.inputs[slot]) is None:
                return blocked(BlockKind.RUNTIME_PARAMETER, node, f"{node.op} '{node.name}' has parameters computed at run time")
            params.append(slice_all(node.inputs[slot], 0, size, kind))
        return Coupling(PASSIVE, links, params)


@register(MS + "EmbedLayerNormalization")
class EmbedLayerNormRule(OpRule):
    """Word + position (+ segment) embedding lookups, summed and layer-normalised: with
    ``prune_hidden`` it produces the hidden width (every table's columns, gamma and beta)."""

    def couple(self, node, tensor, axis, ctx):
        y = node.outputs[0]
        outputs = [y] + ([node.outputs[2]] if len(node.outputs) > 2 and node.outputs[2].outputs else [])
        if tensor.name not in {t.name for t in outputs}:
            return blocked(BlockKind.CHANNEL_AS_PARAMETER, node,
                           f"EmbedLayerNormalization '{node.name}' reads token ids, not channels")
        size = ctx.shape(tensor)[axis]
        links = [same((t.name, axis), size) for t in outputs if t.name != tensor.name]
        if axis != len(ctx.shape(y)) - 1:
            return blocked(BlockKind.AXIS_LAYOUT, node,
                           f"EmbedLayerNormalization '{node.name}' builds this axis from its token ids")
        if not ctx.options.get("prune_hidden"):
            return _hidden_off(node)
        params = []
        for slot, kind in ((2, "weight"), (3, "weight"), (4, "weight"), (5, "weight"), (6, "shift")):
            if not _present(node, slot):
                continue
            if ctx.const(node.inputs[slot]) is None:
                return blocked(BlockKind.RUNTIME_PARAMETER, node,
                               f"EmbedLayerNormalization '{node.name}' has tables computed at run time")
            params.append(slice_all(node.inputs[slot], ctx.const(node.inputs[slot]).ndim - 1, size, kind))
        return Coupling(PRODUCER, links, params)


_NOT_PRUNED = {
    "GroupQueryAttention": "shares each key/value head between several query heads",
    "PackedAttention": "packs the batch's tokens and heads into one tensor",
    "PackedMultiHeadAttention": "packs the batch's tokens and heads into one tensor",
    "DecoderMaskedMultiHeadAttention": "keeps a key/value cache laid out by head",
    "DecoderMaskedSelfAttention": "keeps a key/value cache laid out by head",
    "SparseAttention": "reads a block-sparse layout laid out by head",
    "LongformerAttention": "mixes global and windowed heads in one weight",
    "QAttention": "is quantised (its scales are per tensor, not per head)",
    "QOrderedAttention": "is quantised (its scales are per tensor, not per head)",
    "RotaryEmbedding": "rotates pairs of channels inside each head",
    "GemmaRotaryEmbedding": "rotates pairs of channels inside each head",
    "RelativePositionBias": "builds a bias laid out by head",
    "GatedRelativePositionBias": "builds a bias laid out by head",
    "BiasSplitGelu": "splits its channels in halves that gate each other",
    "MatMulNBits": "stores its weight quantised in blocks",
    "MatMulInteger16": "is quantised",
    "QuantizeLinear": "is quantised",
    "DequantizeLinear": "is quantised",
}


class _Unsupported(OpRule):
    reason = ""
    refuses_its_weights = True

    def couple(self, node, tensor, axis, ctx):
        return blocked(BlockKind.UNSUPPORTED_OP, node,
                       f"com.microsoft {node.op} '{node.name}' {self.reason}: onnxprune does not prune through it")


for _op, _why in _NOT_PRUNED.items():
    register(MS + _op)(type(f"{_op}Blocked", (_Unsupported,), {"reason": _why}))
