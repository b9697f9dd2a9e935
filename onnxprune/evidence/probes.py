"""Probes: measure, in onnxruntime, what removing channels does to the output layer.

The probe model is the lowered model with a mask in front of every consumer of every probed
group: ``x' = x * m + (1 - m) * mean`` where ``m`` comes from a per-group graph input of
shape ``[N, units]`` (so every batch row carries its own ablation) and ``mean`` is the
channel's data-free expected value (removal *with* compensation, as it will be applied).
One session, built once, scores many ablations in one batched run: row ``r`` of a run is
probe sample ``r % P`` under mask row ``r // P``. Nothing is rebuilt per candidate.

Candidate rows remove one unit each; their session substitutes that unit's channels alone
(:func:`_sparse_fill`), and any other rows run the whole-tensor form (:func:`_dense_fill`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.coupling import CONSUMER
from onnxprune.depgraph import ChannelGroup
from onnxprune.evidence.frontier import Frontier, Throughput, assemble, sample_runs
from onnxprune.evidence.priors import InputPrior, MomentPropagation
from onnxprune.ir import (
    Model,
    ModelEditor,
    NodeEmitter,
    hold_lean,
    holds_large,
    input_dtypes,
    make_batch_dynamic,
    session,
    to_model,
)

logger = logging.getLogger(__name__)


def mask_name(group: ChannelGroup) -> str:
    return f"onnxprune_mask_{group.id}"


def merge_src_name(group: ChannelGroup) -> str:
    return f"onnxprune_merge_src_{group.id}"


def merge_dst_name(group: ChannelGroup) -> str:
    return f"onnxprune_merge_dst_{group.id}"


#: How probe tensors are named (``n`` counts).
_PROBE_NAMES = "onnxprune_probe_{n}"
#: The input every group's mask is sliced from in the first-order model.
_ALL_MASKS = "onnxprune_masks"


def _gather(b: NodeEmitter, name: str, index: np.ndarray, units: int, pad_value: float) -> str:
    """Unit-level [N, U] to space-level [N, C]: column ``index[c]`` of ``name``, ``pad_value``
    where ``index[c]`` is U (atoms of other groups). Before opset 11 it is a product with a
    one-hot [U, C] matrix instead of a Gather: the gradient of a Gather (the first-order pass
    differentiates the masks) scatters, and ScatterElements came with opset 11."""
    if index.size == units and np.array_equal(index, np.arange(units)):  # the group is the space
        return name
    if b.opset.version >= 11:
        padded = b.pad(name, [0, 0, 0, 1], np.float32(pad_value))
        return b.add("Gather", [padded, b.const(index)], axis=1)
    picked = b.add("MatMul", [name, b.const((index[None, :] == np.arange(units)[:, None]).astype(np.float32))])
    foreign = index >= units
    if pad_value == 0 or not foreign.any():
        return picked
    return b.add("Add", [picked, b.const(pad_value * foreign.astype(np.float32))])


@dataclass
class Impact:
    """Per ablation row: how far the output layer moved from the unablated model."""

    rel_l2: np.ndarray    # mean ||y - y0|| / ||y0||
    cosine_distance: np.ndarray  # mean 1 - cos(y, y0)
    top1: np.ndarray      # share of probes whose arg-max changed
    margin: np.ndarray    # mean drop of (top-1 logit - runner-up logit), baseline classes
    # Robustness view of the deviation (SRDFP): per output unit, the interval of y - y0 over
    # the probes; its total width (L1) and the entropy of how the width spreads over units.
    width: np.ndarray
    entropy: np.ndarray


#: Elements of ``outputs`` whose temporaries :func:`impacts` holds at once: a sequence model's
#: output layer (an OCR recogniser's 40 steps x 6625 characters) made it several copies of
#: a step's 318 MB of rows (ppocr-rec's peak: 1881 MB whole, 1177 MB in blocks).
IMPACT_ELEMENTS = 1 << 22


def impacts(outputs: np.ndarray, base: np.ndarray) -> Impact:
    """``outputs`` [R, P, O] against ``base`` [P, O], in float64, rows taken a block at a time
    (every measure is per row, so blocks give the same numbers; what depends on ``base``
    alone is computed once)."""
    base_norm = np.linalg.norm(base, axis=-1)[None] + 1e-12
    top = base.argmax(axis=-1)
    # The runner-up's value: partition finds the same element a sort would.
    base_margin = base.max(axis=-1) - np.partition(base, -2, axis=-1)[:, -2] if base.shape[-1] > 1 else None
    reference = (base, base_norm, top, base_margin)
    per_row = max(int(np.prod(outputs.shape[1:])), 1)
    block = max(1, IMPACT_ELEMENTS // per_row)
    if len(outputs) <= block:
        return _impacts(outputs.astype(np.float64, copy=False), *reference)
    parts = [_impacts(outputs[i:i + block].astype(np.float64), *reference) for i in range(0, len(outputs), block)]
    return Impact(*(np.concatenate([getattr(p, f) for p in parts]) for f in Impact.__dataclass_fields__))


def _impacts(outputs: np.ndarray, base: np.ndarray, base_norm: np.ndarray, top: np.ndarray,
             base_margin: np.ndarray | None) -> Impact:
    delta = outputs - base[None]
    rel_l2 = (np.linalg.norm(delta, axis=-1) / base_norm).mean(axis=1)
    cos = (outputs * base[None]).sum(-1) / (np.linalg.norm(outputs, axis=-1) * base_norm + 1e-12)
    changed = (outputs.argmax(axis=-1) != top[None]).mean(axis=1)
    if base_margin is not None:
        picked = np.take_along_axis(outputs, top[None, :, None], axis=-1)[..., 0]
        others = np.where(np.arange(base.shape[-1])[None, None] == top[None, :, None], -np.inf, outputs)
        margin = (base_margin[None] - (picked - others.max(axis=-1))).mean(axis=1)
    else:
        margin = np.zeros(len(outputs))
    width = delta.max(axis=1) - delta.min(axis=1)  # [R, O]
    total = width.sum(axis=-1)
    share = width / (total[:, None] + 1e-12)
    entropy = -(share * np.log(share + 1e-12)).sum(axis=-1)
    return Impact(rel_l2, 1 - cos.mean(axis=1), changed, margin, total / base.shape[-1], entropy)


class ProbeModel:
    """A session over the masked model and the seeded synthetic probe inputs."""

    def __init__(self, graph: gs.Graph, template: Model, groups: list[ChannelGroup],
                 moments: MomentPropagation, prior: InputPrior, input_shapes: dict, probes: int = 16,
                 seed: int = 0, max_batch: int = 2048, inputs: dict[str, np.ndarray] | None = None,
                 estimates: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] | None = None,
                 frontier: bool = True, throughput: Throughput | None = None):
        batch = next(iter(input_shapes.values()))[0] if input_shapes else 1
        self.groups = [g for g in groups if probeable(g, moments.shapes, batch)]
        self.graph = graph  # the graph probed, weights as corrected so far
        self._source = (graph, template, moments, estimates or {})
        self._hold = holds_large(graph, [a for estimate in (estimates or {}).values() for a in estimate])
        self.model = self._masked(sparse=True)
        self._dense, self._dense_session = None, None  # built when needed
        if inputs is None:
            rng = np.random.default_rng(seed)
            inputs = {}
            for name, dtype in input_dtypes(template).items():
                shape = (probes, *input_shapes[name][1:])
                if np.issubdtype(dtype, np.floating):
                    inputs[name] = prior.sample(shape, rng).astype(dtype)
                else:
                    inputs[name] = rng.integers(0, 2, size=shape).astype(dtype)
        self.inputs = inputs
        # Rows run from where their masks enter (the cuts' captures become outputs first).
        self.frontier = Frontier(self.model, moments.shapes, batch, inputs,
                                 {g.id: self._group_inputs(g) for g in self.groups},
                                 {g.id: g.size for g in self.groups}, self.output, throughput) if frontier else None
        start = time.perf_counter()
        self.session = session(self.model)
        if self.frontier is not None:
            self.frontier.session_seconds = (time.perf_counter() - start) / max(len(self.model.graph.node), 1)
        probes = len(next(iter(inputs.values())))
        self.probes = probes
        self.max_batch = max_batch
        self.runs = 0
        self.base = self._base_run()

    def _masked(self, sparse: bool) -> Model:
        graph, template, moments, estimates = self._source
        # A large model's weights and estimates held once for the step's models and sessions.
        edit = ModelEditor.from_graph(graph.copy(), template, hold_large=self._hold)
        self.output = probe_output(edit)
        spaces = self._add_masks(edit, moments, estimates, sparse)
        if sparse:
            self.sparse_spaces = spaces
        if self.output not in edit.outputs:
            edit.add_output(self.output)
        model = edit.finish(toposort=True)  # the masks' nodes feed the model's own
        make_batch_dynamic(model)
        hold_lean(model)  # what is left: a large model exported in another form
        return model

    @staticmethod
    def _group_inputs(group: ChannelGroup) -> dict[str, float]:
        """A group's mask inputs, each with the value that ablates nothing."""
        return {mask_name(group): 1.0, merge_src_name(group): 0.0, merge_dst_name(group): 0.0}

    def _base_run(self) -> np.ndarray:
        """The unablated outputs [P, O] in float64, and what the frontier's cuts capture where
        it holds them (a large model's when the first rows need them: see :meth:`_capture`)."""
        held = self.frontier is not None and self.frontier.holds
        self._uncaptured = held and self._hold
        wanted = self.frontier.wanted if held and not self._uncaptured else []
        y, *captured = self._unablated_run([self.output, *wanted])
        self._output_shape = y.shape
        self.runs += 1
        if wanted:
            self.frontier.capture(captured, self.probes)
        return y.reshape(self.probes, -1).astype(np.float64)

    def _unablated_run(self, names: list[str]) -> list[np.ndarray]:
        """``names`` on the unablated probes, in runs of at most ``max_batch`` of them (each
        run's part written into the whole: the captures of a detector at 800x608 are about
        100 MB a probe, and concatenating parts held them twice)."""
        whole = None
        for _, kept in sample_runs(1, self.probes, self.max_batch):
            feeds = {name: x[kept] for name, x in self.inputs.items()}
            for group in self.groups:
                for name, default in self._group_inputs(group).items():
                    feeds[name] = np.full((kept.stop - kept.start, group.size), default, np.float32)
            part = self.session.run(names, feeds)
            if kept.stop - kept.start == self.probes:
                return part
            if whole is None:
                # a first axis that is not the probes' (a shape tensor) stays as the first run left it
                whole = [np.empty((self.probes, *a.shape[1:]), a.dtype) if a.ndim and len(a) == len(part[0])
                         else a for a in part]
            for k, a in enumerate(part):
                if whole[k] is not a and whole[k].shape[1:] == a.shape[1:]:
                    whole[k][kept] = a
        return whole

    def _capture(self) -> None:
        """A large model's captures, taken by running the unablated probes again when the
        first rows need them rather than in the base run: the first-order pass (between the
        two) then does not hold them (resnet50 at 224x224: 137 MB a step)."""
        if self._uncaptured:
            self._uncaptured = False
            _, *captured = self._unablated_run([self.output, *self.frontier.wanted])
            self.frontier.capture(captured, self.probes)

    def dense_model(self) -> Model:
        """The probe model with every space masked densely: any mask rows (several units per
        row, fractional masks), and the form the first-order estimate differentiates."""
        if self._dense is None:
            self._dense = self._masked(sparse=False)
        return self._dense

    def _add_masks(self, edit: ModelEditor, moments: MomentPropagation, estimates: dict,
                   sparse: bool) -> list[list[ChannelGroup]]:
        """Per consumer space, what its consumers read instead of ``x`` (see
        :func:`_dense_fill` and :func:`_sparse_fill`); the sparse form where the layout allows.
        Returns the groups of each sparse space."""
        per_space: dict[tuple, list[tuple[ChannelGroup, np.ndarray, bool]]] = {}
        consumers: dict[tuple, set[str]] = {}
        for group in self.groups:
            for name in (mask_name(group), merge_src_name(group), merge_dst_name(group)):
                edit.add_input(name, np.float32, ["N", group.size])
            for space, names in consumer_nodes(group).items():
                local, unit = group.atoms[space]
                index = np.full(moments.shapes[space[0]][space[1]], group.size, dtype=np.int64)
                index[local] = unit  # atoms of other groups read the padded column
                per_space.setdefault(space, []).append((group, index, _single(group, space)))
                consumers.setdefault(space, set()).update(names)
        b = edit.emitter(_PROBE_NAMES)
        b.hold_large = self._hold
        sparse_spaces = []
        for space, entries in per_space.items():
            tensor, axis = space
            rank = len(moments.shapes[tensor])
            m = moments.get(tensor, axis)
            mean = (np.zeros(moments.shapes[tensor][axis]) if m is None else m.mean).astype(np.float32)
            fill = _sparse_fill if sparse and axis in (1, rank - 1) else _dense_fill
            # Both forms take the estimate where the graph can apply it, else the mean.
            estimate = estimates.get(space) if _estimable(axis, rank) else None
            x = fill(b, tensor, axis, rank, entries, mean, estimate)
            if fill is _sparse_fill:
                sparse_spaces.append([group for group, _, _ in entries])
            for name in consumers[space]:
                edit.replace_input(name, tensor, x)
        edit.extend(b)
        return sparse_spaces

    def sparse_expresses(self, masks: dict[str, np.ndarray]) -> bool:
        """Whether every row is what the sparse form expresses: 0/1 masks, at most one unit
        removed per space, and a merge only from that unit into at most one other."""
        removed, merges = {}, {}
        for group in self.groups:
            m = masks.get(mask_name(group))
            src = masks.get(merge_src_name(group))
            dst = masks.get(merge_dst_name(group))
            if m is None:
                if src is not None and np.any(src) or dst is not None and np.any(dst):
                    return False
                continue
            gone = m == 0
            if not np.all(gone | (m == 1)):
                return False
            if src is not None and not (np.all((src == 0) | ((src == 1) & gone))):
                return False
            removed[group.id] = gone.sum(axis=1)
            merges[group.id] = 0 if dst is None else (dst != 0).sum(axis=1)
            # The sparse form adds merges up over a space's groups; the dense one pairs a
            # group's src with its own dst only: a dst needs its group's src.
            if dst is not None:
                sourced = np.zeros(len(dst), bool) if src is None else np.any(src == 1, axis=1)
                if np.any((merges[group.id] > 0) & ~sourced):
                    return False
        for groups in self.sparse_spaces:
            if any(np.any(sum(c.get(g.id, 0) for g in groups) > 1) for c in (removed, merges)):
                return False
        return True

    def run(self, masks: dict[str, np.ndarray], raw: bool = False) -> np.ndarray:
        """Outputs [R, P, O] for R rows of the named mask inputs (missing: no ablation), in runs
        of at most ``max_batch`` samples (rows times probes); in float64, or ``raw`` in the
        model's own type (half the memory for a float32 output layer)."""
        rows = max((len(m) for m in masks.values()), default=1)
        run_session = self.session
        if not self.sparse_expresses(masks):
            if self._dense_session is None:
                self._dense_session = session(self.dense_model())
            run_session = self._dense_session
        results = []
        for part, kept in sample_runs(rows, self.probes, self.max_batch):
            n, width = part.stop - part.start, kept.stop - kept.start
            feeds = {name: np.concatenate([x[kept]] * n) for name, x in self.inputs.items()}
            for group in self.groups:
                for name, default in self._group_inputs(group).items():
                    m = masks.get(name)
                    block = np.full((n, group.size), default, np.float32) if m is None else m[part]
                    feeds[name] = np.repeat(block.astype(np.float32), width, axis=0)
            (y,) = run_session.run([self.output], feeds)
            self._output_shape = y.shape  # samples first
            self.runs += n if kept.start == 0 else 0
            y = y.reshape(n, width, -1)
            results.append((part, kept, y if raw else y.astype(np.float64)))
        return assemble(results, rows, self.probes)

    def first_order(self) -> dict[int, np.ndarray] | None:
        """d loss / d mask for every unit of every probed group, in one reverse pass.

        The loss is the cross-entropy of the probe outputs against the unablated model's own
        decisions; removing unit k moves it by about ``-dL/dm_k`` (Taylor), so the mean absolute
        per-probe derivative ranks thousands of channels for the price of one backward run.
        None when the gradient graph cannot be built (an op without a backward rule)."""
        from onnxprune.gradient import INPUT_GRAD, LABELS, input_gradient_model

        # Every group's mask is a slice of one input, the first: what the gradient is taken of.
        edit = ModelEditor(self.dense_model())
        edit.remove_inputs(mask_name(group) for group in self.groups)
        # Its width left open, which keeps the builder from running this model to probe shapes
        # inference left out (at batches 2 and 3: 2.7 GB more on resnet50 at 224x224).
        edit.add_input(_ALL_MASKS, np.float32, ["N", None], first=True)
        b = edit.emitter(_PROBE_NAMES)
        start, spans = 0, {}
        for group in self.groups:
            spans[group.id] = (start, start + group.size)
            start += group.size
        # One Split (its gradient is a Concat at every opset; a Slice's needs Pad or Scatter forms).
        sizes = [group.size for group in self.groups]
        if b.opset.params_as_inputs("Split"):
            b.emit("Split", [_ALL_MASKS, b.i64(sizes)], [mask_name(g) for g in self.groups], axis=1)
        else:
            b.emit("Split", [_ALL_MASKS], [mask_name(g) for g in self.groups], axis=1, split=sizes)
        edit.extend(b, first=True)
        # Typed as measured, and the masked tensors as analysed: shape inference loses the batch
        # of a head's Reshape to a stored shape, and with it the shapes of the masks' arithmetic
        # and the class count the loss needs.
        tensors, shapes = self.graph.tensors(), self._source[2].shapes
        dtype = getattr(tensors.get(self.output), "dtype", None) or np.float32
        edit.set_outputs([self.output], dtype, ["N", *self._output_shape[1:]])
        for name in {t for group in self.groups for t, _ in consumer_nodes(group)}:  # batch-major: probeable
            if name in shapes:
                edit.declare(name, getattr(tensors.get(name), "dtype", None) or np.float32, ["N", *shapes[name][1:]])
        try:
            grad_session = session(input_gradient_model(edit.finish()), once=True)
            feeds = dict(self.inputs)
            feeds[_ALL_MASKS] = np.ones((self.probes, start), np.float32)
            for group in self.groups:
                for name in (merge_src_name(group), merge_dst_name(group)):
                    feeds[name] = np.zeros((self.probes, group.size), np.float32)
            feeds[LABELS] = self.base.argmax(axis=-1).astype(np.int64)
            wanted = {i.name for i in grad_session.get_inputs()}  # merges no row reads are pruned away
            feeds = {k: v for k, v in feeds.items() if k in wanted}
            # Probes apart are the same gradient (each one's loss reads its own row of masks):
            # runs a third of a forward run's samples, as a reverse pass holds about three
            # times the activations (resnet50 at 224x224: one probe a run, not four).
            per_run = max(1, self.max_batch // 3)
            grad = np.concatenate([grad_session.run([INPUT_GRAD], {k: v[lo:lo + per_run] for k, v in feeds.items()})[0]
                                   for lo in range(0, self.probes, per_run)])
        except Exception as exc:  # no backward rule, or a graph the builder cannot read
            logger.info("no first-order estimate: %s", str(exc).splitlines()[0])
            return None
        score = np.abs(grad).mean(axis=0)
        return {gid: score[a:b] for gid, (a, b) in spans.items()}

    def measure(self, masks: dict[str, np.ndarray]) -> Impact:
        return impacts(self.run_rows(masks), self.base)

    def run_rows(self, masks: dict[str, np.ndarray]) -> np.ndarray:
        """:meth:`run` (``raw``), with each row that ablates one group alone run from where
        that group's masks enter the model (:class:`~onnxprune.evidence.frontier.Frontier`)."""
        if self.frontier is not None and masks:
            self._capture()
        if self.frontier is None or not self.frontier.cuts or not masks or not self.sparse_expresses(masks):
            return self.run(masks, raw=True)
        before = self.frontier.rows
        out = self.frontier.run(masks, self.probes, self.max_batch, lambda m: self.run(m, raw=True),
                                self._unablated_run)
        if out is None:
            return self.run(masks, raw=True)
        self.runs += self.frontier.rows - before
        return out


def _dense_fill(b: NodeEmitter, tensor: str, axis: int, rank: int, entries, mean: np.ndarray, estimate) -> str:
    """``x' = x*M + (1-M)*value + S*(sum_c(D*x) - sum_c(D*mean))`` over the whole tensor.

    M is the removal mask; S (one-hot at the removed unit u) and D (the merge scale s at the
    kept unit v) express "u is merged into v": the consumer weights for v absorb s times
    u's, which is the same as u's slot reading ``s * x_v + mean_u - s * mean_v``. Merges are
    expressed where units are single channels; elsewhere (a flattened block) a row
    measures compensated removal alone.

    ``value`` is the channel mean, or with a least-squares estimate ``(B, mu - B mu)`` for the
    space, ``mu + B (x - mu)``: what the consumers see once the removal is reconstructed from
    every kept channel (B's row for a unit leaves that unit out), given only where
    :func:`_estimable`. Rows may remove any number of units; the estimate costs a CxC product
    at every position."""
    size = len(mean)
    # Dim 0 copied (0), not inferred (-1): shape inference then keeps the batch symbol through
    # the masks' arithmetic, which the first-order pass's gradient graph needs.
    shape = [0] + [1] * (axis - 1) + [size] + [1] * (rank - axis - 1)
    needs_mean = estimate is None or any(single for _, _, single in entries)
    mean_c = b.const(mean.reshape(shape[1:])) if needs_mean else None
    value = _estimate(b, tensor, axis, rank, estimate) or mean_c  # what a removed slot reads
    x = tensor
    for group, index, single in entries:
        mask = _gather(b, mask_name(group), index, group.size, 1.0)
        mb = b.add("Reshape", [mask, b.const(np.array(shape, np.int64))])
        kept = b.add("Mul", [x, mb])
        fill = b.add("Sub", [value, b.add("Mul", [value, mb])])
        x = b.add("Add", [kept, fill])
        if single:
            to = b.const(np.array(shape, np.int64))
            src = b.add("Reshape", [_gather(b, merge_src_name(group), index, group.size, 0.0), to])
            dst = b.add("Reshape", [_gather(b, merge_dst_name(group), index, group.size, 0.0), to])
            # u's slot reads s * x_v (what the merged weights see) minus its mean.
            moved = b.reduce_sum(b.add("Mul", [tensor, dst]), [axis])
            lost = b.reduce_sum(b.add("Mul", [dst, mean_c]), [axis])
            x = b.add("Add", [x, b.add("Mul", [src, b.add("Sub", [moved, lost])])])
    return x


def _sparse_fill(b: NodeEmitter, tensor: str, axis: int, rank: int, entries, mean: np.ndarray, estimate) -> str:
    """The same substitution for rows that remove at most one unit of the space (what
    candidate measurement does), at the cost of that unit's channels only.

    The tensor is viewed as [N, C, S] (channels first) or [N, S, C] (channels last). The
    removed unit's channels are selected by ``sel`` [N, K, C] (K: the most channels a unit
    has here; row k one-hot at its k-th channel, zero in rows that remove nothing), their
    replacement is computed for those K channels alone (``sel B`` is K rows of the estimate,
    not C; given only where :func:`_estimable`), and ``x' = x + sel^T (value - x_sel)`` puts
    it back. No CxC product per position, and a few passes over the tensor instead of a dozen."""
    size = len(mean)
    first = axis == 1 or rank == 2
    per = np.zeros(size, np.int64)  # each channel's rank among its unit's channels
    ranks = {}
    for group, index, _ in entries:
        for c in np.flatnonzero(index < group.size):
            u = int(index[c])
            per[c] = ranks.get((group.id, u), 0)
            ranks[(group.id, u)] = per[c] + 1
    width = max(ranks.values(), default=1)
    onehot = (per[None, :] == np.arange(width)[:, None]).astype(np.float32)  # [K, C]
    removed = None
    for group, index, _ in entries:
        r = b.add("Sub", [b.const(np.array(1.0, np.float32)), _gather(b, mask_name(group), index, group.size, 1.0)])
        removed = r if removed is None else b.add("Add", [removed, r])
    sel = b.add("Mul", [b.add("Reshape", [removed, b.const(np.array([0, 1, size], np.int64))]), b.const(onehot)])
    sel_t = b.add("Transpose", [sel], perm=[0, 2, 1])  # [N, C, K]
    x3 = b.add("Reshape", [tensor, b.const(np.array([0, size, -1] if first else [0, -1, size], np.int64))])
    if estimate is not None:
        matrix, bias = estimate
        rows = b.add("MatMul", [sel, b.const(matrix)])  # [N, K, C]: the estimate's rows
    else:
        bias, rows = mean, None
    if first:  # [N, C, S]
        picked = b.add("MatMul", [sel, x3])                                          # [N, K, S]
        value = b.add("MatMul", [sel, b.const(bias.reshape(size, 1))])               # [N, K, 1]
        if rows is not None:
            value = b.add("Add", [b.add("MatMul", [rows, x3]), value])
    else:  # [N, S, C]
        picked = b.add("MatMul", [x3, sel_t])                                        # [N, S, K]
        value = b.add("MatMul", [b.const(bias.reshape(1, size)), sel_t])             # [N, 1, K]
        if rows is not None:
            value = b.add("Add", [b.add("MatMul", [x3, b.add("Transpose", [rows], perm=[0, 2, 1])]), value])
    delta = b.add("Sub", [value, picked])
    if any(one for _, _, one in entries):  # u's slot reads s * (x_v - mean_v) more: u merged into v with scale s
        dst = src = None
        for group, index, one in entries:
            if not one:
                continue
            d = _gather(b, merge_dst_name(group), index, group.size, 0.0)
            dst = d if dst is None else b.add("Add", [dst, d])
            s = b.reduce_sum(merge_src_name(group), [1])
            src = s if src is None else b.add("Add", [src, s])
        d3 = b.add("Reshape", [dst, b.const(np.array([0, 1, size], np.int64))])      # [N, 1, C]
        src = b.add("Reshape", [src, b.const(np.array([-1, 1, 1], np.int64))])       # [N, 1, 1]
        lost = b.add("MatMul", [d3, b.const(mean.reshape(size, 1))])                 # [N, 1, 1]
        if first:
            moved = b.add("MatMul", [d3, x3])                                        # [N, 1, S]
            first_slot = b.const(np.eye(width, 1, dtype=np.float32))                 # [K, 1]
        else:
            moved = b.add("MatMul", [x3, b.add("Transpose", [d3], perm=[0, 2, 1])])  # [N, S, 1]
            first_slot = b.const(np.eye(1, width, dtype=np.float32))                 # [1, K]
        merge = b.add("Mul", [src, b.add("Sub", [moved, lost])])
        delta = b.add("Add", [delta, b.add("Mul", [merge, first_slot])])
    back = b.add("MatMul", [sel_t, delta]) if first else b.add("MatMul", [delta, sel])
    return b.add("Reshape", [b.add("Add", [x3, back]), b.add("Shape", [tensor])])


def _estimable(axis: int, rank: int) -> bool:
    """Whether a least-squares estimate can be applied over this channel axis in the graph:
    channels last (a MatMul), or channels first of a 1-3D feature map (a 1x1 convolution)."""
    return axis == rank - 1 or (axis == 1 and rank in (3, 4, 5))


def _estimate(b: NodeEmitter, tensor: str, axis: int, rank: int, estimate) -> str | None:
    """``mu + B (x - mu)`` over the channel axis (where :func:`_estimable`): a MatMul for
    channels-last, a 1x1 convolution for channels-first feature maps; None without one."""
    if estimate is None:
        return None
    matrix, bias = estimate
    if axis == rank - 1:
        return b.add("Add", [b.add("MatMul", [tensor, b.const(matrix.T)]), b.const(bias)])
    kernel = matrix.reshape(*matrix.shape, *([1] * (rank - 2)))
    return b.add("Conv", [tensor, b.const(kernel), b.const(bias)])


def probeable(group: ChannelGroup, shapes: dict, batch: int = 1) -> bool:
    """Whether masks can ride on the batch axis in front of every consumer of ``group``: the
    consumer inputs must be batch-major (dim 0 is the analysis batch). Attention internals
    reshaped to [batch*heads, ...] or [tokens, features] are not."""
    spaces = consumer_nodes(group)
    return bool(spaces) and all(shapes.get(t, (0,))[0] == batch for t, _ in spaces)


def stacks_samples(graph: gs.Graph, template: Model, input_shapes: dict, prior: InputPrior) -> bool:
    """Whether the model, its first axes made dynamic, runs two samples stacked on them as it
    runs each alone: what probe rows need. A sequence-first recurrent model (or one that mixes
    its batch) does not. Checked on ``graph`` as the probes build their models from it (the
    lowered graph, exported): a head's Reshape to ``[1, C, -1]`` whose shape a Constant node
    holds (Paddle's exports) mixes two samples in the file, and copies the batch once lowering
    has made the shape an initializer that :func:`~onnxprune.ir.make_batch_dynamic` rewrites."""
    rng = np.random.default_rng(0)
    batched = to_model(graph.copy(), template, hold=True)
    samples = []
    for _ in range(2):
        feed = {}
        for name, dtype in input_dtypes(batched).items():
            shape = tuple(input_shapes[name])
            feed[name] = (prior.sample(shape, rng) if np.issubdtype(dtype, np.floating)
                          else np.zeros(shape)).astype(dtype)
        samples.append(feed)
    make_batch_dynamic(batched)
    try:
        sess = session(batched)
        alone = [sess.run(None, feed)[0] for feed in samples]
        joint = sess.run(None, {k: np.concatenate([f[k] for f in samples]) for k in samples[0]})[0]
    except Exception:  # noqa: BLE001 - a model that cannot batch cannot carry probe rows
        return False
    together = np.concatenate(alone)
    return joint.shape == together.shape and bool(np.allclose(joint, together, rtol=1e-3, atol=1e-4))


def mergeable(group: ChannelGroup) -> bool:
    """Whether some consumer reads each of the group's units as one channel (where a probe row
    can merge a unit into another); not so for a conv map read flattened into blocks of
    features, or an attention head read as its head_dim channels."""
    return any(_single(group, space) for space in consumer_nodes(group))


def _single(group: ChannelGroup, space: tuple) -> bool:
    """Whether ``space`` reads each of the group's units as one channel."""
    _, unit = group.atoms[space]
    return len(np.unique(unit)) == len(unit)


def consumer_nodes(group: ChannelGroup) -> dict[tuple, set[str]]:
    """The tensors (and channel axes) the group's consumers read, with the nodes reading each."""
    spaces: dict[tuple, set[str]] = {}
    for m in group.members:
        if m.coupling.role == CONSUMER and m.space[1] > 0:
            spaces.setdefault(m.space, set()).add(m.node.name)
    return spaces


def probe_output(edit: ModelEditor) -> str:
    """The first output, or the logits in front of a final Softmax (more sensitive)."""
    name = edit.outputs[0]
    for node in edit.nodes():
        if name in node.outputs and node.op_type in ("Softmax", "LogSoftmax"):
            return node.inputs[0]
    return name
