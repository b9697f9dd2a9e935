"""Exact input gradients of an ONNX classifier, emitted as an ONNX graph.

onnxruntime only runs forward graphs, yet adversarial evaluation (FGSM, PGD) needs
d loss / d input. Rather than depending on a deep-learning framework, we write the
reverse-mode derivative of the model *as more ONNX nodes* appended to the model itself:
the result is an ordinary model (inputs: the original input plus int64 ``labels``;
outputs: per-sample cross-entropy ``loss`` and ``input_grad``) that any onnxruntime runs
at forward speed.

Each op type has one backward rule in :data:`GRADIENT_RULES`. A rule receives the
gradients flowing into the node's outputs and emits the nodes that compute the gradients
of its inputs, using only standard ops of the model's own opset (9 to 21), so the backward
graph is valid wherever the forward one is. Only the path from the input to the output is
differentiated: weights, constants and shape computations (Shape, Gather on shapes, ...)
carry no gradient. When a node on that path has no rule, or a rule lacks static
information it needs, :class:`GradientUnsupported` is raised so that the caller can fall
back to finite differences.

Modules:

- :mod:`.builder` -- :func:`input_gradient_model`, the construction from start to end;
- :mod:`.static` -- types, shapes and constant values of the forward tensors; :mod:`.probe`
  measures the shapes shape inference leaves unknown;
- :mod:`.paths` -- which nodes lie on the input->loss path;
- :mod:`.loss` -- the cross-entropy and its gradient, :func:`output_kind`;
- :mod:`.emitter` -- fresh names, constants and opset-aware helper ops for the rules (on
  :class:`onnxprune.ir.NodeEmitter`, whose :mod:`~onnxprune.ir.opsets` tables say what
  changed between opsets);
- :mod:`.registry` -- :data:`GRADIENT_RULES` and the :func:`~.registry.rule` decorator;
- rules by op family: :mod:`.activations`, :mod:`.elementwise` (with :mod:`.broadcast`),
  :mod:`.linear`, :mod:`.pooling` (with :mod:`.windows`), :mod:`.normalization`,
  :mod:`.reduce`, :mod:`.resize`, :mod:`.shape`;
- :mod:`.assemble` -- the final model.
"""

from __future__ import annotations

# The rule modules fill GRADIENT_RULES as they are imported.
from onnxprune.gradient import (  # noqa: F401
    activations,
    elementwise,
    linear,
    normalization,
    pooling,
    reduce,
    resize,
    shape,
)
from onnxprune.gradient.builder import input_gradient_model
from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.loss import INPUT_GRAD, LABELS, LOSS, output_kind
from onnxprune.gradient.registry import GRADIENT_RULES, Rule

__all__ = ["GRADIENT_RULES", "INPUT_GRAD", "LABELS", "LOSS", "GradientUnsupported", "Rule", "input_gradient_model",
           "output_kind"]
