"""Reconstruction: compensate, in the kept weights, for what removed channels contributed.

Three data-free corrections, applied at every consumer of a removed unit ``u``:

- **merge** (Srinivas & Babu; Neuron Merging): if ``u`` was found to behave like a kept unit
  ``v`` scaled by ``s``, the consumer's weights for ``v`` absorb ``s`` times those for ``u``;
- **bias**: what is left, ``u - s*v``, is replaced by its expected value (from
  :mod:`onnxprune.evidence.priors`): ``W_u * (mean_u - s*mean_v)`` moves into the consumer's bias;
- **variance**: a BatchNorm downstream of the consumer normalised by a variance that included
  ``u``'s share, ``W_u**2 * var(u - s*v)``; that share is taken out of its running variance so
  the next layer sees activations at the scale it was trained on.

With ``plan.reconstruction == "least-squares"`` the merge generalises from one look-alike to
every channel that stays: the removed channels' consumer weights are spread over the kept
channels by the linear estimate of the removed ones from the kept ones
(:mod:`onnxprune.evidence.statistics`), fitted on synthetic inputs run through the graph as it is at
that step; what the estimate cannot explain goes into the bias (mean) and the downstream
BatchNorm (variance) as above.

Corrections are computed in the plan's step order, so a progressive method that computes them
step by step and a saved plan replayed later give the same weights. They are data
(:class:`~onnxprune.plan.Corrections`): the analysed graph is read, never written; the
rewriter puts them in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import CONSUMER, ParamSlice
from onnxprune.depgraph import ChannelGroup, DependencyGraph
from onnxprune.evidence.priors import MomentPropagation
from onnxprune.evidence.probes import consumer_nodes
from onnxprune.evidence.statistics import ChannelStats
from onnxprune.plan import Corrections, PruningPlan

logger = logging.getLogger(__name__)

_LINEAR_PASSTHROUGH = {"Identity", "Dropout", "Add", "Sum", "Concat"}


def _consumer_weight(coupling) -> ParamSlice | None:
    return next((p for p in coupling.params if p.kind == "weight"), None)


def _bias(node: gs.Node, outputs: int) -> tuple[gs.Constant | None, float] | None:
    """Where the consumer's bias lives and its multiplier: ``(constant, factor)``,
    ``(None, factor)`` for a Conv or Gemm without one (reconstruction gives it one), or None
    when nothing can take a shift."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None and not isinstance(bias, gs.Constant):
            return None
        if node.op == "Gemm":
            beta, alpha = float(node.attrs.get("beta", 1.0)), float(node.attrs.get("alpha", 1.0))
            return bias, alpha / beta if beta else 0.0
        return bias, 1.0
    if node.op == "MatMul":  # exporters put the bias in an Add right after
        for user in node.outputs[0].outputs:
            if user.op == "Add":
                const = next((t for t in user.inputs if isinstance(t, gs.Constant)), None)
                if const is not None and np.asarray(const.values).shape[-1:] == (outputs,):
                    return const, 1.0
    return None


def _downstream_norm(node: gs.Node, rows: np.ndarray, shapes: dict) -> list[tuple[gs.Node, np.ndarray]]:
    """BatchNorms that normalise the consumer's output linearly (through Concat offsets,
    residual sums, Identity), with the channel each consumer output row lands on."""
    found, frontier = [], [(node.outputs[0], rows)]
    for _ in range(8):
        nxt = []
        for tensor, channels in frontier:
            for user in tensor.outputs:
                if user.op == "BatchNormalization" and user.inputs[0] is tensor:
                    found.append((user, channels))
                elif user.op in _LINEAR_PASSTHROUGH:
                    offset = 0
                    if user.op == "Concat":
                        for t in user.inputs:
                            if t is tensor:
                                break
                            offset += shapes[t.name][1]
                    nxt.append((user.outputs[0], channels + offset))
        frontier = nxt
    return found


#: ``(spaces, ridges) -> stats``: measures ``spaces`` on the graph as it is now; a space's ridge is
#: taken from ``ridges`` or chosen and added there.
Statistics = Callable[[list[tuple[str, int]], dict], dict[tuple[str, int], ChannelStats]]


def consumer_spaces(*groups: ChannelGroup) -> list[tuple[str, int]]:
    """The tensors (and channel axes) the groups' consumers read, in a fixed order."""
    return sorted({space for g in groups for space in consumer_nodes(g)})


def removed_atoms(dep: DependencyGraph, plan: PruningPlan, through: int) -> dict[str, set[int]]:
    """Per consumer tensor, the channels the plan removes at steps ``<= through``, every group."""
    gone: dict[str, set[int]] = {}
    for gp in plan.groups:
        units = {unit for step, unit, *_ in gp.entries() if step <= through}
        if not units:
            continue
        group = dep.groups[gp.group]
        for space in consumer_spaces(group):
            local, unit = group.atoms[space]
            gone.setdefault(space[0], set()).update(local[np.isin(unit, list(units))].tolist())
    return gone


class Reconstructor:
    """Applies a plan's compensation to a lowered graph, in step order.

    ``statistics`` measures channel statistics on the graph as it is now; plans asking for
    least-squares reconstruction need it. The ridge of every space in ``spaces`` (and of those
    the first measurement asks for) is chosen on the first measurement, on the unpruned graph,
    so that planning and a replay of the plan fit with the same ridges."""

    def __init__(self, dep: DependencyGraph, moments: MomentPropagation, variance: bool = True,
                 statistics: Statistics | None = None, spaces: list[tuple[str, int]] = (),
                 corrections: Corrections | None = None):
        self.dep = dep
        self.corrections = corrections if corrections is not None else Corrections()
        self.moments = moments
        self.variance = variance
        self.shapes = dep.ctx.shapes
        self.statistics = statistics
        self.spaces = list(spaces)
        self._cache: tuple[int, dict] | None = None
        self._ridges: dict | None = None

    @classmethod
    def for_analysis(cls, analysis, groups: list[ChannelGroup], seed: int) -> Reconstructor:
        """A reconstructor of ``groups`` whose statistics are measured on ``analysis``'s
        synthetic inputs of ``seed``, on the graph with its own corrections so far."""
        reconstructor = cls(analysis.dep, analysis.moments, spaces=consumer_spaces(*groups))
        reconstructor.statistics = lambda spaces, ridges: analysis.statistics(
            spaces, seed, ridges, corrections=reconstructor.corrections)
        return reconstructor

    def stats(self, step: int, spaces: list[tuple[str, int]]) -> dict[tuple[str, int], ChannelStats]:
        """Statistics of ``spaces`` before ``step`` is applied (measured once per step)."""
        assert self.statistics is not None
        have = self._cache[1] if self._cache and self._cache[0] == step else {}
        missing = [s for s in spaces if s not in have]
        if self._ridges is None:  # first measurement: every ridge, on the unpruned graph
            self._ridges = {}
            missing = sorted(set(missing) | set(self.spaces))
        if missing:
            have = {**have, **self.statistics(missing, self._ridges)}
        self._cache = (step, have)
        return have

    def apply(self, plan: PruningPlan, steps: set[int] | None = None, zero_removed: bool = False) -> Corrections:
        """Add the plan's compensation (of ``steps``, default all) to :attr:`corrections` and
        return them. Step by step, group by group in plan order: a progressive method computing
        each step as it goes and a saved plan replayed at once add the same numbers in the same
        order."""
        batches: dict[tuple[int, int], list] = {}
        for k, gp in enumerate(plan.groups):
            for step, unit, into, scale, corr in gp.entries():
                if steps is None or step in steps:
                    batches.setdefault((step, k), []).append((unit, into, scale, corr))
        if plan.reconstruction == "least-squares":
            if self.statistics is None:
                raise ValueError("least-squares reconstruction needs channel statistics")
            for step in sorted({s for s, _ in batches}):
                keys = [key for key in sorted(batches) if key[0] == step]
                groups = [self.dep.groups[plan.groups[k].group] for _, k in keys]
                stats = self.stats(step, consumer_spaces(*groups))
                gone = removed_atoms(self.dep, plan, step)
                for g, key in zip(groups, keys):
                    self._least_squares(g, [e[0] for e in batches[key]], stats, gone)
                self._cache = None  # the weights changed: the next step measures again
            return self.corrections
        for (_, k), entries in sorted(batches.items()):
            self._compensate(self.dep.groups[plan.groups[k].group], entries, zero_removed)
        return self.corrections

    def _least_squares(self, group: ChannelGroup, units: list[int], stats: dict, gone: dict[str, set[int]]) -> None:
        """Every consumer of ``group`` absorbs the least-squares estimate of ``units`` from the
        channels its input keeps; removed columns are zeroed (later steps measure without them)."""
        for member in group.members:
            if member.coupling.role != CONSUMER or member.space[1] <= 0:
                continue
            p = _consumer_weight(member.coupling)
            if p is None:
                continue
            tensor, _ = member.space
            st = stats[member.space]
            local, unit = group.atoms[member.space]
            removed = np.sort(local[np.isin(unit, units)])
            values = np.array(self.corrections.read(p.tensor), dtype=np.float64, copy=True)
            to_param = np.full(len(st.mean), -1, dtype=np.int64)
            to_param[p.space] = p.param
            dead = gone.get(tensor, set())
            live = np.array([c for c in range(len(st.mean)) if c not in dead and to_param[c] >= 0], dtype=np.int64)
            outputs = values.shape[0] if p.groups > 1 else p.columns(values, 0)[0].shape[0]
            shift, drop = np.zeros(outputs), np.zeros(outputs)
            if p.groups > 1:  # each conv group reads its own channels: estimate within the block
                removed_block, live_block = p.block_of(to_param[removed]), p.block_of(to_param[live])
                blocks = [(removed[removed_block == b], live[live_block == b]) for b in np.unique(removed_block)]
            else:
                blocks = [(removed, live)]
            for rem, keep in blocks:
                b, residual = st.estimator(rem, keep)
                for i, atom in enumerate(rem):
                    col, rows = p.columns(values, int(to_param[atom]))
                    shift[rows] += col.sum(axis=1) * (st.mean[atom] - b[i] @ st.mean[keep])
                    drop[rows] += (col**2).sum(axis=1) * residual[i]
                if p.groups > 1:
                    for i, atom in enumerate(rem):
                        for j, kept in enumerate(keep):
                            p.add_columns(values, int(to_param[kept]), int(to_param[atom]), float(b[i, j]))
                elif len(keep):
                    moved = np.moveaxis(values, p.axis, 0)  # a view: [channels, ...]
                    moved[to_param[keep]] += np.tensordot(b.T, moved[to_param[rem]], axes=(1, 0))
            for atom in removed:
                p.add_columns(values, int(to_param[atom]), int(to_param[atom]), -1.0)
            self.corrections.write(p.tensor, values.astype(np.asarray(p.tensor.values).dtype), p.axis)
            self._shift_bias(member.node, shift)
            if self.variance:
                self._reduce_variance(member.node, drop)

    def _compensate(self, group: ChannelGroup, entries: list[tuple[int, int, float, float]],
                    zero_removed: bool) -> None:
        """Every consumer of ``group`` absorbs ``entries`` (unit, merge target, scale, corr),
        in order; each weight is read and written once per batch (some are 100M floats), and
        copied only when a merge or a zeroed column changes it (magnitude's plans only shift
        biases: their weights are read in place)."""
        for member in group.members:
            if member.coupling.role != CONSUMER:
                continue
            p = _consumer_weight(member.coupling)
            if p is None:
                continue
            tensor, axis = member.space
            local, units = group.atoms[member.space]
            m = self.moments.get(tensor, axis)
            values = self.corrections.read(p.tensor)  # read-only until the first change copies it
            copied = False
            to_param = np.full(int(max(p.space.max(), local.max())) + 1, -1, dtype=np.int64)
            to_param[p.space] = p.param
            outputs = values.shape[0] if p.groups > 1 else p.columns(values, 0)[0].shape[0]
            shift, drop = np.zeros(outputs), np.zeros(outputs)
            for unit, into, scale, corr in entries:
                src = np.sort(local[units == unit])
                dst = np.sort(local[units == into]) if into >= 0 else None
                merge = dst is not None and len(dst) == len(src)
                for k, atom in enumerate(src):
                    col, rows = p.columns(values, int(to_param[atom]))
                    col = col.astype(np.float64, copy=False)  # exact: the values a float64 copy holds
                    residual_mean = m.mean[atom] if m is not None else 0.0
                    residual_var = m.var[atom] if m is not None else 0.0
                    if merge:
                        residual_mean -= scale * (m.mean[dst[k]] if m is not None else 0.0)
                        residual_var *= max(0.0, 1 - corr**2)
                    shift[rows] += col.sum(axis=1) * residual_mean
                    drop[rows] += (col**2).sum(axis=1) * residual_var
                    if (merge or zero_removed) and not copied:
                        values, copied = np.array(values, dtype=np.float64, copy=True), True
                    if merge:
                        p.add_columns(values, int(to_param[dst[k]]), int(to_param[atom]), scale)
                    if zero_removed:
                        p.add_columns(values, int(to_param[atom]), int(to_param[atom]), -1.0)
            if copied:
                self.corrections.write(p.tensor, values.astype(np.asarray(p.tensor.values).dtype), p.axis)
            self._shift_bias(member.node, shift)
            if self.variance:
                self._reduce_variance(member.node, drop)

    def _shift_bias(self, node: gs.Node, shift: np.ndarray) -> None:
        if not np.any(shift):
            return
        target = _bias(node, len(shift))
        if target is None:
            logger.debug("no bias to compensate %s", node.name)
            return
        bias, factor = target
        if bias is None:  # a new bias, sliced with the node's output channels by the rewriter
            dtype = np.asarray(node.inputs[1].values).dtype
            values = self.corrections.biases.get(node.name, np.zeros(len(shift), dtype))
        else:
            values = self.corrections.read(bias)
        values = (values + factor * shift.reshape((1,) * (values.ndim - 1) + (-1,))).astype(values.dtype)
        if bias is None:
            self.corrections.biases[node.name] = values
        else:
            self.corrections.write(bias, values)

    def _reduce_variance(self, node: gs.Node, drop: np.ndarray) -> None:
        if not np.any(drop) or node.op not in ("Conv", "Gemm", "MatMul"):
            return
        for bn, channels in _downstream_norm(node, np.arange(len(drop)), self.shapes):
            var = np.array(self.corrections.read(bn.inputs[4]), dtype=np.float64, copy=True)
            if channels.max() >= len(var):
                continue
            # Never below a tenth: the estimate assumes independent channels.
            var[channels] = np.maximum(var[channels] - drop, 0.1 * var[channels])
            self.corrections.write(bn.inputs[4], var.astype(np.asarray(bn.inputs[4].values).dtype))
