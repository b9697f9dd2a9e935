"""What a coupling rule says about one node and one channel space, and the rule registry.

A *space* is one axis of one activation tensor, keyed ``(tensor_name, axis)``. Asked about a
space it touches, a node's rule answers with a :class:`Coupling`: the other spaces whose
indices are tied to this one (:class:`Link`), the constants sliced with it
(:class:`ParamSlice`), the node's role, and, where the node cannot follow a removal, the
reason it blocks. Rules are registered per op type; an op without a rule blocks every space
it touches (unknown means blocked, never guessed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

SpaceKey = tuple[str, int]

#: Roles a node plays for a space. Producers' output channels and consumers' input channels
#: carry the weights that magnitude-style scorers read.
PRODUCER, CONSUMER, PASSIVE = "producer", "consumer", "passive"


@dataclass
class Link:
    """Index ``here[i]`` of the queried space is index ``there[i]`` of space ``other``."""

    other: SpaceKey
    here: np.ndarray
    there: np.ndarray


@dataclass
class ParamSlice:
    """Constant ``tensor`` loses, along ``axis``, index ``param[i]`` when the space loses ``space[i]``.

    ``groups > 1`` marks a grouped Conv weight read along its input-channel axis: channel
    ``c`` is column ``c % (C/groups)`` of the rows of group ``c // (C/groups)``.
    """

    tensor: gs.Constant
    axis: int
    space: np.ndarray
    param: np.ndarray
    kind: str  # "weight" (multiplies the channel), "shift" (adds to it), "stat" (norm statistics)
    groups: int = 1

    def squared_norms(self) -> np.ndarray:
        """Sum of squares of the weights each *space index* owns in this constant."""
        values = np.asarray(self.tensor.values, dtype=np.float64)
        if self.groups > 1:
            per = (values**2).reshape(values.shape[0], values.shape[1], -1).sum(axis=2)
            per = per.reshape(self.groups, -1, per.shape[1]).sum(axis=1).reshape(-1)
            return per[self.param]
        moved = np.moveaxis(values, self.axis, 0).reshape(values.shape[self.axis], -1)
        return (moved**2).sum(axis=1)[self.param]

    def deleted(self, values: np.ndarray, param_idx: np.ndarray) -> np.ndarray:
        """``values`` without the given parameter indices along ``axis``."""
        if self.groups == 1:
            return np.delete(values, param_idx, axis=self.axis)
        per_group = values.shape[1]
        rows = values.shape[0] // self.groups
        kept = []
        for g in range(self.groups):
            gone = [c - g * per_group for c in param_idx if g * per_group <= c < (g + 1) * per_group]
            kept.append(np.delete(values[g * rows:(g + 1) * rows], gone, axis=1))
        if len({k.shape[1] for k in kept}) != 1:
            raise ValueError("grouped weight lost unequal channel counts per group")
        return np.concatenate(kept, axis=0)


@dataclass
class Coupling:
    """A rule's answer for one (node, space)."""

    role: str = PASSIVE
    links: list[Link] = field(default_factory=list)
    params: list[ParamSlice] = field(default_factory=list)
    #: The space must lose the same number of channels in each of ``balanced`` equal blocks.
    balanced: int = 1
    blocked: str | None = None


def identity(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def same(other: SpaceKey, n: int) -> Link:
    """An index-for-index tie to another space of the same size."""
    return Link(other, identity(n), identity(n))


def slice_all(tensor: gs.Constant, axis: int, n: int, kind: str) -> ParamSlice:
    return ParamSlice(tensor, axis, identity(n), identity(n), kind)


def blocked(reason: str) -> Coupling:
    return Coupling(blocked=reason)


class RuleContext:
    """What rules may ask about the graph: shapes at the analysis input shapes, constants."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int, ...]], options: dict | None = None):
        self.graph = graph
        self.shapes = shapes
        self.options = options or {}
        self.graph_outputs = {t.name for t in graph.outputs}
        #: What rules learnt about the graph as analysed (by rewrite time other rules may have
        #: edited it), per kind: a copy of the context carries it along.
        self.memo: dict[str, dict] = {}

    def shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.shapes.get(tensor.name)

    @staticmethod
    def const(tensor: gs.Tensor | None) -> np.ndarray | None:
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


class OpRule:
    """Coupling and rewriting for a family of op types. Subclasses override both methods."""

    #: Spaces this op starts the search from (its own weights' channel axes).
    def seeds(self, node: gs.Node, ctx: RuleContext) -> list[SpaceKey]:
        return []

    def couple(self, node: gs.Node, tensor: gs.Tensor, axis: int, ctx: RuleContext) -> Coupling:
        raise NotImplementedError

    def rewrite(self, node: gs.Node, removed: dict[SpaceKey, np.ndarray], ctx: RuleContext) -> None:
        """Fix attributes and shape constants after the sliced parameters are in place."""


RULES: dict[str, OpRule] = {}


def register(*op_types: str) -> Callable[[type[OpRule]], type[OpRule]]:
    def wrap(cls: type[OpRule]) -> type[OpRule]:
        for op in op_types:
            RULES[op] = cls()
        return cls
    return wrap


def rule_for(node: gs.Node) -> OpRule | None:
    if node.domain not in (None, "", "ai.onnx"):
        return RULES.get(f"{node.domain}::{node.op}")
    return RULES.get(node.op)
