"""The pipeline: load -> lower -> analyse -> plan -> rewrite -> verify/report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxprune.activations import ChannelStats
from onnxprune.activations import measure as measure_stats
from onnxprune.depgraph import DependencyGraph
from onnxprune.errors import FidelityError, InternalError, UserError
from onnxprune.fidelity import Fidelity, measure_fidelity
from onnxprune.ir import (
    ModelStats,
    Shape,
    check_model,
    concrete_input_shapes,
    count_macs,
    graph_inputs,
    import_graph,
    load_model,
    model_stats,
    resolve_shapes,
    signature,
    skeleton,
    to_model,
)
from onnxprune.pass_infra import PassManager
from onnxprune.passes.lower import DedupeConstants, lowering_passes
from onnxprune.passes.methods import METHODS, Budget, Progress
from onnxprune.passes.reconstruct import Reconstructor, consumer_spaces
from onnxprune.plan import PruningPlan
from onnxprune.priors import InputPrior, MomentPropagation, infer_input_prior
from onnxprune.rewrite import apply_plan
from onnxprune.synthesis import distill

logger = logging.getLogger(__name__)


#: How many synthetic inputs channel statistics are measured on (fewer for large models).
STATISTICS_INPUTS = (16, 128)


@dataclass
class Analysis:
    """Everything passes may read about the model being pruned."""

    model: onnx.ModelProto          # as loaded
    graph: gs.Graph                 # the lowered graph the dependency graph indexes
    input_shapes: dict[str, Shape]
    shapes: dict[str, Shape]
    dep: DependencyGraph
    input_range: tuple[float, float] | None = None
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
        if (count, seed) not in self._probe_inputs:
            rng = np.random.default_rng(seed)
            prior = self.prior
            inputs = {}
            for value in graph_inputs(self.model):
                shape = (count, *self.input_shapes[value.name][1:])
                dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
                if not np.issubdtype(dtype, np.floating):
                    inputs[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
                    continue
                distilled = None
                if len(graph_inputs(self.model)) == 1:
                    steps = int(np.clip(2e11 / (3 * self.macs * count), 20, 150))
                    distilled = distill(to_model(self.graph.copy(), self.model), shape, prior, rng, steps=steps)
                inputs[value.name] = (prior.sample(shape, rng) if distilled is None else distilled).astype(dtype)
            self._probe_inputs[count, seed] = inputs
        return self._probe_inputs[count, seed]

    def statistics(self, spaces: list[tuple[str, int]], seed: int = 0,
                   ridges: dict | None = None) -> dict[tuple[str, int], ChannelStats]:
        """Channel means and covariances of ``spaces`` on the graph as it is now, measured on
        synthetic inputs (as many as about 2e10 MACs buy, 16 to 128: heads after global pooling
        see one position per input). ``ridges`` holds a chosen ridge per space and gets the
        cross-validated choice for the spaces it lacks."""
        count = int(np.clip(2e10 / self.macs, *STATISTICS_INPUTS))
        return measure_stats(self.graph, self.model, self.probe_inputs(count, seed), spaces, ridges=ridges)

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


@dataclass
class PruneReport:
    method: str
    ratio: float
    before: ModelStats
    after: ModelStats
    groups_total: int
    groups_prunable: int
    groups_pruned: int
    blocked: dict[str, int]
    channels_removed: int
    channels_prunable: int
    fidelity: Fidelity | None
    input_shapes: dict[str, Shape]
    plan: PruningPlan
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def analyse(model: onnx.ModelProto | str | os.PathLike, input_shapes: dict[str, Shape] | None = None,
            options: dict | None = None, input_range: tuple[float, float] | None = None) -> Analysis:
    """Lower a model and build its channel dependency graph."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    shapes_in = concrete_input_shapes(model, input_shapes or {})
    graph = import_graph(model)
    graph = PassManager(lowering_passes()).call(graph).graph
    graph.cleanup().toposort()
    shapes = resolve_shapes(skeleton(graph, model), shapes_in)
    dep = DependencyGraph(graph, shapes, options)
    if input_range is not None and not input_range[0] < input_range[1]:
        raise UserError(f"--input-range needs LOW < HIGH, got {input_range[0]:g},{input_range[1]:g}")
    return Analysis(model, graph, shapes_in, shapes, dep, input_range)


def _check_signature(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    if signature(original) != signature(pruned):
        raise InternalError(f"the pruned model's signature changed: {signature(original)} -> {signature(pruned)}")


def prune(model: onnx.ModelProto | str | os.PathLike, ratio: float = 0.4, *, method: str = "magnitude",
          input_shapes: dict[str, Shape] | None = None, exclude: list[str] | None = None, round_to: int = 1,
          seed: int = 0, check: int = 8, min_cosine: float | None = None, plan: PruningPlan | None = None,
          options: dict | None = None, progress: Progress | None = None, compensate: bool = True,
          input_range: tuple[float, float] | None = None, step: float | None = None,
          method_options: dict | None = None, target: str = "channels", reconstruction: str | None = None,
          ) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune ``model`` and return the pruned ModelProto and a report.

    Raises :class:`UserError` for bad input, :class:`FidelityError` when the mean output cosine
    on ``check`` probes falls below ``min_cosine`` (the pruned model rides on the exception as
    ``.model`` and ``.report``), :class:`InternalError` when the result fails validation.
    """
    if not 0 < ratio < 1:
        raise UserError(f"ratio must be in (0, 1), got {ratio}")
    if method not in METHODS:
        raise UserError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    if round_to < 1:
        raise UserError(f"--round-to must be a positive integer, got {round_to}")
    timings = {}
    t0 = time.perf_counter()
    analysis = analyse(model, input_shapes, options, input_range)
    original = analysis.model
    timings["analyse"] = time.perf_counter() - t0
    if target not in ("channels", "macs"):
        raise UserError(f"the budget target is 'channels' or 'macs', got '{target}'")
    if reconstruction not in (None, "least-squares", "pair"):
        raise UserError(f"reconstruction is 'least-squares' or 'pair', got '{reconstruction}'")
    budget = Budget(ratio, round_to, list(exclude or []), seed, compensate, step, target=target,
                    reconstruction=reconstruction)

    t0 = time.perf_counter()
    applied = False  # progressive methods compensate step by step while they plan
    if plan is None:
        plan = METHODS[method](**(method_options or {})).plan(analysis, budget, progress)
        applied = plan.details.pop("compensated", False)
    elif not compensate:
        plan.compensate = False
    if plan.compensate and not applied:
        plan_seed = plan.seed  # a replayed plan measures on the synthetic inputs it was planned with
        Reconstructor(analysis.dep, analysis.moments,
                      statistics=lambda spaces, ridges: analysis.statistics(spaces, plan_seed, ridges),
                      spaces=consumer_spaces(*(analysis.dep.groups[gp.group] for gp in plan.groups))).apply(plan)
    timings["plan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    graph = apply_plan(analysis.graph, analysis.dep, plan)
    graph = DedupeConstants().call(graph).graph
    pruned = to_model(graph, original)
    timings["rewrite"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    check_model(pruned)
    _check_signature(original, pruned)
    try:
        fidelity = measure_fidelity(original, pruned, analysis.input_shapes, max(check, 1), seed, analysis.prior)
    except Exception as exc:
        raise InternalError(f"onnxruntime cannot run the pruned model (a bug): {str(exc).splitlines()[0]}") from None
    after_shapes = resolve_shapes(skeleton(graph, pruned), analysis.input_shapes)
    timings["verify"] = time.perf_counter() - t0

    dep = analysis.dep
    prunable = dep.prunable_groups(budget.exclude)
    blocked: dict[str, int] = {}
    for g in dep.groups:
        if g.blocked:
            blocked[g.blocked[0]] = blocked.get(g.blocked[0], 0) + 1
    report = PruneReport(
        method=plan.method, ratio=ratio,
        before=model_stats(original, analysis.shapes), after=model_stats(pruned, after_shapes),
        groups_total=len(dep.groups), groups_prunable=len(prunable), groups_pruned=len(plan.groups),
        blocked=blocked, channels_removed=plan.removed_units,
        channels_prunable=sum(g.size for g in prunable),
        fidelity=fidelity if check > 0 else None, input_shapes=analysis.input_shapes, plan=plan,
        seconds=timings,
    )
    if min_cosine is not None and fidelity.cosine < min_cosine:
        error = FidelityError(f"output cosine {fidelity.cosine:.4f} is below --min-cosine {min_cosine}")
        error.model, error.report = pruned, report  # type: ignore[attr-defined]
        raise error
    return pruned, report
