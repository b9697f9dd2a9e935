"""The one error of the gradient package: no gradient graph can be built for a model."""

from __future__ import annotations


class GradientUnsupported(Exception):
    """The gradient graph cannot be built for this model (an op without a backward rule on
    the input->output path, or missing static shape information a rule needs).

    Not a :class:`~onnxprune.errors.UserError`: the model is fine, the evaluator simply
    falls back to finite differences. ``ops`` lists the op types lacking a rule.
    """

    def __init__(self, message: str, ops: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.ops = tuple(ops)
