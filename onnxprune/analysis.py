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
from onnxprune.evidence.distill import distill
from onnxprune.evidence.priors import InputPrior, MomentPropagation, infer_input_prior
from onnxprune.evidence.statistics import ChannelStats
from onnxprune.evidence.statistics import measure as measure_stats
from onnxprune.ir import (
    Model,
    Shape,
    concrete_input_shapes,
    count_macs,
    import_graph,
    input_dtypes,
    input_specs,
    load_model,
    resolve_shapes,
    skeleton,
    to_model,
)
from onnxprune.pass_infra import PassManager
from onnxprune.passes.lower import lowering_passes
from onnxprune.plan import Corrections
from onnxprune.rewrite import corrected

#: How many synthetic inputs channel statistics are measured on (fewer for large models).
STATISTICS_INPUTS = (16, 128)


@dataclass
class SyntheticInputs:
    """Synthetic inputs by graph input name, and what they were made from (``kind``:
    "synthetic", or "calibration" when they are samples of the user's calibration set)."""

    arrays: dict[str, np.ndarray]
    source: str
    kind: str = "synthetic"


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

    @property
    def unbatched(self) -> set[str]:
        """Inputs whose first axis is not the batch (a recurrent state [layers, batch, hidden], a
        scalar sample rate): synthetic inputs give them their exact shape, one value shared by
        every sample, and feeds pass them whole. The batch is the first axis of the first input
        that has one; an input whose first axis has another size is not batched."""
        ranked = [shape for shape in self.input_shapes.values() if len(shape)]
        batch = ranked[0][0] if ranked else 1
        return {name for name, shape in self.input_shapes.items() if not len(shape) or shape[0] != batch}

    def probe_inputs(self, count: int, seed: int) -> dict[str, np.ndarray]:
        """Seeded synthetic probe inputs, distilled from BatchNorm statistics where the model
        has them (computed once, on the weights as analysed)."""
        return self.synthetic(count, seed).arrays

    def synthetic(self, count: int, seed: int, held_out: bool = False) -> SyntheticInputs:
        """``count`` synthetic inputs and what they are. ``held_out`` ones come from a seed
        stream no method plans with, so that a check on them is not a check on the inputs
        the channels were chosen with. With a calibration set they are its samples instead:
        planning's from the first three quarters, held-out ones from the last quarter (at
        most ``count``, fewer when the part is smaller: see :mod:`onnxprune.evidence.calibration`)."""
        key = (count, seed, held_out)
        if key not in self._probe_inputs and self.calibration is not None:
            arrays, source = self.calibration.take(count, seed, held_out)
            self._probe_inputs[key] = SyntheticInputs(arrays, source, "calibration")
        if key not in self._probe_inputs:
            rng = np.random.default_rng([seed, 1] if held_out else seed)
            prior = self.prior
            inputs, distilled_any = {}, False
            dtypes = input_dtypes(self.model)
            for name, dtype in dtypes.items():
                whole = name in self.unbatched
                shape = tuple(self.input_shapes[name]) if whole else (count, *self.input_shapes[name][1:])
                if not np.issubdtype(dtype, np.floating):
                    inputs[name] = rng.integers(0, 2, size=shape).astype(dtype)
                    continue
                distilled = None
                if len(dtypes) == 1 and not whole:
                    steps = int(np.clip(2e11 / (3 * self.macs * count), 20, 150))
                    distilled = distill(to_model(self.graph.copy(), self.model), shape, prior, rng, steps=steps)
                distilled_any |= distilled is not None
                inputs[name] = (prior.sample(shape, rng) if distilled is None else distilled).astype(dtype)
            source = "distilled from BatchNorm statistics" if distilled_any else f"input prior ({prior.source})"
            self._probe_inputs[key] = SyntheticInputs(inputs, source)
        return self._probe_inputs[key]

    def statistics(self, spaces: list[tuple[str, int]], seed: int = 0, ridges: dict | None = None,
                   corrections: Corrections | None = None) -> dict[tuple[str, int], ChannelStats]:
        """Channel means and covariances of ``spaces`` on the graph with ``corrections`` in,
        measured on synthetic inputs (as many as about 2e10 MACs buy, 16 to 128: heads after
        global pooling see one position per input). ``ridges`` holds a chosen ridge per space
        and gets the cross-validated choice for the spaces it lacks."""
        count = int(np.clip(2e10 / self.macs, *STATISTICS_INPUTS))
        return measure_stats(corrected(self.graph, corrections), self.model, self.probe_inputs(count, seed), spaces,
                             ridges=ridges)

    @cached_property
    def macs(self) -> int:
        """The model's multiply-accumulates as analysed (at least 1)."""
        return max(count_macs(self.model, self.shapes), 1)

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
        model = load_model(model)
    shapes_in = concrete_input_shapes(model, input_shapes or {})
    if calibration is not None:
        specs = [replace(spec, dims=tuple(shapes_in[spec.name])) for spec in input_specs(model)]
        calibration = check_calibration(calibration, specs, getattr(calibration, "origin", "arrays passed in"))
    graph = PassManager(lowering_passes())(import_graph(model)).value
    graph.cleanup().toposort()
    shapes = resolve_shapes(skeleton(graph, model), shapes_in)
    dep = DependencyGraph(graph, shapes, options)
    if input_range is not None and not input_range[0] < input_range[1]:
        raise UserError(f"--input-range needs LOW < HIGH, got {input_range[0]:g},{input_range[1]:g}")
    return Analysis(model, graph, shapes_in, shapes, dep, input_range, calibration)
