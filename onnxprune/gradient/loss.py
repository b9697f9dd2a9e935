"""The loss whose gradient is taken: per-sample cross-entropy of the model's first output
against integer labels, and the names the gradient model gives its new input and outputs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from onnxprune.gradient.emitter import Emitter
from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs
from onnxprune.gradient.static import StaticInfo

LABELS = "labels"
LOSS = "loss"
INPUT_GRAD = "input_grad"

_PASS_THROUGH = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})


def final_softmax(graph: onnx.GraphProto, producer: dict) -> onnx.NodeProto | None:
    """The Softmax/LogSoftmax the first output comes from, through reshapes, if any."""
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type in ("Softmax", "LogSoftmax") else None


def output_kind(model: onnx.ModelProto) -> str:
    """'probs' if the model's first output is a Softmax (probabilities), else 'logits'.

    LogSoftmax outputs count as logits: cross-entropy on them is -log(prob) already.
    """
    node = final_softmax(model.graph, {o: n for n in model.graph.node for o in n.output})
    return "probs" if node is not None and node.op_type == "Softmax" else "logits"


def loss_target(static: StaticInfo) -> tuple[str, str]:
    """(tensor the loss is computed from, 'logits' | 'probs').

    A final Softmax/LogSoftmax over the classes is skipped: the loss on the logits before it
    is -log(prob) computed stably.
    """
    graph = static.model.graph
    out = graph.output[0].name
    node = final_softmax(graph, static.producer)
    if node is not None:
        one_axis = static.opset.has("Softmax.one_axis")
        axis = attrs(node).get("axis", -1 if one_axis else 1)
        s = static.shape(node.input[0])
        r = len(s) if s is not None else None
        over_classes = (axis == 1 or (r is not None and axis % r == 1)) and (
            not one_axis or (r is not None and all(d == 1 for d in s[2:])))
        if over_classes:
            return node.input[0], "logits"
        return out, "probs" if node.op_type == "Softmax" else "logits"
    return out, "logits"


def _classes(b: Emitter, t: str, z: str) -> str:
    """The class indices 0..K-1 of the flattened target ``z``, K static or read at run time."""
    s = b.static.shape(t)
    k = math.prod(s[1:]) if s is not None and all(isinstance(d, int) and d > 0 for d in s[1:]) else None
    if k is not None:
        return b.i64(np.arange(k))
    if b.opset.has("Range"):
        n_cls = b.add("Gather", [b.add("Shape", [z]), b.const(np.array(1, np.int64))], axis=0)
        return b.add("Range", [b.const(np.array(0, np.int64)), n_cls, b.const(np.array(1, np.int64))])
    raise GradientUnsupported("number of classes unknown")


def emit_loss(b: Emitter, t: str, kind: str) -> str:
    """Emit the per-sample cross-entropy (named LOSS) and return d loss / d t.

    With logits z: loss = -log softmax(z)[label], d loss / d z = softmax(z) - onehot.
    With probabilities p: loss = -log p[label], d loss / d p = -onehot / p.
    """
    z = b.add("Flatten", [t], axis=1)
    classes = _classes(b, t, z)
    onehot_b = b.add("Equal", [b.unsqueeze(LABELS, [1]), classes])
    onehot = b.add("Cast", [onehot_b], to=b.static.elem(t))
    if kind == "logits":
        logp = b.add("LogSoftmax", [z], axis=1)
        dz = b.add("Sub", [b.add("Exp", [logp]), onehot])
    else:
        logp = b.add("Log", [z])
        dz = b.add("Div", [b.add("Neg", [onehot]), z])
    picked = b.where(onehot_b, logp, b.scalar(0.0, t))
    summed = b.reduce_sum(picked, [1], keepdims=0)
    b.append(helper.make_node("Neg", [summed], [LOSS], name=b.fresh("loss")))
    return b.reshape_like(dz, t)
