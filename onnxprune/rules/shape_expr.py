"""Shapes computed at run time: what each element is made of, and how to change it safely.

Exporters build a Reshape's target from the tensor's own dimensions at run time (Shape ->
Gather/Slice -> Mul -> Unsqueeze -> Concat) so that batch and sequence stay dynamic, and put
the numbers they know (heads, head size, hidden width) beside them, as constants or as reads
of a fixed dimension. Pruning heads must change those numbers and keep the dynamic parts
dynamic. So an element is read as a product: a *static factor* (constants, and dimensions that
do not depend on the input shapes) times dynamic dimensions. Rewriting an element scales its
static factor with two small integer ops after the computed shape; the shape computation
itself is left alone (exporters share it between layers that may lose different counts).

Which dimensions are dynamic is learnt by resolving shapes a second time with every dynamic
input dimension changed; a dimension that moved depends on the input shapes.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import PASSIVE, BlockKind, Coupling, OpRule, RuleContext, blocked, register
from onnxprune.ir import np_dtype, resolve_shapes, skeleton, template_for

logger = logging.getLogger(__name__)

_INT_KINDS = "iu"
_MAX_DEPTH = 64


@dataclass(frozen=True)
class Element:
    """One element of an integer shape vector."""

    value: int    # at the analysis input shapes
    static: int   # divides the element at every input shape (the element itself when not dynamic)
    dynamic: bool

    @property
    def literal_minus_one(self) -> bool:
        return not self.dynamic and self.value == -1


def _const(value: int) -> Element:
    return Element(value, value, False)


# -- which dimensions move with the input shapes --------------------------------------------
def _alternative_input_shapes(ctx: RuleContext) -> dict[str, tuple[int, ...]] | None:
    shapes = {}
    for value in ctx.graph.inputs:
        base = ctx.shapes.get(value.name)
        if base is None:
            return None
        declared = list(value.shape or [])
        shapes[value.name] = tuple(
            d + 1 if k >= len(declared) or not isinstance(declared[k], int) or declared[k] <= 0 else d
            for k, d in enumerate(base))
    return shapes


def dynamic_axes(ctx: RuleContext) -> dict[str, set[int]] | None:
    """Axes of the tensors read by Shape nodes that change with the input shapes (cached per
    analysis), or None when the second resolution failed (then every read counts as dynamic)."""
    if "dynamic_axes" in ctx.memo:
        return ctx.memo["dynamic_axes"]["result"]

    result: dict[str, set[int]] | None = None
    wanted = {n.inputs[0].name for n in ctx.graph.nodes if n.op == "Shape" and n.inputs}
    alternative = _alternative_input_shapes(ctx)
    if alternative is not None and alternative == {t.name: ctx.shapes[t.name] for t in ctx.graph.inputs}:
        result = {name: set() for name in wanted}  # every input dimension is fixed
    elif alternative is not None:
        try:
            moved = resolve_shapes(skeleton(ctx.graph, template_for(ctx.graph)), alternative, wanted)
            result = {name: {a for a, (x, y) in enumerate(zip(ctx.shapes[name], moved[name])) if x != y}
                      for name in wanted if name in moved and name in ctx.shapes}
        except Exception as exc:  # a model that only runs at its analysis shapes: nothing is static
            logger.debug("second shape resolution failed: %s", exc)
    ctx.memo["dynamic_axes"] = {"result": result}
    return result


def _read(tensor: gs.Tensor, axis: int, ctx: RuleContext) -> Element:
    size = ctx.shape(tensor)[axis]
    dynamic = dynamic_axes(ctx)
    moves = dynamic is None or tensor.name not in dynamic or axis in dynamic[tensor.name]
    return Element(size, 1, True) if moves else _const(size)


# -- reading a shape vector -------------------------------------------------------------------
def shape_elements(tensor: gs.Tensor, ctx: RuleContext) -> list[Element] | None:
    """The elements of a 1-D (or scalar) integer tensor, or None when some op is not understood."""
    return _parse(tensor, ctx, {}, 0)


def input_elements(node: gs.Node, slot: int, ctx: RuleContext) -> list[Element] | None:
    """:func:`shape_elements` of a node's input as the analysis saw it (cached: by rewrite time
    other rules may have edited the shape computation)."""
    cache = ctx.memo.setdefault("input_elements", {})
    key = f"{node.name}:{slot}"
    if key not in cache:
        cache[key] = shape_elements(node.inputs[slot], ctx)
    return cache[key]


def _ints(tensor: gs.Tensor) -> list[int] | None:
    if not isinstance(tensor, gs.Constant) or np.asarray(tensor.values).dtype.kind not in _INT_KINDS:
        return None
    return [int(v) for v in np.asarray(tensor.values).ravel()]


def _parse(tensor, ctx, memo, depth) -> list[Element] | None:
    if tensor.name in memo:
        return memo[tensor.name]
    if depth > _MAX_DEPTH:
        return None
    memo[tensor.name] = result = _parse_node(tensor, ctx, memo, depth)
    return result


def _parse_node(tensor, ctx, memo, depth) -> list[Element] | None:
    values = _ints(tensor)
    if values is not None:
        return [_const(v) for v in values]
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]

    def sub(i):
        return _parse(node.inputs[i], ctx, memo, depth + 1) if len(node.inputs) > i and node.inputs[i].name else None

    op = node.op
    if op == "Shape":
        rank = len(ctx.shape(node.inputs[0]))
        start, end = (int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank)))
        start, end = (max(0, min(rank, s + rank if s < 0 else s)) for s in (start, end))
        return [_read(node.inputs[0], a, ctx) for a in range(start, end)]
    if op in ("Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        return sub(0)
    if op == "Cast":
        to = np_dtype(node.attrs["to"])
        return sub(0) if np.dtype(to).kind in _INT_KINDS else None
    if op == "Concat":
        parts = [_parse(t, ctx, memo, depth + 1) for t in node.inputs]
        return None if any(p is None for p in parts) else list(itertools.chain.from_iterable(parts))
    if op == "Gather":
        data, index = sub(0), _ints(node.inputs[1])
        if data is None or index is None or int(node.attrs.get("axis", 0)) != 0:
            return None
        return [data[i] for i in index]
    if op == "Slice":
        return _slice(node, sub(0))
    if op == "ConstantOfShape":
        count = sub(0)
        if count is None or any(e.dynamic for e in count):
            return None
        fill = node.attrs.get("value")
        fill = np.asarray(fill.values if isinstance(fill, gs.Constant) else (0 if fill is None else fill)).ravel()
        return [_const(int(fill[0]))] * int(np.prod([e.value for e in count]))
    if op in _BINARY:
        a, b = sub(0), sub(1)
        if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
            return None
        n = max(len(a), len(b))
        return [_BINARY[op](a[i % len(a)], b[i % len(b)]) for i in range(n)]
    if op == "Where":
        cond, a, b = sub(0), sub(1), sub(2)
        if cond is None or a is None or b is None:
            return None
        n = max(len(cond), len(a), len(b))
        out = []
        for i in range(n):
            c, x, y = cond[i % len(cond)], a[i % len(a)], b[i % len(b)]
            chosen = x if c.value else y
            out.append(chosen if not c.dynamic else Element(chosen.value, 1, True))
        return out
    return None


def _slice(node, data: list[Element] | None) -> list[Element] | None:
    bounds = [_ints(t) if t.name else None for t in node.inputs[1:]]
    if data is None or len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
        return None
    if len(bounds) > 2 and bounds[2] is not None and bounds[2] != [0] and bounds[2] != [-1]:
        return None
    step = bounds[3][0] if len(bounds) > 3 and bounds[3] is not None else 1
    n = len(data)
    start, end = bounds[0][0], bounds[1][0]
    start = max(-1 if step < 0 else 0, min(n, start + n if start < 0 else start))
    end = max(-1, min(n, end + n if end < 0 else end))
    return [data[i] for i in range(start, end, step) if 0 <= i < n]


def _trunc_div(a: int, b: int) -> int:
    return 0 if b == 0 else (abs(a) // abs(b)) * (1 if (a >= 0) == (b > 0) else -1)


def _mul(a: Element, b: Element) -> Element:
    return Element(a.value * b.value, a.static * b.static, a.dynamic or b.dynamic)


def _div(a: Element, b: Element) -> Element:
    value = _trunc_div(a.value, b.value)
    if not a.dynamic and not b.dynamic:
        return _const(value)
    if not b.dynamic and b.value and a.static % b.value == 0:
        return Element(value, a.static // b.value, True)
    return Element(value, 1, True)


def _combine(fn):
    def op(a: Element, b: Element) -> Element:
        value = int(fn(a.value, b.value))
        return _const(value) if not (a.dynamic or b.dynamic) else Element(value, 1, True)
    return op


_BINARY = {"Mul": _mul, "Div": _div, "Add": _combine(lambda a, b: a + b), "Sub": _combine(lambda a, b: a - b),
           "Mod": _combine(lambda a, b: a % b if b else 0), "Max": _combine(max), "Min": _combine(min),
           "Equal": _combine(lambda a, b: a == b)}


def element_source(tensor: gs.Tensor, position: int, ctx: RuleContext, depth: int = 0) -> tuple[str, int] | None:
    """Where element ``position`` of an integer shape vector comes from: ``(tensor, axis)`` when
    it is one dimension read by a Shape (through Concat, Slice, Gather, Cast, Identity and
    Squeeze/Unsqueeze), else None (a constant, arithmetic, an op not followed)."""
    if depth > _MAX_DEPTH or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return None
    node, op = tensor.inputs[0], tensor.inputs[0].op
    if op == "Shape":
        start, end = _shape_range(node, len(ctx.shape(node.inputs[0])))
        return (node.inputs[0].name, start + position) if start + position < end else None
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return element_source(node.inputs[0], position, ctx, depth + 1)
    if op == "Concat":
        offset = 0
        for part in node.inputs:
            shape = ctx.shape(part)
            if shape is None:
                return None
            n = int(np.prod(shape)) if shape else 1
            if position < offset + n:
                return element_source(part, position - offset, ctx, depth + 1)
            offset += n
        return None
    data_shape = ctx.shape(node.inputs[0]) if node.inputs else None
    length = data_shape[0] if data_shape else 1
    if op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and _ints(node.inputs[1]) is not None:
        index = _ints(node.inputs[1])
        return element_source(node.inputs[0], index[position] % length, ctx, depth + 1) if position < len(index) else None
    if op == "Slice":
        picked = _slice(node, [Element(i, i, False) for i in range(length)])
        if picked is None or position >= len(picked):
            return None
        return element_source(node.inputs[0], picked[position].value, ctx, depth + 1)
    return None


# -- rewriting ----------------------------------------------------------------------------------
# New tensors are named after the node they serve: node names are unique (NameNodes) and each
# node is rewritten once.


def scale_input(node: gs.Node, slot: int, length: int, scale: dict[int, tuple[int, int]], ctx: RuleContext) -> None:
    """Input ``slot`` of ``node`` (an int64 vector of ``length``) becomes ``x * num // den``
    elementwise, with ``scale[i] = (den, num)`` and 1 elsewhere: exact because ``den`` is a
    static factor of element ``i``."""
    num, den = np.ones(length, np.int64), np.ones(length, np.int64)
    for i, (old, new) in scale.items():
        g = int(np.gcd(old, new)) or 1
        num[i], den[i] = new // g, old // g
    base = f"{node.name}_pruned_shape"
    scaled = gs.Variable(base + "_mul", dtype=np.int64, shape=[length])
    result = gs.Variable(base, dtype=np.int64, shape=[length])
    ctx.graph.nodes.append(gs.Node("Mul", base + "_Mul", inputs=[node.inputs[slot], gs.Constant(base + "_num", num)],
                                   outputs=[scaled]))
    ctx.graph.nodes.append(gs.Node("Div", base + "_Div", inputs=[scaled, gs.Constant(base + "_den", den)],
                                   outputs=[result]))
    node.inputs[slot] = result


def freeze_output(node: gs.Node, frozen: dict[int, int], ctx: RuleContext) -> None:
    """Elements ``frozen`` of ``node``'s vector output keep their analysis values whatever the
    input: ``out = read * mask + frozen``. A read of a pruned dimension then keeps meaning what it
    meant to the shapes and scales computed from it; the Reshapes that must follow the pruning
    correct their own targets."""
    out = node.outputs[0]
    length = ctx.shape(out)[0]
    mask, values = np.ones(length, np.int64), np.zeros(length, np.int64)
    for i, v in frozen.items():
        mask[i], values[i] = 0, v
    base = f"{node.name}_frozen"
    raw = gs.Variable(base + "_read", dtype=np.int64, shape=[length])
    masked = gs.Variable(base + "_masked", dtype=np.int64, shape=[length])
    node.outputs[0] = raw
    ctx.graph.nodes.append(gs.Node("Mul", base + "_Mul", inputs=[raw, gs.Constant(base + "_mask", mask)],
                                   outputs=[masked]))
    ctx.graph.nodes.append(gs.Node("Add", base + "_Add", inputs=[masked, gs.Constant(base + "_values", values)],
                                   outputs=[out]))


# -- the Shape op -------------------------------------------------------------------------------
#: Integer ops a read dimension may flow through while it is still shape arithmetic.
_ARITHMETIC = {"Mul", "Div", "Add", "Sub", "Mod", "Max", "Min", "Equal", "Where", "Neg", "Abs"}


def _read_problem(tensor: gs.Tensor, position: int | None, ctx: RuleContext, depth: int = 0,
                  live: list | None = None) -> str | None:
    """Why the read dimension at ``position`` of the integer vector ``tensor`` cannot be frozen
    (None: it only reaches Reshape targets, which correct themselves, or becomes a float such
    as an attention scale, which must keep its value). ``position`` None: somewhere in it.
    A read that reaches a Resize's sizes at the very axis it was read from, of the tensor it
    was read from (``F.interpolate(x, size=...)`` keeps x's channel count so), follows the
    pruning by itself: it is recorded in ``live`` instead, and must not be frozen."""
    if depth > _MAX_DEPTH:
        return "its use is too far to follow"
    for user in tensor.outputs:
        slot = next(i for i, t in enumerate(user.inputs) if t.name == tensor.name)
        op, nxt = user.op, position
        if (op == "Reshape" and slot == 1) or op == "Shape":  # a target corrected by its Reshape; a length
            if live is not None and op == "Reshape":
                live.append("frozen")
            continue
        if op == "Resize" and slot == 3 and position is not None and live is not None \
                and element_source(tensor, position, ctx) == (user.inputs[0].name, position):
            live.append("live")
            continue
        if (op in ("Slice", "Split") and slot >= 1) or (op == "Cast" and np_dtype(user.attrs["to"]).kind not in _INT_KINDS):
            if live is not None:  # bounds: constants again once their axis is pruned; a float keeps its value
                live.append("frozen")
            continue
        if op == "Gather" and slot == 0 and _ints(user.inputs[1]) is not None:
            index = _ints(user.inputs[1])
            length = ctx.shape(tensor)[0] if ctx.shape(tensor) else 1
            index = [i % length for i in index]
            if position is not None and position not in index:
                continue
            nxt = index.index(position) if position is not None else None
        elif op == "Slice" and slot == 0:
            length = ctx.shape(tensor)[0] if ctx.shape(tensor) else 1
            picked = _slice(user, [Element(i, i, False) for i in range(length)])
            if picked is None:
                nxt = None
            else:
                kept = [e.value for e in picked]
                if position is not None and position not in kept:
                    continue
                nxt = kept.index(position) if position is not None else None
        elif op == "Concat":
            before = user.inputs[:slot]
            lengths = [ctx.shape(t)[0] if ctx.shape(t) else None for t in before]
            nxt = None if position is None or None in lengths else position + sum(lengths)
        elif op in ("Identity", "Unsqueeze", "Squeeze", "Cast") and slot == 0:
            pass
        elif op == "Reshape" and slot == 0:
            nxt = None if len(ctx.shape(user.outputs[0]) or ()) > 1 else position
        elif op in _ARITHMETIC:
            lengths = {len(ctx.shape(t) or ()) and ctx.shape(t)[0] for t in user.inputs}
            nxt = position if len(lengths) == 1 else None
        else:
            return f"{op} '{user.name}' uses it"
        problem = _read_problem(user.outputs[0], nxt, ctx, depth + 1, live)
        if problem is not None:
            return problem
    return None


def _shape_range(node: gs.Node, rank: int) -> tuple[int, int]:
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    return tuple(max(0, min(rank, s + rank if s < 0 else s)) for s in (start, end))


@register("Shape")
class ShapeRule(OpRule):
    """Reading dimensions is harmless unless the pruned one is read. A read of it that only
    feeds shape arithmetic ending in Reshape targets, or becomes a float (an attention scale
    1/sqrt(D)), is frozen at its analysis value when that dimension is pruned; any other use
    (Expand, Range, ConstantOfShape, Slice bounds) blocks."""

    def couple(self, node, tensor, axis, ctx):
        start, end = _shape_range(node, len(ctx.shape(tensor)))
        if not start <= axis < end:
            return Coupling(PASSIVE)
        uses: list[str] = []
        problem = _read_problem(node.outputs[0], axis - start, ctx, live=uses)
        if problem is None and "live" in uses and "frozen" in uses:
            problem = "it sizes a Resize of the same tensor and a Reshape target"
        if problem is not None:
            return blocked(BlockKind.RUNTIME_SHAPE, node,
                           f"Shape '{node.name}' lets the channel count be read at run time ({problem})")
        if "live" in uses:
            ctx.memo.setdefault("live_reads", {})[(node.name, axis)] = True
        return Coupling(PASSIVE)

    def rewrite(self, node, removed, ctx):
        x = node.inputs[0]
        start, end = _shape_range(node, len(ctx.shape(x)))
        live = ctx.memo.get("live_reads", {})
        frozen = {axis - start: ctx.shape(x)[axis] for (name, axis), gone in removed.items()
                  if name == x.name and start <= axis < end and len(gone) and (node.name, axis) not in live}
        if frozen:
            freeze_output(node, frozen, ctx)
