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

from onnxprune.evidence.priors import InputPrior
from onnxprune.gradient import INPUT_GRAD, LABELS, input_gradient_model
from onnxprune.ir import Model, ModelEditor, NodeEmitter, copy_model, graph_inputs, make_batch_dynamic, session

logger = logging.getLogger(__name__)


def _statistics_model(model: Model) -> Model | None:
    """``model`` with one output, logits ``[0, L]`` per sample, L the BatchNorm mismatch."""
    edit = ModelEditor(model)
    b = edit.emitter("onnxprune_stat_{n}")
    terms = []
    for node in edit.nodes():
        if node.op_type != "BatchNormalization":
            continue
        rm, rv = (edit.constant(name) for name in node.inputs[3:5])
        if rm is None or rv is None:
            continue
        terms.append(_mismatch(b, node.inputs[0], rm.astype(np.float32), rv.astype(np.float32)))
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = b.add("Add", [total, t])
    total = b.add("Div", [total, _f32(b, float(len(terms)))])
    x = edit.inputs[0]
    zero = b.add("Mul", [b.add("Flatten", [b.reduce_mean(x, [1, 2, 3])], axis=1), _f32(b, 0.0)])  # [N, 1] zeros
    column = b.add("Add", [zero, total])                      # [N, 1], L for every sample
    logits = b.add("Concat", [zero, column], axis=1)
    edit.extend(b)
    edit.set_outputs([logits], np.float32)
    return edit.finish()


def _mismatch(b: NodeEmitter, x: str, rm: np.ndarray, rv: np.ndarray) -> str:
    """How far the batch statistics of ``x`` are from the running ones ``rm``, ``rv``: the
    mean over channels of ``((m - rm)^2 + (s - sqrt(rv))^2) / rv``."""
    shape = [1, -1, 1, 1]
    axes = [0, 2, 3]
    m = b.reduce_mean(x, axes)
    centred = b.add("Sub", [x, m])
    v = b.reduce_mean(b.add("Mul", [centred, centred]), axes)
    inv = _f32(b, (1.0 / np.maximum(rv, 1e-6)).reshape(shape))
    dm = b.add("Sub", [m, _f32(b, rm.reshape(shape))])
    ds = b.add("Sub", [b.add("Sqrt", [b.add("Add", [v, _f32(b, 1e-6)])]), _f32(b, np.sqrt(rv).reshape(shape))])
    term = b.add("Mul", [b.add("Add", [b.add("Mul", [dm, dm]), b.add("Mul", [ds, ds])]), inv])
    return b.reduce_mean(term, [0, 1, 2, 3], keepdims=0)


def _f32(b: NodeEmitter, value) -> str:
    return b.const(np.asarray(value, np.float32))


def distill(model: Model, shape: tuple[int, ...], prior: InputPrior, rng: np.random.Generator,
            steps: int = 150, lr: float = 0.05) -> np.ndarray | None:
    """``shape[0]`` inputs whose BatchNorm statistics match the running ones, or None when
    the model has no BatchNorm to match (or no gradient graph can be built)."""
    if len(shape) != 4:
        return None
    batched = copy_model(model)
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
