"""Data-free synthetic inputs distilled from BatchNorm statistics (ZeroQ-style).

A trained network's BatchNorms remember the mean and variance their inputs had on the
training data. Starting from smooth noise, gradient descent on the input makes every
BatchNorm see a batch with those statistics: the result is not real data, but inside the
network it behaves far more like it than noise does, which is what probes need to rank
channels. Gradients come from :mod:`onnxprune.gradient` (the model's reverse pass as ONNX
nodes run by onnxruntime): the statistics mismatch ``L`` is exposed as the logits
``[0, L]`` so that the cross-entropy against class 0, ``log(1 + e^L)``, falls with ``L``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.evidence.priors import InputPrior
from onnxprune.gradient import INPUT_GRAD, LABELS, input_gradient_model
from onnxprune.ir import graph_inputs, make_batch_dynamic, session

logger = logging.getLogger(__name__)


def _statistics_model(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` with one output, logits ``[0, L]`` per sample, L the BatchNorm mismatch."""
    aux = onnx.ModelProto()
    aux.CopyFrom(model)
    g = aux.graph
    inits = {t.name: t for t in g.initializer}
    opset = next(o.version for o in aux.opset_import if o.domain in ("", "ai.onnx"))
    nodes, terms, count = [], [], [0]

    def fresh():
        count[0] += 1
        return f"onnxprune_stat_{count[0]}"

    def const(value):
        name = fresh()
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(kind, *inputs, **attrs):
        out = fresh()
        nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def mean(x, axes, keepdims=1):
        if opset >= 18:
            return op("ReduceMean", x, numpy_const(axes), keepdims=keepdims)
        return op("ReduceMean", x, axes=axes, keepdims=keepdims)

    def numpy_const(values):
        name = fresh()
        g.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    for node in g.node:
        if node.op_type != "BatchNormalization" or not all(n in inits for n in node.input[3:5]):
            continue
        rm = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32)
        rv = numpy_helper.to_array(inits[node.input[4]]).astype(np.float32)
        shape = [1, -1, 1, 1]
        axes = [0, 2, 3]
        m = mean(node.input[0], axes)
        centred = op("Sub", node.input[0], m)
        v = mean(op("Mul", centred, centred), axes)
        inv = const((1.0 / np.maximum(rv, 1e-6)).reshape(shape))
        dm = op("Sub", m, const(rm.reshape(shape)))
        ds = op("Sub", op("Sqrt", op("Add", v, const(1e-6))), const(np.sqrt(rv).reshape(shape)))
        term = op("Mul", op("Add", op("Mul", dm, dm), op("Mul", ds, ds)), inv)
        terms.append(mean(term, [0, 1, 2, 3], keepdims=0))
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = op("Add", total, t)
    total = op("Div", total, const(float(len(terms))))
    x = graph_inputs(aux)[0].name
    zero = op("Mul", op("Flatten", mean(x, [1, 2, 3]), axis=1), const(0.0))  # [N, 1] zeros
    column = op("Add", zero, total)                      # [N, 1], L for every sample
    logits = fresh()
    nodes.append(helper.make_node("Concat", [zero, column], [logits], axis=1))
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    return aux


def distill(model: onnx.ModelProto, shape: tuple[int, ...], prior: InputPrior, rng: np.random.Generator,
            steps: int = 150, lr: float = 0.05) -> np.ndarray | None:
    """``shape[0]`` inputs whose BatchNorm statistics match the running ones, or None when
    the model has no BatchNorm to match (or no gradient graph can be built)."""
    if len(shape) != 4:
        return None
    batched = onnx.ModelProto()
    batched.CopyFrom(model)
    make_batch_dynamic(batched)
    aux = _statistics_model(batched)
    if aux is None:
        return None
    try:
        sess = session(input_gradient_model(aux))
    except Exception as exc:  # no gradient graph (GradientUnsupported) or no session: use plain noise
        logger.info("no gradient graph for distillation: %s", exc)
        return None
    name = graph_inputs(model)[0].name
    x = prior.sample(shape, rng).astype(np.float32)
    labels = np.zeros(shape[0], np.int64)
    scale = prior.std * lr
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, steps + 1):  # Adam on the input
        try:
            (grad,) = sess.run([INPUT_GRAD], {name: x, LABELS: labels})
        except Exception as exc:  # a model that does not batch: fall back to noise
            logger.info("distillation stopped: %s", str(exc).splitlines()[0])
            return None
        if not np.all(np.isfinite(grad)):  # statistics overflowed: keep the last finite inputs
            logger.info("distillation stopped at step %d: the gradient is not finite", t)
            break
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        x = x - scale * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        if prior.low is not None:
            x = np.clip(x, prior.low, prior.high)
    return x.astype(np.float32)
