"""Data-free synthetic inputs: model inversion (ZeroQ, DeepInversion).

A trained network remembers what its training inputs looked like: its BatchNorms keep the
mean and variance their inputs had, and its classifier knows which inputs make each class.
Starting from noise drawn from the input prior, Adam on the input minimises, per sample:

- the **BatchNorm mismatch** (ZeroQ): the mean over BatchNorms of how far the batch's channel
  statistics are from the running ones;
- for conv nets without BatchNorm (folded into the convolutions by an exporter), the
  **balance of every pre-activation**: the mean over channels of ``(m / s)^2``, ``m`` and
  ``s`` a channel's mean and deviation over the batch and positions. A BatchNorm-trained
  channel has mean ``beta`` and deviation ``|gamma|`` on real data, and ``beta / |gamma|``
  is near 0 (digits nets: 80% within +-0.16); folding keeps the function but loses the
  statistics, and this is the part of them that survives without their scale;
- for other classifiers without BatchNorm (MLPs, transformers), the **cross-entropy against
  a target class** (DeepInversion, Yin et al. 2020), classes dealt round-robin so that every
  output class is covered evenly: a net without BatchNorm still says what its classes look
  like (on a conv net, with or without BatchNorm, class targets make the evidence
  optimistic: see :func:`_inversion_model`);
- image **priors**: total variation (neighbouring pixels agree) and an L2 pull towards the
  prior's scale, on inputs jittered by a random shift each step (a pattern that only works
  at one alignment is an adversarial artefact, not a feature).

Gradients come from :mod:`onnxprune.gradient` (the model's reverse pass as ONNX nodes run by
onnxruntime): the per-sample objective ``s`` is exposed as the logits ``[0, s]``, whose
cross-entropy against class 0, ``log(1 + e^s)``, falls with ``s``. The priors' gradients are
computed in numpy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass

import numpy as np

from onnxprune.errors import first_line
from onnxprune.evidence.priors import InputPrior
from onnxprune.gradient import INPUT_GRAD, LABELS, input_gradient_model
from onnxprune.ir import (
    SHRINK_ARENA,
    Model,
    ModelEditor,
    NodeEmitter,
    copy_model,
    fix_input_dims,
    graph_inputs,
    held,
    make_batch_dynamic,
    release_memory,
    session,
)
from onnxprune.profiling import advance

logger = logging.getLogger(__name__)

#: The one-hot class targets the inversion model reads (classifiers only).
TARGETS = "onnxprune_targets"
#: Weight of the class cross-entropy against the BatchNorm mismatch (both are O(1) at the
#: start; the cross-entropy falls fast, the mismatch slowly).
CE_WEIGHT = 1.0
#: Weights of the image priors (each a per-sample mean in prior variances, O(1) on noise).
TV_WEIGHT = 0.1
L2_WEIGHT = 0.01
#: Largest random shift (pixels) of the jitter.
JITTER = 2
#: A batch whose reverse pass would hold more activations than SPLIT_BYTES (3 x 4 bytes an
#: element a sample) is inverted in parts of at most PART_BYTES (see :class:`_Parts`). No
#: digits net comes near the split (the largest, the zoo ViT at 128 inputs, 0.8 GB); at
#: 224x224 resnet50 runs 1 input a part, the page classifier 2.
SPLIT_BYTES = 2**30
PART_BYTES = 2**28
#: The surrogate's inputs (see :class:`_Parts`): per term ``a`` and ``b``, and the offset.
ALPHA, BETA, OFFSET = "onnxprune_parts_a", "onnxprune_parts_b", "onnxprune_parts_offset"
#: Adam's step on the input, in prior deviations. Constant, it suits class targets, whose
#: cross-entropy falls within tens of steps (a larger step there makes over-confident exemplars:
#: `models/` MLP and ViT at ratio 0.4, three seeds, 0.973 and 0.839 planned on inputs made at
#: 0.05, 0.961 and 0.776 at ANNEALED_LR). Matching statistics inside the net converges slowly:
#: there a larger first step, annealed to zero on a half cosine over the run, reaches in 150
#: steps a lower mismatch than the constant step does in 300 (docs/methods.md, "Annealed
#: steps").
LR = 0.05
ANNEALED_LR = 0.4


@dataclass(frozen=True)
class Objective:
    """What an inversion matches: ``batchnorm`` statistics, centred pre-activations
    (``balance``, conv nets whose BatchNorms were folded), ``classes`` targets (0: none)."""

    batchnorm: bool
    classes: int
    balance: bool = False

    @property
    def source(self) -> str:
        parts = (["BatchNorm statistics"] if self.batchnorm else []) + \
            (["centred pre-activations"] if self.balance else []) + (["class targets"] if self.classes else [])
        return " and ".join(parts)


class Distiller:
    """The inversion of one model: its objective, its gradient session (built once, when first
    needed: a caller may decide from the objective alone not to invert), and the Adam loop."""

    def __init__(self, model: Model, shapes: dict[str, tuple], classes: int = 0, activations: int | None = None):
        """``activations``: the elements every node's outputs hold for one sample
        (:attr:`~onnxprune.analysis.Analysis.activations`), which bound the batch one reverse
        pass takes; None: any batch in one pass."""
        self.name = graph_inputs(model)[0].name
        batched = copy_model(model)
        fix_input_dims(batched, shapes)  # inverted at the analysis shapes: the reverse pass may need them static
        make_batch_dynamic(batched)
        self._aux, self.objective, terms = _inversion_model(batched, shapes, classes)
        self._session = None
        #: Whether the session is made for each distillation (the model holds its weights).
        self._remake = bool(held.held_tensors(batched)) and held.active()
        #: Why the inversion could not run (no gradient graph, a reverse pass onnxruntime
        #: refused), for the report: the inputs are then noise from the prior.
        self.failure: str | None = None
        self._batched, self._shapes = batched, shapes
        #: The batch-statistics terms, where a batch can be inverted in parts (every term's
        #: positions known); their sessions live for one distillation.
        self._terms = terms if terms and all(t.positions for t in terms) else None
        self._parts: _Parts | None = None
        per_sample = 3 * 4 * activations if activations else None
        #: Samples one reverse pass takes (a whole batch, up to SPLIT_BYTES), and a part's.
        self.whole = max(1, SPLIT_BYTES // per_sample) if per_sample else sys.maxsize
        self.part = max(1, PART_BYTES // per_sample) if per_sample else sys.maxsize

    @property
    def session(self):
        """The gradient session; None when the model has no gradient graph or nothing to invert.

        A model that holds its weights (a large one, inside the CLI's holding block) makes its
        session in a block of its own: the flipped kernels its gradient graph holds then live
        as long as the session that feeds them, not as long as the CLI's block, and the session
        is dropped after each distillation and made again for the next (resnet50: 62 MB less
        through every probe step, for one more gradient graph at the check)."""
        if self._session is None and self._aux is not None and self.failure is None:
            aux = self._aux
            if not self._remake:
                self._aux = None
            try:
                with _own_block(self._remake):
                    self._session = session(input_gradient_model(aux))
            except Exception as exc:  # no gradient graph (GradientUnsupported) or no session: use plain noise
                logger.info("no gradient graph for distillation: %s", exc)
                self.failure = f"no gradient graph: {first_line(exc)}"
                self._aux = None
        return self._session

    @property
    def usable(self) -> bool:
        return self.session is not None

    def distill(self, shape: tuple[int, ...], prior: InputPrior, rng: np.random.Generator,
                steps: int = 150, anneal: bool = False, label: str = "distilling inputs") -> np.ndarray | None:
        """``shape[0]`` inverted inputs, or None when there is nothing to invert; ``anneal``:
        ANNEALED_LR decayed on a cosine, else the constant LR."""
        if self.session is None:
            return None
        x = prior.sample(shape, rng).astype(np.float32)
        feeds = {LABELS: np.zeros(shape[0], np.int64)}
        if self.objective.classes:
            classes = rng.permutation(np.arange(shape[0]) % self.objective.classes)
            feeds[TARGETS] = np.eye(self.objective.classes, dtype=np.float32)[classes]
        image = len(shape) == 4 and min(shape[2:]) > 2 * JITTER
        scale = prior.std * (ANNEALED_LR if anneal else LR)
        m, v = np.zeros_like(x), np.zeros_like(x)
        for t in range(1, steps + 1):  # Adam on the input
            shift = tuple(int(s) for s in rng.integers(-JITTER, JITTER + 1, 2)) if image else (0, 0)
            try:
                grad = self._gradient(_roll(x, shift), feeds, t == steps)
            except Exception as exc:  # a model that does not batch: fall back to noise
                logger.info("distillation stopped: %s", first_line(exc))
                self.failure = f"onnxruntime could not run its reverse pass on {shape[0]} inputs: {first_line(exc)}"
                self._parts = None
                return None
            if not np.all(np.isfinite(grad)):  # statistics overflowed: keep the last finite inputs
                logger.info("distillation stopped at step %d: the gradient is not finite", t)
                break
            grad = _roll(grad, (-shift[0], -shift[1])) + _prior_gradient(x, prior, image)
            m = 0.9 * m + 0.1 * grad
            with np.errstate(over="ignore"):  # a finite gradient past 1e19 squares to inf: a zero step there
                v = 0.999 * v + 0.001 * grad**2
            decay = 0.5 * (1 + math.cos(math.pi * (t - 1) / steps)) if anneal else 1.0
            x = x - (scale * decay) * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
            if prior.low is not None:
                x = np.clip(x, prior.low, prior.high)
            advance(label, t, steps)
        self._parts = None  # its two sessions are made again for the next batch that needs them
        if self._remake:
            self._session = None
        release_memory()  # the arena the last run shrank, and the steps' arrays
        return x.astype(np.float32)

    def _gradient(self, x: np.ndarray, feeds: dict[str, np.ndarray], last: bool) -> np.ndarray:
        """d (summed per-sample loss) / d x over the whole batch: in one reverse pass, or where
        the batch's activations pass SPLIT_BYTES, in parts: exact for the batch statistics,
        which couple the samples (:class:`_Parts`), and plain slices for per-sample class
        targets. Statistics whose positions are unknown run whole."""
        options = SHRINK_ARENA if last else None
        if len(x) > self.whole and self._terms is not None:
            if self._parts is None:
                with _own_block(self._remake):  # its surrogate's flipped kernels go with it
                    self._parts = _Parts(self._batched, self._terms, self._shapes, self.name)
            return self._parts.gradient(x, self.part, options)
        if len(x) > self.whole and not (self.objective.batchnorm or self.objective.balance):
            return np.concatenate([self.session.run([INPUT_GRAD], {k: v[lo:lo + self.part] for k, v in
                                                                   {self.name: x, **feeds}.items()}, options)[0]
                                   for lo in range(0, len(x), self.part)])
        return self.session.run([INPUT_GRAD], {self.name: x, **feeds}, options)[0]


def _own_block(hold: bool):
    """A holding block whose arrays live as long as what references them (the sessions made in
    it feed theirs), where the model holds; otherwise nothing."""
    return held.holding() if hold else contextlib.nullcontext()


class _Parts:
    """The batch-statistics inversion of a batch too large for one reverse pass, in parts, with
    the whole batch's gradient.

    The objective ``T`` reads the batch only through each term's channel means ``m`` and mean
    squares ``q`` over samples and positions. A forward pass over the parts measures them
    (``stats``); ``T`` and its derivatives in ``m`` and ``q`` follow in numpy, and then each
    part's reverse pass runs a surrogate whose gradient is the whole batch's on that part:
    per term, ``sum(a x + b x^2)`` with ``a = dT/dm / (n P)``, ``b = dT/dq / (n P)`` (``n`` the
    part's samples, ``P`` positions a sample), offset so that its value is ``T``. The loss of
    each sample, ``log(1 + e^s)``, then weighs every part as it weighs the whole batch."""

    def __init__(self, model: Model, terms: list[_Term], shapes: dict[str, tuple], name: str):
        self.name, self.terms = name, terms
        edit = ModelEditor(model)
        b = edit.emitter("onnxprune_parts_{n}")
        outputs = []
        for term in self.terms:
            axes = [0, *range(2, term.rank)]
            outputs += [b.reduce_sum(term.tensor, axes, keepdims=0),
                        b.reduce_sum(b.add("Mul", [term.tensor, term.tensor]), axes, keepdims=0)]
        edit.extend(b)
        edit.set_outputs(outputs, np.float32)
        self._stats = session(edit.finish())
        surrogate = ModelEditor(model)
        b = surrogate.emitter("onnxprune_parts_{n}")
        x = surrogate.inputs[0]
        zero = b.add("Mul", [b.add("Flatten", [b.reduce_mean(x, list(range(1, max(len(shapes.get(x) or ()), 2))))],
                                   axis=1), _f32(b, 0.0)])  # [N, 1] zeros
        column = b.add("Add", [zero, OFFSET])
        for k, term in enumerate(self.terms):
            channels = len(term.running[0]) if term.running is not None else shapes[term.tensor][1]
            dims = [1, channels] + [1] * (term.rank - 2)  # static: the builder may run it to measure shapes
            surrogate.add_input(f"{ALPHA}{k}", np.float32, dims)
            surrogate.add_input(f"{BETA}{k}", np.float32, dims)
            part = b.add("Add", [b.add("Mul", [term.tensor, f"{ALPHA}{k}"]),
                                 b.add("Mul", [b.add("Mul", [term.tensor, term.tensor]), f"{BETA}{k}"])])
            column = b.add("Add", [column, b.reduce_sum(part, list(range(term.rank)), keepdims=0)])
        logits = b.add("Concat", [zero, column], axis=1)
        surrogate.add_input(OFFSET, np.float32, [1])
        surrogate.extend(b)
        surrogate.set_outputs([logits], np.float32)
        self._gradient = session(input_gradient_model(surrogate.finish()))

    def gradient(self, x: np.ndarray, part: int, options) -> np.ndarray:
        parts = [x[lo:lo + part] for lo in range(0, len(x), part)]
        sums = [[np.asarray(v, np.float64) for v in self._stats.run(None, {self.name: p})] for p in parts]
        grads = []
        value, dm, dq = self._objective([sum(s[i] for s in sums) for i in range(len(sums[0]))], len(x))
        for p, own in zip(parts, sums):
            n = len(p)
            feeds = {self.name: p, LABELS: np.zeros(n, np.int64)}
            here = 0.0
            for k, term in enumerate(self.terms):
                shape = (1, -1) + (1,) * (term.rank - 2)
                a, b = dm[k] / (n * term.positions), dq[k] / (n * term.positions)
                feeds[f"{ALPHA}{k}"] = a.reshape(shape).astype(np.float32)
                feeds[f"{BETA}{k}"] = b.reshape(shape).astype(np.float32)
                here += float(a @ own[2 * k] + b @ own[2 * k + 1])
            feeds[OFFSET] = np.array([value - here], np.float32)
            grads.append(self._gradient.run([INPUT_GRAD], feeds, options)[0])
        return np.concatenate(grads)

    def _objective(self, sums: list[np.ndarray], total: int) -> tuple[float, list, list]:
        """``T`` and, per term, ``dT/dm`` and ``dT/dq`` from the channel sums of the batch."""
        values, dm, dq = [], [], []
        for k, term in enumerate(self.terms):
            count = total * term.positions
            m, q = sums[2 * k] / count, sums[2 * k + 1] / count
            v = np.maximum(q - m * m, 0.0)
            c = len(m)
            if term.running is not None:
                rm, rv = term.running
                inv = 1.0 / np.maximum(rv, 1e-6)
                s = np.sqrt(v + 1e-6)
                values.append(float(np.mean(((m - rm) ** 2 + (s - np.sqrt(rv)) ** 2) * inv)))
                dm.append((2 * (m - rm) - 2 * m * (s - np.sqrt(rv)) / s) * inv / c)
                dq.append((s - np.sqrt(rv)) / s * inv / c)
            else:
                e = v + 1e-6
                values.append(float(np.mean(m * m / e)))
                dm.append((2 * m / e + 2 * m ** 3 / e ** 2) / c)
                dq.append(-(m * m) / e ** 2 / c)
        scale = 1.0 / len(self.terms)  # the terms' mean
        return float(np.sum(values)) * scale, [d * scale for d in dm], [d * scale for d in dq]


def _roll(x: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    return x if shift == (0, 0) else np.roll(x, shift, axis=(2, 3))


def _prior_gradient(x: np.ndarray, prior: InputPrior, image: bool) -> np.ndarray:
    """Gradient of the image priors, per sample, each a mean over the sample's elements in
    prior variances (so O(1), like the other terms): squared differences of neighbouring
    pixels on both spatial axes (images only), and the squared distance from the prior's mean."""
    size = x[0].size
    var = max(prior.std, 1e-6) ** 2
    grad = (2 * L2_WEIGHT / (var * size)) * (x - prior.mean)
    if image:
        for axis in (2, 3):
            d = np.diff(x, axis=axis)
            g = np.zeros_like(x)
            lo = [slice(None)] * 4
            hi = [slice(None)] * 4
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            g[tuple(lo)] -= d
            g[tuple(hi)] += d
            grad += (2 * TV_WEIGHT / (var * size)) * g
    return grad


def _inversion_model(model: Model, shapes: dict[str, tuple],
                     classes: int) -> tuple[Model | None, Objective, list[_Term]]:
    """``model`` with one output, logits ``[0, s]`` per sample, ``s`` the inversion objective
    (None when the model offers nothing to invert: no BatchNorm, no activations on feature
    maps, not a classifier); what it matches; and its batch-statistics terms."""
    edit = ModelEditor(model)
    b = edit.emitter("onnxprune_inv_{n}")
    found = _batch_terms(edit, shapes)
    terms = [_mismatch(b, t.tensor, t.rank, *t.running) for t in found if t.running is not None]
    x = edit.inputs[0]
    axes = list(range(1, max(len(shapes.get(x) or ()), 2)))
    zero = b.add("Mul", [b.add("Flatten", [b.reduce_mean(x, axes)], axis=1), _f32(b, 0.0)])  # [N, 1] zeros
    column = zero
    balance = [_imbalance(b, t.tensor) for t in found if t.running is None]
    for part in (terms, balance):
        if part:
            total = part[0]
            for t in part[1:]:
                total = b.add("Add", [total, t])
            column = b.add("Add", [column, b.add("Div", [total, _f32(b, float(len(part)))])])
    # Class targets only where there is nothing inside the net to match: on a conv net they make
    # confident class exemplars, on which a pruned model keeps its decisions far better than on
    # real inputs (digits ResNet, paoding at the uniform-0.4 MACs: held-out cosine 0.91 with
    # class targets, 0.56 without, 0.52 on the real test split; its BatchNorms folded: class
    # targets 0.94 reported, 0.31 real).
    classes = classes if _logits(edit) is not None and not terms and not balance else 0
    if classes:
        edit.add_input(TARGETS, np.float32, ["N", classes])
        log_p = b.add("LogSoftmax", [_logits(edit)], axis=1)
        ce = b.add("Neg", [b.reduce_sum(b.add("Mul", [log_p, TARGETS]), [1])])  # [N, 1]
        column = b.add("Add", [column, b.add("Mul", [ce, _f32(b, CE_WEIGHT)])])
    objective = Objective(bool(terms), classes, bool(balance))
    if not terms and not balance and not classes:
        return None, objective, found
    logits = b.add("Concat", [zero, column], axis=1)
    edit.extend(b)
    edit.set_outputs([logits], np.float32)
    return edit.finish(), objective, found


@dataclass(frozen=True)
class _Term:
    """A batch-statistics term of the objective: the channel statistics of ``tensor`` (channels
    on axis 1, ``positions`` elements a channel a sample) against a BatchNorm's ``running``
    mean and variance, or (None) centred, as a folded BatchNorm's pre-activation was."""

    tensor: str
    rank: int
    positions: int | None
    running: tuple[np.ndarray, np.ndarray] | None


def _batch_terms(edit: ModelEditor, shapes: dict[str, tuple]) -> list[_Term]:
    """The objective's batch-statistics terms: every BatchNorm's input against its running
    statistics, or where there is none, the pre-activations of the conv net it was folded into."""
    terms = []
    for node in edit.nodes():
        if node.op_type != "BatchNormalization" or len(node.inputs) < 5:
            continue
        rm, rv = (edit.constant(name) for name in node.inputs[3:5])
        shape = shapes.get(node.inputs[0]) or ()
        if rm is None or rv is None or rm.ndim != 1 or len(shape) < 2:
            continue
        terms.append(_Term(node.inputs[0], len(shape), _positions(shape),
                           (rm.astype(np.float32), rv.astype(np.float32))))
    if not terms:
        terms = [_Term(t, 4, _positions(shapes[t]), None) for t in _pre_activations(edit, shapes)]
    return terms


def _positions(shape: tuple) -> int | None:
    rest = shape[2:]
    return math.prod(rest) if all(isinstance(d, int) and d > 0 for d in rest) else None


def _logits(edit: ModelEditor) -> str | None:
    """The first output, or the logits before a final Softmax/LogSoftmax on it."""
    out = edit.outputs[0]
    for node in edit.nodes():
        if out in node.outputs and node.op_type in ("Softmax", "LogSoftmax"):
            return node.inputs[0]
    return out


#: Activations whose input a BatchNorm normalised in a conv net trained with one (SiLU's
#: Sigmoid included; a squeeze-excitation gate reads a 1x1 map and is left out by position).
_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "HardSwish", "Elu", "Selu", "Gelu", "Mish",
                          "Sigmoid"})


def _pre_activations(edit: ModelEditor, shapes: dict[str, tuple]) -> list[str]:
    """The inputs of activations on feature maps (``[N, C, H, W]``, more than one position):
    where a conv net trained with BatchNorm had one before its BatchNorms were folded. An
    activation that makes a graph output (a segmenter's Sigmoid) reads scores, not features."""
    out, outputs = [], set(edit.outputs)
    for node in edit.nodes():
        shape = shapes.get(node.inputs[0]) if node.inputs else None
        if node.op_type in _ACTIVATIONS and shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1 \
                and not outputs.intersection(node.outputs):
            out.append(node.inputs[0])
    return list(dict.fromkeys(out))


def _imbalance(b: NodeEmitter, x: str) -> str:
    """The mean over channels of ``(m / s)^2``: how far each channel of ``x`` (``[N, C, H, W]``)
    is from centred, its mean ``m`` and deviation ``s`` taken over the batch and positions."""
    m, v = _channel_moments(b, x, [0, 2, 3])
    z2 = b.add("Div", [b.add("Mul", [m, m]), b.add("Add", [v, _f32(b, 1e-6)])])
    return b.reduce_mean(z2, [0, 1, 2, 3], keepdims=0)


def _mismatch(b: NodeEmitter, x: str, rank: int, rm: np.ndarray, rv: np.ndarray) -> str:
    """How far the batch statistics of ``x`` (channels on axis 1) are from the running ones
    ``rm``, ``rv``: the mean over channels of ``((m - rm)^2 + (s - sqrt(rv))^2) / rv``, the
    statistics taken over the batch and every position."""
    shape = [1, -1] + [1] * (rank - 2)
    m, v = _channel_moments(b, x, [0, *range(2, rank)])
    inv = _f32(b, (1.0 / np.maximum(rv, 1e-6)).reshape(shape))
    dm = b.add("Sub", [m, _f32(b, rm.reshape(shape))])
    ds = b.add("Sub", [b.add("Sqrt", [b.add("Add", [v, _f32(b, 1e-6)])]), _f32(b, np.sqrt(rv).reshape(shape))])
    term = b.add("Mul", [b.add("Add", [b.add("Mul", [dm, dm]), b.add("Mul", [ds, ds])]), inv])
    return b.reduce_mean(term, list(range(rank)), keepdims=0)


def _channel_moments(b: NodeEmitter, x: str, axes: list[int]) -> tuple[str, str]:
    """Each channel's mean and (biased) variance over ``axes`` of ``x``, kept as broadcastable dims."""
    m = b.reduce_mean(x, axes)
    centred = b.add("Sub", [x, m])
    return m, b.reduce_mean(b.add("Mul", [centred, centred]), axes)


def _f32(b: NodeEmitter, value) -> str:
    return b.const(np.asarray(value, np.float32))
