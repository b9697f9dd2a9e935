"""What a coupling rule says about one node and one channel space, and the rule registry.

A *space* is one axis of one activation tensor, keyed ``(tensor_name, axis)``. Asked about a
space it touches, a node's rule answers with a :class:`Coupling`: the other spaces whose
indices are tied to this one (:class:`Link`), the constants sliced with it
(:class:`ParamSlice`), the node's role, and, where the node cannot follow a removal, the
reason it blocks (:class:`BlockReason`: a kind, a message, the node). Rules are registered per
op type; an op without a rule blocks every space it touches (unknown means blocked, never
guessed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx_graphsurgeon as gs

SpaceKey = tuple[str, int]

#: Roles a node plays for a space. Producers' output channels and consumers' input channels
#: carry the weights that magnitude-style scorers read.
PRODUCER, CONSUMER, PASSIVE = "producer", "consumer", "passive"


class BlockKind(Enum):
    """Why a channel space cannot be pruned, as a category: refusals are counted by kind."""

    GRAPH_INPUT = "graph_input"  # the channels are a graph input's
    GRAPH_OUTPUT = "graph_output"  # ... or a graph output's: the signature must not change
    UNKNOWN_SHAPE = "unknown_shape"  # shape inference left the tensor without a shape
    UNSUPPORTED_OP = "unsupported_op"  # no rule for the op, or a known op never pruned through
    UNSUPPORTED_FORM = "unsupported_form"  # a supported op used in a form its rule does not handle
    ANALYSIS_FAILURE = "analysis_failure"  # the rule could not read the node
    NO_PRODUCER = "no_producer"  # no weight produces the channels
    GROUPED_PARTITION = "grouped_partition"  # grouped convolutions cannot lose equal counts per group
    RUNTIME_PARAMETER = "runtime_parameter"  # weights, biases or tables computed at run time
    RUNTIME_SHAPE = "runtime_shape"  # sizes, bounds, axes or a channel count known only at run time
    CHANNEL_AS_PARAMETER = "channel_as_parameter"  # a channel tensor feeds a sizes/indices/mask input
    EXTRA_OUTPUT = "extra_output"  # a second output (indices, statistics) is in use
    CROSS_CHANNEL = "cross_channel"  # the op computes across this axis (normalises, reduces, pools)
    BROADCAST = "broadcast"  # one index is broadcast over many
    AXIS_LAYOUT = "axis_layout"  # the op moves, splits or resizes this axis in a way indices cannot follow
    OPT_IN = "opt_in"  # prunable only with an option (prune_hidden, prune_head_dim)
    RECURRENT_STATE = "recurrent_state"  # a recurrent state carried between calls (graph input/output)
    CONTROL_FLOW = "control_flow"  # read or made inside an If/Loop/Scan body the rules cannot follow


@dataclass(frozen=True)
class BlockReason:
    """One refusal: its kind, the message users read, and the offending node's name (None when
    no single node is at fault, e.g. a graph input)."""

    kind: BlockKind
    message: str
    node: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "message": self.message, "node": self.node}


@dataclass
class Link:
    """Index ``here[i]`` of the queried space is index ``there[i]`` of space ``other``."""

    other: SpaceKey
    here: np.ndarray
    there: np.ndarray


@dataclass
class ParamSlice:
    """Constant ``tensor`` loses, along ``axis``, index ``param[i]`` when the space loses ``space[i]``.

    ``groups > 1`` marks a grouped Conv weight ``[C_out, C_in/groups, ...]`` read along its
    input-channel axis: input channel ``c`` is column ``c % (C_in/groups)`` of the rows of conv
    group ``c // (C_in/groups)``. Every method that reads such a weight goes through
    :meth:`_locate` and :meth:`_rows`, the one place that arithmetic lives.
    """

    tensor: gs.Constant
    axis: int
    space: np.ndarray
    param: np.ndarray
    kind: str  # "weight" (multiplies the channel), "shift" (adds to it), "stat" (norm statistics)
    groups: int = 1
    #: A quantized weight's zero point (broadcastable to the weight), subtracted before its
    #: magnitude is read: the weight is ``(q - offset) * scale``.
    offset: np.ndarray | None = None

    def _locate(self, param_idx, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(conv group, column within the group) of parameter indices of a grouped weight of ``shape``."""
        return np.divmod(np.asarray(param_idx, dtype=np.int64), shape[1])

    def _rows(self, block: int, shape: tuple[int, ...]) -> slice:
        """The output rows of conv group ``block`` in a grouped weight of ``shape``."""
        rows = shape[0] // self.groups
        return slice(int(block) * rows, (int(block) + 1) * rows)

    def block_of(self, param_idx) -> np.ndarray:
        """The conv group that reads each parameter index: 0 for all unless the weight is grouped.
        Parameter indices of one group can only be merged into each other."""
        if self.groups == 1:
            return np.zeros_like(np.asarray(param_idx, dtype=np.int64))
        return self._locate(param_idx, self.tensor.shape)[0]

    def squared_norms(self) -> np.ndarray:
        """Sum of squares of the weights each *space index* owns in this constant."""
        values = np.asarray(self.tensor.values, dtype=np.float64)
        if self.offset is not None:
            values = values - np.asarray(self.offset, dtype=np.float64)
        if self.groups > 1:
            per_column = (values**2).reshape(values.shape[0], values.shape[1], -1).sum(axis=2)
            per_block = per_column.reshape(self.groups, -1, per_column.shape[1]).sum(axis=1)
            return per_block[self._locate(self.param, values.shape)]
        moved = np.moveaxis(values, self.axis, 0).reshape(values.shape[self.axis], -1)
        return (moved**2).sum(axis=1)[self.param]

    def deleted(self, values: np.ndarray, param_idx: np.ndarray) -> np.ndarray:
        """``values`` without the given parameter indices along ``axis``."""
        if self.groups == 1:
            return np.delete(values, param_idx, axis=self.axis)
        block, column = self._locate(param_idx, values.shape)
        kept = [np.delete(values[self._rows(g, values.shape)], column[block == g], axis=1) for g in range(self.groups)]
        if len({k.shape[1] for k in kept}) != 1:
            raise ValueError("grouped weight lost unequal channel counts per group")
        return np.concatenate(kept, axis=0)

    def columns(self, values: np.ndarray, param_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """The weights in ``values`` that read parameter index ``param_idx`` (a consumer's input
        channel), as [outputs, k], and the output rows they belong to: every output, or only
        its conv group's rows when the weight is grouped."""
        if self.groups > 1:
            block, column = self._locate(param_idx, values.shape)
            rows = self._rows(block, values.shape)
            return values[rows, column].reshape(rows.stop - rows.start, -1), np.arange(rows.start, rows.stop)
        moved = np.moveaxis(values, self.axis, 0)[param_idx]  # Conv [out, k, k], Gemm/MatMul [out]
        return moved.reshape(moved.shape[0], -1), np.arange(moved.shape[0])

    def add_columns(self, values: np.ndarray, dst: int, src: int, scale: float) -> None:
        """In place: the weights reading parameter index ``dst`` absorb ``scale`` times those
        reading ``src`` (``dst == src`` with ``scale=-1`` zeroes them). A grouped weight is
        left alone when ``dst`` and ``src`` are read by different conv groups."""
        if self.groups > 1:
            (block_dst, column_dst), (block_src, column_src) = (self._locate(i, values.shape) for i in (dst, src))
            if block_dst != block_src:
                return  # different conv groups: the kept unit cannot absorb this one
            rows = self._rows(block_dst, values.shape)
            values[rows, column_dst] += scale * values[rows, column_src]
            return
        index_dst = [slice(None)] * values.ndim
        index_src = list(index_dst)
        index_dst[self.axis], index_src[self.axis] = dst, src
        values[tuple(index_dst)] += scale * values[tuple(index_src)]


@dataclass
class Coupling:
    """A rule's answer for one (node, space)."""

    role: str = PASSIVE
    links: list[Link] = field(default_factory=list)
    params: list[ParamSlice] = field(default_factory=list)
    #: The space must lose the same number of channels in each of ``balanced`` equal blocks.
    balanced: int = 1
    reason: BlockReason | None = None

    @property
    def blocked(self) -> str | None:
        """The refusal's message, or None when the node follows a removal."""
        return self.reason.message if self.reason is not None else None


def identity(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def same(other: SpaceKey, n: int) -> Link:
    """An index-for-index tie to another space of the same size."""
    return Link(other, identity(n), identity(n))


def slice_all(tensor: gs.Constant, axis: int, n: int, kind: str) -> ParamSlice:
    return ParamSlice(tensor, axis, identity(n), identity(n), kind)


def blocked(kind: BlockKind, node: gs.Node, message: str) -> Coupling:
    """The answer of a rule that cannot follow a removal: why, and at which node."""
    return Coupling(reason=BlockReason(kind, message, node.name))


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

    #: The op owns weights it never prunes through (quantized ops onnxprune does not slice): its
    #: output is asked anyway, so that the refusal shows up as a group.
    refuses_its_weights = False

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
