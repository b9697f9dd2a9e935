"""The pipeline: load -> lower/analyse -> plan -> reconstruct -> rewrite -> verify/report.

:func:`prune` runs it as a list of passes over a :class:`PruneJob`, each filling in what it
produces (a second run of a pass finds its part done and changes nothing); the pass manager
checks their pre- and postconditions: the rewrite ensures the checker and the signature.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis import Analysis, analyse
from onnxprune.errors import FidelityError, InternalError, UserError
from onnxprune.fidelity import Fidelity, fidelity_on, split_feeds
from onnxprune.ir import Model, ModelStats, Shape, check_model, model_stats, resolve_shapes, signature, skeleton, to_model
from onnxprune.pass_infra import Pass, PassManager, PassResult
from onnxprune.passes.lower import DedupeConstants
from onnxprune.passes.methods import Budget, Progress
from onnxprune.passes.reconstruct import Reconstructor
from onnxprune.passes.registry import METHODS
from onnxprune.plan import PruningPlan
from onnxprune.rewrite import apply_plan, fork, removed_by_space

__all__ = ["Analysis", "PruneJob", "PruneReport", "PruneSettings", "analyse", "pipeline", "prune"]

logger = logging.getLogger(__name__)


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
    #: What synthetic inputs look like (``--input-range``, or fitted to the first BatchNorm).
    input_prior: str = ""
    #: The calibration set planning and the fidelity check used instead of synthetic inputs
    #: ("" when data-free): where it came from and how many samples it held.
    calibration: str = ""
    #: What the report cannot vouch for (weak synthetic evidence), one sentence each.
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PruningPlan):
                out[f.name] = value.to_dict()
            else:
                out[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return out


@dataclass
class PruneSettings:
    """What the user asked for (``prune``'s keyword arguments)."""

    ratio: float = 0.4
    method: str = "magnitude"
    input_shapes: dict[str, Shape] | None = None
    exclude: list[str] = field(default_factory=list)
    round_to: int = 1
    seed: int = 0
    check: int = 8
    min_cosine: float | None = None
    options: dict | None = None
    progress: Progress | None = None
    compensate: bool = True
    input_range: tuple[float, float] | None = None
    step: float | None = None
    method_options: dict = field(default_factory=dict)
    target: str = "channels"
    reconstruction: str | None = None
    #: Unlabelled inputs by graph input name (``--calibration``): they replace synthetic ones.
    calibration: dict | None = None

    def validate(self) -> None:
        if not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.round_to < 1:
            raise UserError(f"--round-to must be a positive integer, got {self.round_to}")

    def budget(self) -> Budget:
        if self.target not in ("channels", "macs"):
            raise UserError(f"the budget target is 'channels' or 'macs', got '{self.target}'")
        if self.reconstruction not in (None, "least-squares", "pair"):
            raise UserError(f"reconstruction is 'least-squares' or 'pair', got '{self.reconstruction}'")
        return Budget(self.ratio, self.round_to, list(self.exclude), self.seed, self.compensate, self.step,
                      target=self.target, reconstruction=self.reconstruction)


@dataclass
class PruneJob:
    """One pruning run: the input and settings, and what each pass has produced so far."""

    source: Model | str | os.PathLike
    settings: PruneSettings
    analysis: Analysis | None = None
    plan: PruningPlan | None = None
    pruned: Model | None = None
    pruned_graph: gs.Graph | None = None
    report: PruneReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class _Timed(Pass[PruneJob]):
    """A pipeline pass: ``stage`` names its entry in the report's timings."""

    stage = "stage"

    def done(self, job: PruneJob) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, job: PruneJob) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def call(self, job: PruneJob) -> PassResult[PruneJob]:
        if self.done(job):
            return PassResult(job, False)
        t0 = time.perf_counter()
        self.run(job)
        job.seconds[self.stage] = job.seconds.get(self.stage, 0.0) + time.perf_counter() - t0
        return PassResult(job, True)


class AnalysePass(_Timed):
    """Load, lower, resolve shapes, build the dependency graph."""

    stage = "analyse"

    def done(self, job):
        return job.analysis is not None

    def requires(self, job):
        job.settings.validate()

    def run(self, job):
        s = job.settings
        job.analysis = analyse(job.source, s.input_shapes, s.options, s.input_range, s.calibration)


class PlanPass(_Timed):
    """The method's plan, unless the job came with one (a replayed ``--plan``)."""

    stage = "plan"

    def done(self, job):
        return job.plan is not None

    def requires(self, job):
        return None if job.analysis is not None else "the model is not analysed"

    def run(self, job):
        s = job.settings
        job.plan = METHODS[s.method](**s.method_options).plan(job.analysis, s.budget(), s.progress)


class ReconstructPass(_Timed):
    """The plan's corrections, where planning did not already compute them."""

    stage = "plan"

    def done(self, job):
        return not job.plan.compensate or job.plan.corrections is not None

    def requires(self, job):
        removed_by_space(job.analysis.dep, job.plan)  # a plan made for another model is a UserError

    def run(self, job):
        analysis, plan = job.analysis, job.plan
        # a replayed plan measures on the synthetic inputs it was planned with
        groups = [analysis.dep.groups[gp.group] for gp in plan.groups]
        plan.corrections = Reconstructor.for_analysis(analysis, groups, plan.seed).apply(plan)


class RewritePass(_Timed):
    """Corrections in, channels out, on a fork of the analysed graph; exported."""

    stage = "rewrite"

    def done(self, job):
        return job.pruned is not None

    def requires(self, job):
        return None if job.plan is not None else "there is no plan"

    def run(self, job):
        plan = job.plan
        graph, dep = fork(job.analysis.graph, job.analysis.dep)
        graph = apply_plan(graph, dep, plan, plan.corrections if plan.compensate else None)
        job.pruned_graph = DedupeConstants()(graph).value
        job.pruned = to_model(job.pruned_graph, job.analysis.model)

    def ensures(self, job):
        check_model(job.pruned)
        before, after = signature(job.analysis.model), signature(job.pruned)
        if before != after:
            raise InternalError(f"the pruned model's signature changed: {before} -> {after}")


class VerifyPass(_Timed):
    """Fidelity on seeded probes, sizes before and after, the report."""

    stage = "verify"

    def done(self, job):
        return job.report is not None

    def run(self, job):
        analysis, s = job.analysis, job.settings
        whole = analysis.unbatched
        shapes = [v for k, v in analysis.input_shapes.items() if k not in whole]
        batch = shapes[0][0] if shapes and shapes[0] else 1
        held_out = analysis.synthetic(max(s.check, 1) * batch, s.seed, held_out=True)
        batched = [v for k, v in held_out.arrays.items() if k not in whole]
        rows = len(batched[0]) if batched else batch  # a calibration set may hold fewer than a batch
        arrays = {k: v if k in whole else v[np.arange(max(rows, batch)) % rows] for k, v in held_out.arrays.items()}
        try:
            fidelity = fidelity_on(analysis.model, job.pruned, split_feeds(arrays, batch, whole),
                                   f"held-out {held_out.kind} inputs, {held_out.source}")
        except Exception as exc:
            raise InternalError(f"onnxruntime cannot run the pruned model (a bug): {str(exc).splitlines()[0]}") from None
        after_shapes = resolve_shapes(skeleton(job.pruned_graph, job.pruned), analysis.input_shapes)
        job.report = _report(job, fidelity if s.check > 0 else None, after_shapes)
        if held_out.kind == "synthetic" and not held_out.source.startswith("distilled"):
            job.report.warnings.append(
                "the model has no BatchNorm statistics to distil inputs from: planning and the fidelity row "
                "used noise from the input prior, which can read near 1 while real inputs disagree; give "
                "--calibration, or check the result with onnxprune eval")
        if s.min_cosine is not None and fidelity.cosine < s.min_cosine:
            error = FidelityError(f"output cosine {fidelity.cosine:.4f} is below --min-cosine {s.min_cosine}")
            error.model, error.report = job.pruned, job.report  # type: ignore[attr-defined]
            raise error


def _report(job: PruneJob, fidelity: Fidelity | None, after_shapes: dict) -> PruneReport:
    analysis, dep, s = job.analysis, job.analysis.dep, job.settings
    prunable = dep.prunable_groups(s.exclude)
    blocked: dict[str, int] = {}
    for g in dep.groups:
        if g.blocked:
            blocked[g.blocked[0]] = blocked.get(g.blocked[0], 0) + 1
    return PruneReport(
        method=job.plan.method, ratio=s.ratio,
        before=model_stats(analysis.model, analysis.shapes), after=model_stats(job.pruned, after_shapes),
        groups_total=len(dep.groups), groups_prunable=len(prunable), groups_pruned=len(job.plan.groups),
        blocked=blocked, channels_removed=job.plan.removed_units, channels_prunable=sum(g.size for g in prunable),
        fidelity=fidelity, input_shapes=analysis.input_shapes, plan=job.plan, seconds=job.seconds,
        input_prior=analysis.prior.source, calibration=_calibration_note(analysis))


def _calibration_note(analysis: Analysis) -> str:
    cal = analysis.calibration
    if cal is None:
        return ""
    return (f"{cal.origin}: {cal.samples} samples, the first {cal.samples - cal.held_out_count} for planning, "
            f"the last {cal.held_out_count} held out")


def pipeline() -> PassManager[PruneJob]:
    """The passes :func:`prune` runs, in order."""
    return PassManager([AnalysePass(), PlanPass(), ReconstructPass(), RewritePass(), VerifyPass()])


def prune(model: Model | str | os.PathLike, ratio: float = 0.4, *, method: str = "magnitude",
          input_shapes: dict[str, Shape] | None = None, exclude: list[str] | None = None, round_to: int = 1,
          seed: int = 0, check: int = 8, min_cosine: float | None = None, plan: PruningPlan | None = None,
          options: dict | None = None, progress: Progress | None = None, compensate: bool = True,
          input_range: tuple[float, float] | None = None, step: float | None = None,
          method_options: dict | None = None, target: str = "channels", reconstruction: str | None = None,
          calibration: dict | None = None) -> tuple[Model, PruneReport]:
    """Prune ``model`` and return the pruned ModelProto and a report.

    Raises :class:`UserError` for bad input, :class:`FidelityError` when the mean output cosine
    on ``check`` probes falls below ``min_cosine`` (the pruned model rides on the exception as
    ``.model`` and ``.report``), :class:`InternalError` when the result fails validation.

    ``calibration`` (unlabelled inputs by graph input name, samples on the first axis; see
    :func:`onnxprune.evidence.calibration.load_calibration`) replaces the synthetic inputs:
    planning uses its first three quarters, the fidelity check the last quarter.
    """
    settings = PruneSettings(ratio=ratio, method=method, input_shapes=input_shapes, exclude=list(exclude or []),
                             round_to=round_to, seed=seed, check=check, min_cosine=min_cosine, options=options,
                             progress=progress, compensate=compensate, input_range=input_range, step=step,
                             method_options=method_options or {}, target=target, reconstruction=reconstruction,
                             calibration=calibration)
    if plan is not None and not compensate:
        plan.compensate = False
    job = pipeline()(PruneJob(model, settings, plan=plan)).value
    return job.pruned, job.report
