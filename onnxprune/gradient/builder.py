"""The construction of a gradient model: prepare the forward model, find the path to
differentiate, seed it with the loss gradient, run every node's backward rule in reverse
order, and assemble the result."""

from __future__ import annotations

import logging

import onnx
from onnx import helper

from onnxprune.gradient.assemble import assemble
from onnxprune.gradient.emitter import Emitter
from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.loss import INPUT_GRAD, LABELS, LOSS, emit_loss, loss_target
from onnxprune.gradient.paths import backward_path
from onnxprune.gradient.probe import has_shape_gaps, probe_shapes
from onnxprune.gradient.protos import op_key
from onnxprune.gradient.registry import GRADIENT_RULES
from onnxprune.gradient.static import StaticInfo
from onnxprune.ir import Opset

logger = logging.getLogger(__name__)

#: The oldest opset a gradient graph is built for.
MIN_VERSION = 9


def input_gradient_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` extended with a ``labels`` input and ``loss``/``input_grad`` outputs.

    ``loss`` is the per-sample cross-entropy of the first output against ``labels`` (if
    the output is already a Softmax/LogSoftmax over classes, the logits before it are used,
    which is -log(prob) computed stably); ``input_grad`` is d loss / d input, shaped like the
    input. Raises :class:`GradientUnsupported` when a rule is missing.
    """
    m = _prepared(model)
    opset = Opset(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0))
    if not MIN_VERSION <= opset.version:
        raise GradientUnsupported(f"opset {opset.version} is older than {MIN_VERSION}")
    static = StaticInfo(m, opset)
    names = _tensor_names(m.graph)
    for name in (LABELS, LOSS, INPUT_GRAD):
        if name in names:
            raise GradientUnsupported(f"the model already uses the tensor name {name!r}")
    names.update((LABELS, LOSS, INPUT_GRAD))
    if has_shape_gaps(static):
        probe_shapes(static)
    target, kind = loss_target(static)
    path = backward_path(static, target)
    missing = sorted({op_key(n) for n in path.nodes if op_key(n) not in GRADIENT_RULES})
    if missing:
        raise GradientUnsupported(
            f"no backward rule for {', '.join(missing)} on the input->output path", tuple(missing))
    b = Emitter(static, names, path.needed)
    gx = _backpropagate(b, path.nodes, target, emit_loss(b, target, kind))
    b.append(helper.make_node("Identity", [gx], [INPUT_GRAD], name=b.fresh("out")))
    return assemble(m, static.x, b.nodes, b.inits, static.elem(m.graph.output[0].name))


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its local functions inlined (where onnx can)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if len(m.functions):
        try:
            from onnx import inliner

            m = inliner.inline_local_functions(m)
        except Exception as exc:  # noqa: BLE001 - keep going, rules will say what lacks
            logger.debug("could not inline local functions: %s", exc)
    return m


def _tensor_names(g: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph uses, which emitted names must avoid."""
    return {t.name for t in g.initializer} | {v.name for v in g.input} | {
        v.name for v in g.output} | {o for n in g.node for o in list(n.input) + list(n.output)}


def _backpropagate(b: Emitter, nodes: list[onnx.NodeProto], target: str, seed: str) -> str:
    """Run the backward rules of ``nodes`` (last first) from d loss / d target = ``seed``;
    return the gradient of the data input."""
    grads: dict[str, list[str]] = {target: [seed]}
    for node in nodes:
        gout = [_total(b, grads, o) if o in b.needed else None for o in node.output]
        if all(x is None for x in gout):
            continue
        gin = list(GRADIENT_RULES[op_key(node)](b, node, gout))
        gin += [None] * (len(node.input) - len(gin))
        for i, (name, gi) in enumerate(zip(node.input, gin)):
            if not b.needs(name) or (gi is None and name in node.input[:i]):  # x*x: one part for both
                continue
            if gi is None:
                raise GradientUnsupported(f"{node.op_type} {node.name!r}: no gradient for input {i}")
            grads.setdefault(name, []).append(gi)
    gx = _total(b, grads, b.static.x)
    if gx is None:
        raise GradientUnsupported("no gradient reached the input")
    return gx


def _total(b: Emitter, grads: dict[str, list[str]], name: str) -> str | None:
    """The gradient of ``name``: the sum of its parts (one Sum node, emitted once). Sum
    broadcasts: a part broadcast from a reduction is added unexpanded, as long as one part
    is full-sized."""
    parts = grads.get(name)
    if not parts:
        return None
    if len(parts) > 1:
        if any(p not in b.broadcasts for p in parts):
            parts = [b.compact(p) for p in parts]
        grads[name] = [b.add("Sum", parts)]
    return grads[name][0]
