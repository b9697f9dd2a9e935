"""Recurrent layers: LSTM, GRU and RNN, forward, reverse and bidirectional, layouts 0 and 1.

A recurrent layer's *hidden units* are one channel space: the last axis of ``Y``
(``[seq, dirs, batch, H]``, or ``[batch, seq, dirs, H]`` with ``layout=1``), of ``Y_h``
and ``Y_c``, and of the initial states ``initial_h``/``initial_c``. Hidden unit ``h`` owns
row ``g*H + h`` of ``W``, ``R`` (and ``B``: ``2*gates`` blocks, ``P``: 3 peephole blocks) for
every gate ``g`` (LSTM i, o, f, c; GRU z, r, h; RNN one), and column ``h`` of ``R`` (what the
other units read of it at the next step). Removing it slices all of those and lowers
``hidden_size``.

``hidden_size`` is one attribute for both directions, so a bidirectional layer must lose the
same count in each: unit ``h`` of the forward direction and unit ``h`` of the backward one
are removed together (one unit of the group). Consumers that merge directions into features
(Transpose + Reshape to ``dirs*H``) map each hidden index to ``dirs`` features and are
followed by the Reshape rule; ones that slice a direction out see the same index.

The input features (last axis of ``X``) are a consumer space: column ``k`` of ``W``.

Initial states that are graph inputs join the group and keep it (their width is part of the
signature); constant ones are sliced; zeros made at run time by ``ConstantOfShape`` (what
exporters emit for "no state given") have their hidden dimension scaled when it is a static
number, and block otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import (
    CONSUMER,
    PASSIVE,
    PRODUCER,
    BlockKind,
    BlockReason,
    Coupling,
    Link,
    OpRule,
    ParamSlice,
    RuleContext,
    blocked,
    identity,
    register,
    slice_all,
)
from onnxprune.rules.control_flow import branch_owners
from onnxprune.rules.shape_expr import input_elements, scale_input

#: Gates per op: rows of W and R per hidden unit (B has twice as many blocks).
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: Input slots of the initial states per op.
_STATE_SLOTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
_PEEPHOLE_SLOT = 7  # LSTM only


def _input(node: gs.Node, slot: int) -> gs.Tensor | None:
    return node.inputs[slot] if len(node.inputs) > slot and node.inputs[slot].name else None


def hidden_tensors(node: gs.Node, ctx: RuleContext) -> list[gs.Tensor]:
    """The outputs of a recurrent node whose last axis is its hidden units (Y, Y_h, Y_c), those
    in use (exporters leave Y_h and Y_c dangling: nothing reads them, nothing needs slicing):
    read by a node, a graph output, or returned by the If branch holding the node."""
    if "returned" not in ctx.memo:
        ctx.memo["returned"] = set(branch_owners(ctx.graph))
    used = ctx.graph_outputs | ctx.memo["returned"]
    return [t for t in node.outputs if t.name and (t.outputs or t.name in used)]


def state_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The initial-state inputs a recurrent node is given (initial_h, initial_c)."""
    return [t for t in (_input(node, s) for s in _STATE_SLOTS[node.op]) if t is not None]


def hidden_size(node: gs.Node) -> int:
    if "hidden_size" in node.attrs:
        return int(node.attrs["hidden_size"])
    return int(np.asarray(node.inputs[2].values).shape[-1])


def _rows(tensor: gs.Constant, blocks: int, size: int, kind: str) -> ParamSlice:
    """Rows ``b*size + h`` of axis 1 belong to hidden unit ``h`` for every block ``b``."""
    return ParamSlice(tensor, 1, np.tile(identity(size), blocks), identity(blocks * size), kind)


def _zeros_maker(tensor: gs.Tensor, node: gs.Node) -> gs.Node | None:
    """The ConstantOfShape making ``tensor`` when its only readers are ``node``'s states."""
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1 or tensor.inputs[0].op != "ConstantOfShape":
        return None
    if any(user is not node for user in tensor.outputs):
        return None
    return tensor.inputs[0]


def _zeros_problem(maker: gs.Node, size: int, ctx: RuleContext) -> str | None:
    """Why the hidden dimension of a ConstantOfShape's shape cannot be scaled (None: it can)."""
    elements = input_elements(maker, 0, ctx)
    if not elements:
        return f"the shape of ConstantOfShape '{maker.name}' is computed in a way not followed"
    last = elements[-1]
    if last.dynamic or last.value != size:
        return f"ConstantOfShape '{maker.name}' reads the hidden width at run time"
    return None


@register("LSTM", "GRU", "RNN")
class RecurrentRule(OpRule):
    def seeds(self, node, ctx):
        keys = []
        x_shape = ctx.shape(node.inputs[0])
        if x_shape:
            keys.append((node.inputs[0].name, len(x_shape) - 1))
        for t in hidden_tensors(node, ctx)[:1]:
            shape = ctx.shape(t)
            if shape:
                keys.append((t.name, len(shape) - 1))
        return keys

    def couple(self, node, tensor, axis, ctx):
        w, r = ctx.const(node.inputs[1]), ctx.const(node.inputs[2])
        if w is None or r is None:
            return blocked(BlockKind.RUNTIME_PARAMETER, node, f"{node.op} '{node.name}' has weights computed at run time")
        rank = len(ctx.shape(tensor))
        if tensor.name == node.inputs[0].name and tensor.name not in {t.name for t in state_inputs(node)}:
            if axis != rank - 1:
                return blocked(BlockKind.AXIS_LAYOUT, node,
                               f"{node.op} '{node.name}' would slice the sequence or batch axis of its input")
            return Coupling(CONSUMER, params=[slice_all(node.inputs[1], 2, w.shape[2], "weight")])
        if axis != rank - 1:
            return blocked(BlockKind.AXIS_LAYOUT, node,
                           f"{node.op} '{node.name}' would slice the sequence, direction or batch axis of a state")
        return self._hidden(node, tensor, ctx)

    def _hidden(self, node: gs.Node, tensor: gs.Tensor, ctx: RuleContext) -> Coupling:
        size, gates = hidden_size(node), GATES[node.op]
        links = []
        for other in hidden_tensors(node, ctx) + state_inputs(node):
            if other.name == tensor.name or isinstance(other, gs.Constant) or _zeros_maker(other, node):
                continue
            shape = ctx.shape(other)
            if not shape:
                return blocked(BlockKind.UNKNOWN_SHAPE, node,
                               f"state '{other.name}' of {node.op} '{node.name}' has no known shape")
            links.append(Link((other.name, len(shape) - 1), identity(size), identity(size)))
        for state in state_inputs(node):
            maker = _zeros_maker(state, node)
            problem = maker is not None and _zeros_problem(maker, size, ctx)
            if problem:
                return blocked(BlockKind.RUNTIME_SHAPE, node, f"the initial state of {node.op} '{node.name}': {problem}")
        if tensor.name not in {t.name for t in hidden_tensors(node, ctx)}:
            return Coupling(PASSIVE, links=links)  # an initial state: the node's outputs carry the weights
        params = [_rows(node.inputs[1], gates, size, "weight"), _rows(node.inputs[2], gates, size, "weight"),
                  slice_all(node.inputs[2], 2, size, "weight")]
        bias = _input(node, 3)
        if bias is not None:
            if ctx.const(bias) is None:
                return blocked(BlockKind.RUNTIME_PARAMETER, node, f"{node.op} '{node.name}' has a bias computed at run time")
            params.append(_rows(bias, 2 * gates, size, "shift"))
        peephole = _input(node, _PEEPHOLE_SLOT) if node.op == "LSTM" else None
        if peephole is not None:
            if ctx.const(peephole) is None:
                return blocked(BlockKind.RUNTIME_PARAMETER, node, f"LSTM '{node.name}' has peepholes computed at run time")
            params.append(_rows(peephole, 3, size, "weight"))
        for state in state_inputs(node):
            if isinstance(state, gs.Constant):
                params.append(ParamSlice(state, state.values.ndim - 1, identity(size), identity(size), "state"))
        return Coupling(PRODUCER, links=links, params=params)

    def rewrite(self, node, removed, ctx):
        names = {t.name for t in node.outputs + state_inputs(node) if t.name}
        gone = next((idx for (name, _), idx in removed.items() if name in names and len(idx)), None)
        if gone is None:
            return
        size = hidden_size(node)
        node.attrs["hidden_size"] = size - len(gone)
        makers = {id(m): m for m in (_zeros_maker(s, node) for s in state_inputs(node)) if m is not None}
        for maker in makers.values():
            length = len(input_elements(maker, 0, ctx))
            scale_input(maker, 0, length, {length - 1: (size, size - len(gone))}, ctx)


def direction_axes(tensor: gs.Tensor, ctx: RuleContext, depth: int = 0) -> frozenset[int]:
    """Axes of ``tensor`` that are the direction axis of a bidirectional recurrent output,
    followed through Transpose and Identity. Merged with the hidden axis into features
    (``dirs*H``), the direction is a block inside each hidden unit, not a channel carrier."""
    if depth > 8 or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return frozenset()
    node = tensor.inputs[0]
    if node.op in GATES:
        layout = int(node.attrs.get("layout", 0))
        if node.attrs.get("direction", "forward") != "bidirectional":
            return frozenset()
        is_y = node.outputs[0].name == tensor.name
        return frozenset({(2 if is_y else 1) if layout else (1 if is_y else 0)})
    if node.op == "Identity":
        return direction_axes(node.inputs[0], ctx, depth + 1)
    if node.op == "Transpose":
        inner = direction_axes(node.inputs[0], ctx, depth + 1)
        perm = list(node.attrs.get("perm", []))
        return frozenset(a for a, p in enumerate(perm) if p in inner)
    return frozenset()


def state_reason(nodes: list[gs.Node], spaces: list[tuple[str, int]], inputs: set[str],
                 outputs: set[str]) -> BlockReason | None:
    """Why a group of a recurrent node's hidden units is kept when its state crosses the
    signature: a state fed in as a graph input (and returned as an output) is carried between
    calls by the caller, who allocates it at its declared width."""
    cells = [n for n in nodes if n.op in GATES]
    fed = sorted({name for name, _ in spaces if name in inputs})
    returned = sorted({name for name, _ in spaces if name in outputs})
    if not cells or not fed:
        return None
    cell = f"{cells[0].op} '{cells[0].name}'"
    quoted = ", ".join(f"'{n}'" for n in fed)
    if returned:
        back = ", ".join(f"'{n}'" for n in returned)
        message = (f"recurrent state {quoted} of {cell} is both graph input and output ({back}): the caller "
                   f"carries it between calls at its declared width, so its hidden units are kept")
    else:
        message = (f"recurrent state {quoted} of {cell} is a graph input: the caller gives it at its declared "
                   f"width, so its hidden units are kept")
    return BlockReason(BlockKind.RECURRENT_STATE, message, cells[0].name)
