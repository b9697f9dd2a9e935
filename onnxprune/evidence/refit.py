"""Linear layers of the pruned model re-fitted to the original's, layer after layer.

Compensation decides each removal as if everything upstream were intact: a consumer's weights
absorb what a removed channel carried, estimated from the kept channels on the *original*
model's activations. Upstream removals move those activations too, and the errors add up
with depth. Here every linear layer (Conv, grouped and depthwise included, Gemm, and a
MatMul with a constant weight and an Add for its bias: a transformer's Linear) is re-fitted,
in dependency order, to what the original layer computes, from what the pruned model
actually feeds it on the planning inputs:

    X_orig ≈ A X_pruned + c          (per input-channel block, a ridge fit)
    W' = W_orig[kept outputs] ∘ A,   b' = b_orig[kept outputs] + W_orig ∘ c

``A`` maps the pruned layer's input channels onto every original input channel (the kept
ones and the removed ones alike) and is pulled towards plain selection by a small ridge
(:data:`RIDGE`); for a 1x1 convolution or a Gemm it is the least-squares fit of the
original layer's output, for a larger kernel its channel part. A grouped convolution fits
one block per group, a depthwise one a scale and shift per channel. The layers a level
above have re-fitted feed the next level, so each layer corrects what reaches it. This is
the layer-wise reconstruction of channel pruning with data (He et al., 2017; ThiNet) run on
the inversion's inputs, and it subsumes a BatchNorm's statistics after a re-fitted layer
(:mod:`onnxprune.evidence.recalibration` re-estimates only the others).

Run where the planning inputs stand for real ones (the same gate as the BatchNorm
re-estimation: a calibration set, or an inversion that gives the original model its running
statistics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.evidence.recalibration import dependency_levels, in_runs, reading_session
from onnxprune.ir import Model

logger = logging.getLogger(__name__)

#: Ridge towards plain selection, relative to the mean variance of the pruned layer's input
#: channels. Measured on `models/` only (MobileNet, DenseNet at macs=0.35, seeds 1 and 2):
#: 1e-3 and 1e-2 within a point of each other, 1e-1 one to two points lower.
RIDGE = 1e-2
#: Input channels a block may have: a wider one (a Gemm on a flattened 7x7x512 map reads
#: 25088) would hold a float64 system of its width squared; it is left as compensation made
#: it, and the BatchNorm after it re-estimated.
MAX_WIDTH = 2048


@dataclass
class _Layer:
    """One layer to re-fit: its node in the pruned graph and in the original, the original
    input channels each block of the pruned input keeps, and the original outputs kept."""

    node: gs.Node
    original: gs.Node
    blocks: list[tuple[np.ndarray, np.ndarray]]  # (original channels of the block, kept ones among them)
    kept_out: np.ndarray
    out_block: np.ndarray  # per kept output, its block (an index into ``blocks``)
    axis: int = 1  # the input's channel axis (a MatMul's last)

    @property
    def reads(self) -> str:
        return self.node.inputs[0].name


def _stored_in_out(node: gs.Node) -> bool:
    """Whether ``node`` stores its weight as [in, out]: a MatMul always, a Gemm without transB."""
    return node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0))


def _weight(node: gs.Node) -> np.ndarray:
    """The weight as [out, in, *kernel] (transposed where stored [in, out])."""
    w = node.inputs[1].values
    return w.T if _stored_in_out(node) else w


def _bias_site(node: gs.Node) -> tuple[gs.Node, int] | None:
    """Where ``node``'s bias is: its own third input (Conv, Gemm), or for a MatMul the constant
    term of the Add that alone reads its output (a Linear as exporters write it). None where it
    has none."""
    if node.op != "MatMul":
        return (node, 2) if len(node.inputs) > 2 else None
    readers = node.outputs[0].outputs
    if len(readers) != 1 or readers[0].op != "Add" or len(readers[0].inputs) != 2:
        return None
    add = readers[0]
    k = 1 - add.inputs.index(node.outputs[0])
    return (add, k) if isinstance(add.inputs[k], gs.Constant) and add.inputs[k].values.ndim >= 1 else None


def _bias(node: gs.Node, outputs: int) -> np.ndarray | None:
    """``node``'s bias as [outputs] float64: zeros for a Conv or Gemm without one; None where it
    is not a constant of that size (or a MatMul has no Add to carry one)."""
    site = _bias_site(node)
    if site is None:
        return None if node.op == "MatMul" else np.zeros(outputs)
    holder, k = site
    if not isinstance(holder.inputs[k], gs.Constant):
        return None
    values = holder.inputs[k].values
    if node.op == "MatMul" and (values.shape[-1] != outputs or values.size != outputs):
        return None  # a MatMul's Add must add one value per output, on the last axis
    b = values.astype(np.float64).reshape(-1)  # a Gemm's may be [1, out]
    return np.resize(b, outputs) if b.size in (1, outputs) else None


def _layer(node: gs.Node, original: gs.Node, removed: dict, shapes: dict) -> _Layer | None:
    """What re-fitting ``node`` needs, or None where its form is not one this module fits."""
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
        return None
    w0, w = _weight(original), _weight(node)
    if w0.ndim != w.ndim or node.inputs[0].name != original.inputs[0].name \
            or node.outputs[0].name != original.outputs[0].name:
        return None
    axis = 1
    if node.op == "MatMul":  # x [..., in] @ W [in, out]: channels on the input's last axis
        rank = len(shapes.get(original.inputs[0].name) or original.inputs[0].shape or ())
        if w.ndim != 2 or rank < 2 or _bias(node, w.shape[0]) is None:
            return None
        axis = rank - 1
    groups = int(original.attrs.get("group", 1)) if node.op == "Conv" else 1
    outputs, per_group = w0.shape[0], w0.shape[1]
    if outputs % groups or per_group > MAX_WIDTH:
        return None
    gone_in = removed.get((original.inputs[0].name, axis), np.zeros(0, np.int64))
    gone_out = removed.get((original.outputs[0].name, axis), np.zeros(0, np.int64))
    kept_in = np.setdiff1d(np.arange(groups * per_group), gone_in)
    kept_out = np.setdiff1d(np.arange(outputs), gone_out)
    blocks, index = [], {}
    for g in range(groups):
        channels = np.arange(g * per_group, (g + 1) * per_group)
        kept = kept_in[(kept_in >= channels[0]) & (kept_in <= channels[-1])]
        if len(kept):
            index[g] = len(blocks)
            blocks.append((channels, kept))
    out_groups = kept_out // (outputs // groups)
    if any(g not in index for g in np.unique(out_groups)) or len(kept_out) != w.shape[0] \
            or {len(kept) for _, kept in blocks} != {w.shape[1]} or _bias(original, outputs) is None:
        return None
    return _Layer(node, original, blocks, kept_out, np.array([index[g] for g in out_groups], np.int64), axis)


def layers(graph: gs.Graph, original: gs.Graph, removed: dict, shapes: dict | None = None) -> list[_Layer]:
    """The Conv, Gemm and MatMul nodes of ``graph`` (pruned from ``original``, whose removed
    indices per space are ``removed``; ``shapes``: tensor shapes by name, where the graph's own
    are not inferred: a MatMul's input rank says its channel axis) with constant weights that
    can be re-fitted."""
    by_name = {n.name: n for n in original.nodes}
    found = []
    for node in graph.nodes:
        twin = by_name.get(node.name)
        if node.op not in ("Conv", "Gemm", "MatMul") or twin is None or twin.op != node.op \
                or not all(isinstance(n.inputs[1], gs.Constant) for n in (node, twin)):
            continue
        layer = _layer(node, twin, removed, shapes or {})
        if layer is not None:
            found.append(layer)
    return found


class _Moments:
    """Sums for one layer's block fits, every block at once (blocks hold as many original
    channels, and as many kept ones, each): the original channels' and the pruned ones' sums
    and their cross- and auto-products, per block."""

    def __init__(self, layer: _Layer):
        self.layer = layer
        self.channels = np.concatenate([channels for channels, _ in layer.blocks])
        self.n = 0
        self.sums = None

    def add(self, x_orig: np.ndarray, x_pruned: np.ndarray) -> None:
        blocks = len(self.layer.blocks)
        axis = self.layer.axis
        a = _rows(x_orig, axis)[:, self.channels].reshape(-1, blocks, len(self.channels) // blocks).transpose(1, 0, 2)
        b = _rows(x_pruned, axis).reshape(len(a[0]), blocks, -1).transpose(1, 0, 2)  # [block, rows, kept]
        bt = b.transpose(0, 2, 1)
        found = (a.sum(1), b.sum(1), a.transpose(0, 2, 1) @ b, bt @ b)
        self.sums = found if self.sums is None else tuple(s + f for s, f in zip(self.sums, found))
        self.n += a.shape[1]

    def fit(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The re-fitted weight (stored layout) and bias, or None where the sums are not finite."""
        layer = self.layer
        w0 = _weight(layer.original).astype(np.float64)
        bias = _bias(layer.original, w0.shape[0])
        maps = []
        for (channels, kept), sa, sb, sab, sbb in zip(layer.blocks, *self.sums):
            ma, mb = sa / self.n, sb / self.n
            cab = sab / self.n - np.outer(ma, mb)
            cbb = sbb / self.n - np.outer(mb, mb)
            scale = np.trace(cbb) / len(cbb)
            if not np.isfinite(scale):
                return None
            select = (channels[:, None] == kept[None, :]).astype(np.float64)  # [block, kept]
            ridge = RIDGE * scale if scale > 0 else 1.0  # constant inputs: selection, the shift fitted
            a = np.linalg.solve(cbb + ridge * np.eye(len(cbb)), (cab + ridge * select).T).T
            maps.append((a, ma - a @ mb))
        rows = w0[layer.kept_out]  # [O', block, *kernel]
        new_w = np.empty((len(rows), len(layer.blocks[0][1]), *rows.shape[2:]))
        new_b = bias[layer.kept_out].copy()
        for k, (a, c) in enumerate(maps):
            mine = layer.out_block == k
            new_w[mine] = np.einsum("oi...,ij->oj...", rows[mine], a)
            new_b[mine] += rows[mine].reshape(int(mine.sum()), len(c), -1).sum(axis=2) @ c
        stored = layer.node.inputs[1].values
        if _stored_in_out(layer.node):
            new_w = new_w.T
        return new_w.astype(stored.dtype), new_b.astype(stored.dtype)


def _rows(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Channels on ``axis`` ([N, C, ...], or [N, ..., C] for a MatMul's input) as
    [samples * positions, C] in float64."""
    x = x.astype(np.float64)
    return x if x.ndim == 2 and axis == 1 else np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def refit(graph: gs.Graph, original: gs.Graph, template: Model, inputs: dict[str, np.ndarray], removed: dict,
          batch: int = 1, shapes: dict | None = None) -> set[str]:
    """In place: re-fit the linear layers of ``graph`` (toposorted; pruned from ``original``,
    ``removed`` its removed indices per space) to the original's outputs on ``inputs``, a
    level of layers at a time. Returns the names of the re-fitted nodes (none, and ``graph``
    untouched, where the models do not run the inputs in chunks)."""
    found = layers(graph, original, removed, shapes)
    if not found:
        return set()
    try:
        fitted = _fit_levels(graph, original, template, inputs, batch, found)
    except Exception as exc:  # noqa: BLE001 - a model that does not run the inputs in chunks: leave it
        logger.info("layers not re-fitted: %s", str(exc).splitlines()[0])
        return set()
    for layer in found:
        if layer.node.name not in fitted:
            continue
        w, b = fitted[layer.node.name]
        node = layer.node
        node.inputs[1] = gs.Constant(f"{node.name}_refit_weight", w)
        if _bias_site(node) is not None or node.outputs[0] in graph.outputs or not _into_batchnorm(node, b):
            _set_bias(node, gs.Constant(f"{node.name}_refit_bias", b.reshape(_bias_shape(node, len(b)))))
    return set(fitted)


def _bias_shape(node: gs.Node, outputs: int) -> tuple[int, ...]:
    """The shape ``node``'s bias is stored in (a MatMul's Add may hold [1, 1, out])."""
    site = _bias_site(node)
    return tuple(site[0].inputs[site[1]].shape) if node.op == "MatMul" and site is not None else (outputs,)


def _set_bias(node: gs.Node, tensor: gs.Tensor) -> None:
    """``tensor`` in place of ``node``'s bias (appended to a Conv or Gemm that had none)."""
    site = _bias_site(node)
    if site is None:
        node.inputs.append(tensor)
    else:
        site[0].inputs[site[1]] = tensor


def _into_batchnorm(node: gs.Node, bias: np.ndarray) -> bool:
    """Fold a new ``bias`` of a layer that had none into the BatchNorm that alone reads its
    output (``BN(x + b)`` is ``BN(x)`` with running mean ``mean - b``): the pruned model keeps
    its parameter count and its layers' form. False where no such BatchNorm follows."""
    readers = node.outputs[0].outputs
    if len(readers) != 1 or readers[0].op != "BatchNormalization" or readers[0].inputs[0] is not node.outputs[0]:
        return False
    bn = readers[0]
    if len(bn.inputs) < 5 or not isinstance(bn.inputs[3], gs.Constant) or bn.inputs[3].values.shape != bias.shape:
        return False
    mean = bn.inputs[3].values
    bn.inputs[3] = gs.Constant(f"{bn.name}_refit_mean", (mean.astype(np.float64) - bias).astype(mean.dtype))
    return True


def _fit_levels(graph, original, template, inputs, batch, found: list[_Layer]) -> dict[str, tuple]:
    """Each layer's new weight and bias; one session per model, the pruned one with the
    layers' weights and biases as inputs (fed the re-fitted values once their level is done)."""
    g = graph.copy()
    twins = {n.name: n for n in g.nodes}
    feeds: dict[str, np.ndarray] = {}
    for k, layer in enumerate(found):
        twin = twins[layer.node.name]
        w = layer.node.inputs[1].values
        twin.inputs[1] = gs.Variable(f"onnxprune_refit_w{k}", dtype=w.dtype, shape=list(w.shape))
        feeds[twin.inputs[1].name] = w
        shape = _bias_shape(layer.node, len(layer.kept_out))
        b = _bias(layer.node, len(layer.kept_out)).astype(w.dtype).reshape(shape)
        variable = gs.Variable(f"onnxprune_refit_b{k}", dtype=w.dtype, shape=list(shape))
        _set_bias(twin, variable)
        feeds[variable.name] = b
        g.inputs.extend([twin.inputs[1], variable])
    read = [layer.reads for layer in found if layer.reads not in inputs]  # a graph input is fed, not run
    pruned, reference = reading_session(g, template, read), reading_session(original.copy(), template, read)
    fitted = {}
    index = {id(layer.node): k for k, layer in enumerate(found)}
    by_node = {id(layer.node): layer for layer in found}
    for level in dependency_levels(graph, [layer.node for layer in found]):
        todo = [by_node[id(node)] for node in level]
        names = sorted({layer.reads for layer in todo} - set(inputs))
        sums = {layer.node.name: _Moments(layer) for layer in todo}
        for run in in_runs(inputs, batch):
            want = {**run, **dict(zip(names, reference.run(names, run)))} if names else run
            got = {**run, **dict(zip(names, pruned.run(names, {**run, **feeds})))} if names else run
            for layer in todo:
                sums[layer.node.name].add(want[layer.reads], got[layer.reads])
        for layer in todo:
            new = sums[layer.node.name].fit()
            if new is None:
                continue
            fitted[layer.node.name] = new
            k = index[id(layer.node)]
            feeds[f"onnxprune_refit_w{k}"] = new[0]
            feeds[f"onnxprune_refit_b{k}"] = new[1].reshape(feeds[f"onnxprune_refit_b{k}"].shape)
    return fitted

