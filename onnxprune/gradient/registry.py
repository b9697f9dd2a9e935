"""The table of backward rules, one per op type.

A rule gets ``(b, node, output gradients)``, ``b`` the :class:`~onnxprune.gradient.emitter.Emitter`
of the graph under construction, and returns one gradient per node input, None where no
gradient is needed: only inputs with ``b.needs(name)`` must get one. Weights, shape tensors
and everything else off the input->output path are constants. Rule modules fill the table
with :func:`rule` when the package is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from onnxprune.gradient.emitter import Emitter

Rule = Callable[["Emitter", onnx.NodeProto, list], list]
GRADIENT_RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    """Decorator: register the decorated function as the backward rule of ``op_types``."""

    def register(fn: Rule) -> Rule:
        for op in op_types:
            GRADIENT_RULES[op] = fn
        return fn

    return register


def unary(derivative: Callable[[Emitter, str, str], str]) -> Rule:
    """Rule for y = f(x) given ``derivative(b, x, y) -> f'(x)``: dx = g * f'(x)."""

    def unary_rule(b: Emitter, n: onnx.NodeProto, g: list) -> list:
        return [b.add("Mul", [b.compact(g[0], n.output[0]), derivative(b, n.input[0], n.output[0])])]

    return unary_rule
