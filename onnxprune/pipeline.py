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
from onnxprune.evidence.recalibration import recalibrate, refitted_inputs
from onnxprune.evidence.refit import refit
from onnxprune.fidelity import Fidelity, evidence_warnings, fidelity_on, output_warnings, split_feeds
from onnxprune.ir import (
    Model,
    ModelStats,
    Shape,
    check_model,
    model_stats,
    random_inputs,
    resolve_shapes,
    session,
    signature,
    skeleton,
    to_model,
)
from onnxprune.latency import LatencyCheck, channel_block
from onnxprune.latency import measure as measure_latency
from onnxprune.pass_infra import Pass, PassManager, PassResult
from onnxprune.passes.latency import REFIT_TOLERANCE
from onnxprune.passes.lower import DedupeConstants
from onnxprune.passes.methods import Budget, Progress
from onnxprune.passes.reconstruct import Reconstructor
from onnxprune.passes.registry import AUTO, METHODS, choose_method
from onnxprune.plan import PruningPlan
from onnxprune.profiling import reporting, stage
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
    #: What the budget counted: "channels", "macs", "params", "latency", or "macs=S" /
    #: "params=S" / "latency=S" (a share to keep, which ``ratio`` was found for).
    target: str = "channels"
    #: What synthetic inputs look like (``--input-range``, or fitted to the first BatchNorm).
    input_prior: str = ""
    #: The calibration set planning and the fidelity check used instead of synthetic inputs
    #: ("" when data-free): where it came from and how many samples it held.
    calibration: str = ""
    #: What the report cannot vouch for (weak synthetic evidence), one sentence each.
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    #: A latency target: the predicted share and the shares measured (None for other targets).
    latency: LatencyCheck | None = None

    @property
    def chosen_by(self) -> str | None:
        """Why the method ran, where ``auto`` chose it (None for a method asked for by name)."""
        return self.plan.details.get("chosen_by") if self.plan is not None else None

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (PruningPlan, LatencyCheck)):
                out[f.name] = value.to_dict()
            else:
                out[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return out


#: The ratio when neither a ratio nor a target share is given.
DEFAULT_RATIO = 0.4
#: The method ``onnxprune IN OUT`` and ``prune(model)`` run: ``auto`` picks, per model, the one that
#: keeps the most at equal MACs in the benchmarks (bench/run.py; :func:`choose_method`).
DEFAULT_METHOD = AUTO


@dataclass
class PruneSettings:
    """What the user asked for (``prune``'s keyword arguments)."""

    #: Share of each group's channels to remove; None: 0.4, unless the target gives a share.
    ratio: float | None = None
    method: str = DEFAULT_METHOD
    input_shapes: dict[str, Shape] | None = None
    exclude: list[str] = field(default_factory=list)
    #: Kept channel counts are multiples of it; None: 1, or for a latency target the channel
    #: block of onnxruntime's convolutions on this CPU (:func:`onnxprune.latency.channel_block`).
    round_to: int | None = None
    seed: int = 0
    check: int = 8
    min_cosine: float | None = None
    options: dict | None = None
    progress: Progress | None = None
    compensate: bool = True
    input_range: tuple[float, float] | None = None
    step: float | None = None
    method_options: dict = field(default_factory=dict)
    #: What the budget counts (see :func:`parse_target`); None: the method's default.
    target: str | None = None
    reconstruction: str | None = None
    #: Unlabelled inputs by graph input name (``--calibration``): they replace synthetic ones.
    calibration: dict | None = None
    #: Latency targets: the intra-op threads planned for (0: onnxruntime's default, all cores).
    latency_threads: int = 0
    #: Re-fit the pruned model's layers to the original's, and re-estimate the BatchNorm
    #: statistics they do not settle, on the planning inputs, where those stand for real ones
    #: (see :attr:`PruningPlan.recalibrate` and :attr:`PruningPlan.refit`); part of compensation.
    recalibrate: bool = True

    def validate(self) -> None:
        if self.target is None:
            self.target = default_target(self.method)
        kind, share = parse_target(self.target)
        if self.round_to is None:
            self.round_to = channel_block() if kind == "latency" else 1
        if self.latency_threads < 0:
            raise UserError(f"--latency-threads is 0 (all) or a positive count, got {self.latency_threads}")
        if share is not None and self.ratio is not None:
            raise UserError(f"give either a ratio or a target share ({self.target}), not both")
        if share is None and self.ratio is None:
            self.ratio = DEFAULT_RATIO
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS and self.method != AUTO:
            raise UserError(f"unknown method '{self.method}'; choose from {', '.join([AUTO, *METHODS])}")
        if self.round_to < 1:
            raise UserError(f"--round-to must be a positive integer, got {self.round_to}")

    def budget(self) -> Budget:
        kind, share = parse_target(self.target)
        if self.reconstruction not in (None, "least-squares", "pair"):
            raise UserError(f"reconstruction is 'least-squares' or 'pair', got '{self.reconstruction}'")
        return Budget(self.ratio if share is None else 0.0, self.round_to, list(self.exclude), self.seed,
                      self.compensate, self.step, target=kind, reconstruction=self.reconstruction, share=share,
                      latency_threads=self.latency_threads)


def default_target(method: str) -> str:
    """Methods that allocate (the progressive ones) match the uniform plan's MACs by default:
    spending a channel budget where it saves little compute is what a user did not ask for."""
    return "macs" if method == AUTO or getattr(METHODS.get(method), "allocates", False) else "channels"
TARGET_KINDS = ("channels", "macs", "params", "latency")


def parse_target(text: str) -> tuple[str, float | None]:
    """``"macs"`` -> ("macs", None): as much as the uniform ratio removes; ``"macs=0.5"`` ->
    ("macs", 0.5): keep half the model's MACs (``params`` and ``latency`` alike: latency as
    onnxruntime measures it on this machine; ``channels`` takes no share)."""
    kind, _, value = str(text).partition("=")
    kind = kind.strip().lower()
    if kind not in TARGET_KINDS:
        raise UserError(f"the target is one of {', '.join(TARGET_KINDS)} (all but channels take =SHARE), got '{text}'")
    if not value:
        return kind, None
    try:
        share = float(value)
    except ValueError:
        raise UserError(f"expected {kind}=SHARE with SHARE a number in (0, 1), got '{text}'") from None
    if kind == "channels" or not 0 < share < 1:
        raise UserError(f"a target share is macs=S, params=S or latency=S with S in (0, 1), got '{text}'")
    return kind, share


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
    #: What passes had to do differently from what was asked, for the report's warnings.
    notes: list[str] = field(default_factory=list)
    #: The budget the plan was made for (None for a replayed plan).
    budget: Budget | None = None


class _Timed(Pass[PruneJob]):
    """A pipeline pass: ``stage`` names its entry in the report's timings."""

    stage = "stage"

    def done(self, job: PruneJob) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, job: PruneJob) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, job: PruneJob) -> PassResult[PruneJob]:
        # the stage holds the checks too: the rewrite's (onnx.checker) cost time and memory
        t0 = time.perf_counter()
        with stage(self.stage):
            result = super().__call__(job)
        if result.modified:
            job.seconds[self.stage] = job.seconds.get(self.stage, 0.0) + time.perf_counter() - t0
        return result

    def call(self, job: PruneJob) -> PassResult[PruneJob]:
        if self.done(job):
            return PassResult(job, False)
        self.run(job)
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
        name, why = choose_method(job.analysis, s.exclude) if s.method == AUTO else (s.method, "")
        method = METHODS[name](**s.method_options)
        # A method that cannot plan the model hands it on (auto's next choice is paoding), down
        # to magnitude: the default method must not fail where a simpler one works.
        for fallback in (["paoding"] if s.method == AUTO else []) + ["magnitude"]:
            if name == fallback:
                continue
            reason = method.cannot_plan(job.analysis)
            if not reason:
                break
            job.notes.append(f"{name} cannot plan this model ({reason}): it was planned with {fallback} instead")
            why = f"{name} could not plan it" if s.method == AUTO else ""
            name, method = fallback, METHODS[fallback]()
        job.budget = s.budget()
        job.plan = method.plan(job.analysis, job.budget, s.progress)
        if s.method == AUTO:
            job.plan.details["chosen_by"] = f"auto: {why}"
        job.plan.recalibrate = s.recalibrate and s.compensate and job.plan.compensate and job.analysis.recalibrates(s.seed)
        job.plan.refit = job.plan.recalibrate
        cost = job.budget.cost
        if cost is not None and cost.fit is not None:  # latency: what the plan's cost model predicts
            removed = {gp.group: gp.remove for gp in job.plan.groups}
            job.plan.details["latency"] = {"predicted_share": cost.after_removal(removed) / cost.base,
                                           "fit": cost.fit.to_dict()}
            if cost.fit.refit_error > REFIT_TOLERANCE:
                job.notes.append(f"the model's own runs follow the latency cost model loosely (off by up to "
                                 f"{cost.fit.refit_error:.0%} at uniform widths): onnxruntime changes kernels or "
                                 "layouts with these channel counts, so the measured share may stray from the "
                                 "predicted one")


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
        with stage("slice"):
            graph, dep = fork(job.analysis.graph, job.analysis.dep)
            graph = apply_plan(graph, dep, plan, plan.corrections if plan.compensate else None)
            job.pruned_graph = DedupeConstants()(graph).value
        if plan.recalibrate and plan.compensate:
            analysis = job.analysis
            pool = analysis.synthetic(analysis.statistics_count, plan.seed)
            fitted: set[str] = set()
            if plan.refit:
                with stage("refit"):
                    fitted = refit(job.pruned_graph, analysis.graph, analysis.model, pool.arrays,
                                   removed_by_space(analysis.dep, plan), analysis.batch, analysis.shapes)
            with stage("recalibrate"):
                done = recalibrate(job.pruned_graph, analysis.model, pool.arrays, analysis.batch,
                                   skip=refitted_inputs(job.pruned_graph, fitted) if fitted else set())
            samples = len(next(iter(pool.arrays.values())))
            plan.details["recalibrated"] = {"layers": len(fitted), "batchnorms": done, "inputs": samples,
                                            "source": pool.source}
        with stage("export"):
            job.pruned = to_model(job.pruned_graph, job.analysis.model, hold=True)

    def ensures(self, job):
        with stage("check"):
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
        after_shapes = resolve_shapes(skeleton(job.pruned_graph, job.pruned), analysis.input_shapes)
        latency = _latency_check(job) if parse_target(s.target)[0] == "latency" else None
        if s.check <= 0:  # no check asked for: no held-out inputs to make
            job.report = _report(job, None, after_shapes, latency)
            return
        batch = analysis.batch
        held_out = analysis.synthetic(s.check * batch, s.seed, held_out=True)
        axes = analysis.sample_axes if held_out.kind == "synthetic" else None  # calibration: samples first
        arrays = held_out.arrays
        if axes is None:
            rows = len(next(iter(held_out.arrays.values())))  # a calibration set may hold fewer than a batch
            arrays = {k: v[np.arange(max(rows, batch)) % rows] for k, v in held_out.arrays.items()}
        feeds = split_feeds(arrays, batch, axes)
        try:
            with stage("fidelity"):
                fidelity = fidelity_on(analysis.model, job.pruned, feeds,
                                       f"held-out {held_out.kind} inputs, {held_out.source}")
        except Exception as exc:
            _original_runs(analysis.model, feeds[0])
            raise InternalError(f"onnxruntime cannot run the pruned model (a bug): {str(exc).splitlines()[0]}") from None
        job.report = _report(job, fidelity, after_shapes, latency)
        job.report.warnings.extend(evidence_warnings(held_out) + output_warnings(fidelity))
        if s.min_cosine is not None and fidelity.cosine < s.min_cosine:
            error = FidelityError(f"output cosine {fidelity.cosine:.4f} is below --min-cosine {s.min_cosine}")
            error.model, error.report = job.pruned, job.report  # type: ignore[attr-defined]
            raise error


def _original_runs(model: Model, feed: dict) -> None:
    """A UserError when onnxruntime cannot run the model as given either (batch-first recurrent
    layers, layout=1, have no CPU kernel): then the pruned model cannot be checked, which is
    not a bug of the pruning."""
    try:
        session(model).run(None, feed)
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run the model itself, so the pruned one cannot be checked: "
                        f"{str(exc).splitlines()[0]}") from None


def _latency_check(job: PruneJob) -> LatencyCheck:
    """Both models timed in onnxruntime, interleaved: at one thread, at all threads, and at
    the threads planned for; with what the plan's cost model predicted (a replayed plan
    carries it in its details)."""
    threads = job.settings.latency_threads
    analysis = job.analysis
    feed = random_inputs(analysis.model, analysis.input_shapes, np.random.default_rng(job.settings.seed))
    with stage("latency check"):
        measured = [measure_latency(analysis.model, job.pruned, feed, t) for t in dict.fromkeys((threads, 1, 0))]
    details = job.plan.details.get("latency") or {}
    return LatencyCheck(threads, details.get("predicted_share"), measured, details.get("fit"))


def _report(job: PruneJob, fidelity: Fidelity | None, after_shapes: dict,
            latency: LatencyCheck | None = None) -> PruneReport:
    analysis, dep, s = job.analysis, job.analysis.dep, job.settings
    prunable = dep.prunable_groups(s.exclude)
    blocked: dict[str, int] = {}
    for g in dep.groups:
        if g.blocked:
            blocked[g.blocked[0]] = blocked.get(g.blocked[0], 0) + 1
    before, after = model_stats(analysis.model, analysis.shapes), model_stats(job.pruned, after_shapes)
    return PruneReport(
        method=job.plan.method, ratio=job.plan.ratio, target=s.target, before=before, after=after,
        groups_total=len(dep.groups), groups_prunable=len(prunable), groups_pruned=len(job.plan.groups),
        blocked=blocked, channels_removed=job.plan.removed_units, channels_prunable=sum(g.size for g in prunable),
        fidelity=fidelity, input_shapes=analysis.input_shapes, plan=job.plan, seconds=job.seconds,
        input_prior=analysis.prior.source, calibration=_calibration_note(analysis), latency=latency,
        warnings=list(job.notes) + _missed_target(s.target, before, after, latency, s.round_to)
        + _off_block(analysis.model, job.pruned, s.round_to))


def _off_block(original: Model, pruned: Model, round_to: int) -> list[str]:
    """A warning when convolutions that ran in onnxruntime's blocked (NCHWc) kernels lost that
    by pruning: widths off the CPU's channel block run in plain NCHW with reorders around them,
    and a model at half the MACs can run slower than the original (digits VGG and ResNet at
    macs=0.5: 1.3-1.5x the original's latency unaligned, 0.69-0.75x at --round-to 16)."""
    from onnxprune.latency import channel_block

    block = channel_block()
    if round_to % block == 0:
        return []

    def widths(model: Model) -> dict[str, int]:
        init = {t.name: tuple(t.dims) for t in model.graph.initializer}
        return {n.output[0]: init[n.input[1]][0] for n in model.graph.node
                if n.op_type == "Conv" and len(n.input) > 1 and len(init.get(n.input[1], ())) == 4}

    was, now = widths(original), widths(pruned)
    off = [name for name, w in now.items() if w % block and was.get(name, 0) % block == 0 and name in was]
    if not off:
        return []
    return [f"{len(off)} convolution(s) now have output channels off onnxruntime's {block}-channel block on this "
            f"CPU, which can make the pruned model slower than the original; --round-to {block} keeps them aligned "
            "(or --target latency=S, which aligns by default)"]


def _missed_target(target: str, before: ModelStats, after: ModelStats, latency: LatencyCheck | None = None,
                   round_to: int = 1) -> list[str]:
    """A warning when a target share was missed by more than 2%: passed (steps too coarse:
    heads, blocks of grouped convolutions, --round-to) or not reached (groups blocked or at
    their floor hold the rest); for latency, what the cost model did not foresee; nothing
    otherwise."""
    kind, share = parse_target(target)
    if share is None:
        return []
    if kind == "latency":
        return _missed_latency(target, share, latency)
    kept = getattr(after, kind) / max(getattr(before, kind), 1)
    if abs(kept - share) <= 0.02 * share:
        return []
    steps = f" (and --round-to {round_to})" if round_to > 1 else ""
    if kept < share:  # removal steps too coarse to stop nearer (grouped convolutions, heads, alignment)
        return [f"the target {target} was passed: {kept:.1%} of the {kind} kept; the groups' removal steps "
                f"(whole heads, blocks of grouped convolutions{steps}) could not stop nearer"]
    if round_to > 1:
        return [f"the target {target} was not reached: {kept:.1%} of the {kind} kept; channel counts move in steps "
                f"of {round_to} (--round-to), and the closest step is this far off (or the rest sit in groups "
                "that are blocked or at their floor: onnxprune inspect says which)"]
    return [f"the target {target} was not reached: {kept:.1%} of the {kind} kept; the rest sit in groups that "
            "are blocked or already at their floor (onnxprune inspect says which and why)"]


def _missed_latency(target: str, share: float, latency: LatencyCheck) -> list[str]:
    """The measured share is what a latency target promises; the prediction is what planned it."""
    measured = latency.share
    if abs(measured - share) <= 0.02 * share:
        return []
    predicted = "" if latency.predicted_share is None else f" (the cost model predicted {latency.predicted_share:.1%})"
    threads = "all threads" if latency.threads == 0 else f"{latency.threads} thread(s)"
    return [f"the target {target} was not reached: the pruned model takes {measured:.1%} of the original's time at "
            f"{threads}{predicted}, timed interleaved on this machine; small models and busy machines time "
            "unsteadily, and onnxruntime's kernel choices change with channel counts, which the model only "
            "approximates (a second run, or --latency-threads 1, may read differently)"]


def _calibration_note(analysis: Analysis) -> str:
    cal = analysis.calibration
    if cal is None:
        return ""
    return (f"{cal.origin}: {cal.samples} samples, the first {cal.samples - cal.held_out_count} for planning, "
            f"the last {cal.held_out_count} held out")


def pipeline() -> PassManager[PruneJob]:
    """The passes :func:`prune` runs, in order."""
    return PassManager([AnalysePass(), PlanPass(), ReconstructPass(), RewritePass(), VerifyPass()])


def prune(model: Model | str | os.PathLike, ratio: float | None = None, *, method: str = DEFAULT_METHOD,
          input_shapes: dict[str, Shape] | None = None, exclude: list[str] | None = None, round_to: int | None = None,
          seed: int = 0, check: int = 8, min_cosine: float | None = None, plan: PruningPlan | None = None,
          options: dict | None = None, progress: Progress | None = None, compensate: bool = True,
          input_range: tuple[float, float] | None = None, step: float | None = None,
          method_options: dict | None = None, target: str | None = None, reconstruction: str | None = None,
          calibration: dict | None = None, latency_threads: int = 0,
          recalibrate: bool = True) -> tuple[Model, PruneReport]:
    """Prune ``model`` and return the pruned ModelProto and a report.

    ``method``: a registered method, or "auto" (the default), which runs the one
    :func:`choose_method` picks for the model (``report.method`` names it,
    ``report.plan.details["chosen_by"]`` says why).

    Raises :class:`UserError` for bad input, :class:`FidelityError` when the mean output cosine
    on ``check`` probes falls below ``min_cosine`` (the pruned model rides on the exception as
    ``.model`` and ``.report``), :class:`InternalError` when the result fails validation.

    ``calibration`` (unlabelled inputs by graph input name, samples on the first axis; see
    :func:`onnxprune.evidence.calibration.load_calibration`) replaces the synthetic inputs:
    planning uses its first three quarters, the fidelity check the last quarter.

    ``recalibrate``: with compensation, the pruned model's Conv, Gemm and MatMul layers are re-fitted
    to the original's outputs, and the BatchNorms they do not feed re-estimated, on the
    planning inputs where those stand for real ones (distilled from the BatchNorm statistics,
    or ``calibration``; see :mod:`onnxprune.evidence.refit` and
    :mod:`onnxprune.evidence.recalibration`).

    ``target``: "channels" (a uniform ratio's channels), "macs", "params" or "latency" (as
    much as the uniform ratio removes, allocated by the method), or "macs=S" / "params=S" /
    "latency=S": keep the share S of the model's MACs, parameters, or latency in onnxruntime
    on this machine at ``latency_threads`` intra-op threads (0: all); instead of a ratio: giving
    both is a UserError. The default is "macs" for auto and the methods that allocate (paoding,
    srdfp, autodfp), "channels" for the others. A latency target plans with a cost model calibrated on this
    machine and refitted on the model's own runs, keeps channel counts multiples of the
    runtime's channel block unless ``round_to`` is given, and reports the predicted and the
    measured share (``report.latency``); a share out of reach is a UserError.
    """
    settings = PruneSettings(ratio=ratio, method=method, input_shapes=input_shapes, exclude=list(exclude or []),
                             round_to=round_to, seed=seed, check=check, min_cosine=min_cosine, options=options,
                             progress=progress, compensate=compensate, input_range=input_range, step=step,
                             method_options=method_options or {}, target=target, reconstruction=reconstruction,
                             calibration=calibration, latency_threads=latency_threads, recalibrate=recalibrate)
    if plan is not None and not compensate:
        plan.compensate = False
    if plan is not None and not recalibrate:  # a replayed plan: turning it off wins
        plan.recalibrate = False
    with reporting(progress):
        job = pipeline()(PruneJob(model, settings, plan=plan)).value
    return job.pruned, job.report
