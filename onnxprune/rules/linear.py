"""Ops that own weights over channels: Conv, ConvTranspose, Gemm, MatMul with a constant side."""

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
    SpaceKey,
    blocked,
    identity,
    register,
    slice_all,
)
from onnxprune.rules.attention import batched_matmul


def _is_depthwise(node: gs.Node, weight: np.ndarray) -> bool:
    group = int(node.attrs.get("group", 1))
    return group > 1 and weight.shape[1] == 1


@register("Conv")
class ConvRule(OpRule):
    def seeds(self, node, ctx):
        return [(node.inputs[0].name, 1), (node.outputs[0].name, 1)]

    def couple(self, node, tensor, axis, ctx):
        w = ctx.const(node.inputs[1])
        if w is None:
            return blocked(BlockKind.RUNTIME_PARAMETER, node, f"Conv '{node.name}' has weights computed at run time")
        if axis != 1:
            return blocked(BlockKind.AXIS_LAYOUT, node, f"Conv '{node.name}' would slice a spatial or batch axis")
        group = int(node.attrs.get("group", 1))
        weight, bias = node.inputs[1], self._bias(node)
        c_out = w.shape[0]
        x_key, y_key = (node.inputs[0].name, 1), (node.outputs[0].name, 1)
        is_output = tensor.name == node.outputs[0].name
        if _is_depthwise(node, w):
            # Depthwise: input channel k feeds exactly output channels k*m .. k*m+m-1.
            mult = c_out // group
            x_idx, y_idx = identity(c_out) // mult, identity(c_out)
            here, there, other = (y_idx, x_idx, x_key) if is_output else (x_idx, y_idx, y_key)
            space = y_idx if is_output else x_idx
            params = [ParamSlice(weight, 0, space, y_idx, "weight")]
            if bias is not None:
                params.append(ParamSlice(bias, 0, space, y_idx, "shift"))
            return Coupling(PASSIVE, [Link(other, here, there)], params)
        if is_output:
            params = [slice_all(weight, 0, c_out, "weight")]
            if bias is not None:
                params.append(slice_all(bias, 0, c_out, "shift"))
            return Coupling(PRODUCER, params=params, balanced=group)
        c_in = w.shape[1] * group
        return Coupling(CONSUMER, params=[ParamSlice(weight, 1, identity(c_in), identity(c_in), "weight", group)],
                        balanced=group)

    @staticmethod
    def _bias(node: gs.Node) -> gs.Tensor | None:
        return node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None

    def rewrite(self, node, removed, ctx):
        x_key = (node.inputs[0].name, 1)
        group = int(node.attrs.get("group", 1))
        # Depthwise (a group per input channel, as analysed) loses a group per removed channel;
        # a grouped convolution keeps its groups, each narrower (one input per group left is
        # not depthwise: its weights' second axis is 1 too).
        shape = ctx.shapes.get(node.inputs[0].name)
        depthwise = group == shape[1] if shape is not None and len(shape) > 1 else \
            np.asarray(node.inputs[1].values).shape[1] == 1
        if group > 1 and x_key in removed and depthwise:
            node.attrs["group"] = group - len(removed[x_key])


@register("ConvTranspose")
class ConvTransposeRule(OpRule):
    def seeds(self, node, ctx):
        return [(node.inputs[0].name, 1), (node.outputs[0].name, 1)]

    def couple(self, node, tensor, axis, ctx):
        w = ctx.const(node.inputs[1])
        if w is None:
            return blocked(BlockKind.RUNTIME_PARAMETER, node, f"ConvTranspose '{node.name}' has weights computed at run time")
        if axis != 1:
            return blocked(BlockKind.AXIS_LAYOUT, node, f"ConvTranspose '{node.name}' would slice a spatial or batch axis")
        if int(node.attrs.get("group", 1)) != 1:
            return blocked(BlockKind.UNSUPPORTED_FORM, node, f"grouped ConvTranspose '{node.name}' is not supported")
        weight = node.inputs[1]
        if tensor.name == node.outputs[0].name:
            params = [slice_all(weight, 1, w.shape[1], "weight")]
            if len(node.inputs) > 2 and node.inputs[2].name:
                params.append(slice_all(node.inputs[2], 0, w.shape[1], "shift"))
            return Coupling(PRODUCER, params=params)
        return Coupling(CONSUMER, params=[slice_all(weight, 0, w.shape[0], "weight")])


@register("Gemm")
class GemmRule(OpRule):
    def seeds(self, node, ctx):
        trans_a = int(node.attrs.get("transA", 0))
        return [(node.inputs[0].name, 0 if trans_a else 1), (node.outputs[0].name, 1)]

    def couple(self, node, tensor, axis, ctx):
        b = ctx.const(node.inputs[1])
        if b is None:
            return blocked(BlockKind.UNSUPPORTED_FORM, node, f"Gemm '{node.name}' multiplies two activations")
        trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        weight = node.inputs[1]
        if tensor.name == node.outputs[0].name:
            if axis != 1:
                return blocked(BlockKind.AXIS_LAYOUT, node, f"Gemm '{node.name}' would slice its rows")
            n = b.shape[0] if trans_b else b.shape[1]
            params = [slice_all(weight, 0 if trans_b else 1, n, "weight")]
            c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if c is not None:
                cv = ctx.const(c)
                if cv is None:
                    return blocked(BlockKind.RUNTIME_PARAMETER, node, f"Gemm '{node.name}' adds a bias computed at run time")
                if cv.ndim >= 1 and cv.shape[-1] == n:
                    params.append(slice_all(c, cv.ndim - 1, n, "shift"))
            return Coupling(PRODUCER, params=params)
        if axis != (0 if trans_a else 1):
            return blocked(BlockKind.AXIS_LAYOUT, node, f"Gemm '{node.name}' would slice its rows")
        k = b.shape[1] if trans_b else b.shape[0]
        return Coupling(CONSUMER, params=[slice_all(weight, 1 if trans_b else 0, k, "weight")])


@register("MatMul")
class MatMulRule(OpRule):
    """``X @ W`` with a constant 2-D ``W``: the last axis of X is W's rows, Y's is W's columns.
    Two activations (attention) follow :func:`onnxprune.rules.attention.batched_matmul`."""

    def seeds(self, node, ctx):
        w = ctx.const(node.inputs[1])
        x_shape = ctx.shape(node.inputs[0])
        if w is None or w.ndim != 2 or not x_shape:
            return []
        return [(node.inputs[0].name, len(x_shape) - 1), (node.outputs[0].name, len(x_shape) - 1)]

    def couple(self, node, tensor, axis, ctx):
        w = ctx.const(node.inputs[1])
        if w is None and ctx.const(node.inputs[0]) is None:
            return batched_matmul(node, tensor, axis, ctx)  # Q @ K^T, attention @ V
        if w is None:
            return blocked(BlockKind.UNSUPPORTED_FORM, node,
                           f"MatMul '{node.name}' multiplies a constant by an activation (W @ X)")
        if w.ndim != 2:
            return blocked(BlockKind.UNSUPPORTED_FORM, node, f"MatMul '{node.name}' has a batched constant operand")
        rank = len(ctx.shape(node.outputs[0]) or ())
        if rank < 2:
            return blocked(BlockKind.UNSUPPORTED_FORM, node, f"MatMul '{node.name}' has a vector operand")
        weight = node.inputs[1]
        is_output = tensor.name == node.outputs[0].name
        if axis == rank - 1:
            if is_output:
                return Coupling(PRODUCER, params=[slice_all(weight, 1, w.shape[1], "weight")])
            return Coupling(CONSUMER, params=[slice_all(weight, 0, w.shape[0], "weight")])
        # Leading (batch, sequence) axes pass through unchanged.
        other: SpaceKey = (node.inputs[0].name, axis) if is_output else (node.outputs[0].name, axis)
        size = (ctx.shape(tensor) or ())[axis]
        return Coupling(PASSIVE, links=[Link(other, identity(size), identity(size))])
