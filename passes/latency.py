"""The latency budget (``--target latency=S``): the analysed model's run time in onnxruntime
on this machine, as terms of a :class:`~onnxprune.passes.cost.MacModel`.

The machine's calibration (:func:`onnxprune.latency.calibrate`) prices every node the model
executes: its overhead is a fixed term; its MACs and weights scale with its input and output
channels, the activations it moves with the channels of each tensor. Then the model itself
is timed at its full width and at the uniform widths of ``REFIT_RATIOS`` (any channels do:
only their count matters to the runtime), and the fixed and the width-dependent parts of the
prediction are each scaled by one factor fitted to those runs (non-negative least squares on
relative error). onnxruntime's fusions and layout changes make a small model's fixed cost
differ from the sum of its ops' (docs/performance.md: what the refit buys, per model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
from onnxprune.passes.cost import MacModel, Term, node_mac_spaces
from onnxprune.passes.planning import lowest, removal_count

from onnxprune.depgraph import ChannelGroup, DependencyGraph
from onnxprune.errors import UserError
from onnxprune.ir import Model, interleaved_medians, random_inputs, session, to_model
from onnxprune.latency import LatencyCalibration, calibrate, nnls, node_features
from onnxprune.plan import GroupPlan, PruningPlan
from onnxprune.profiling import stage
from onnxprune.rewrite import apply_plan, fork

logger = logging.getLogger(__name__)

#: The uniform ratios the model is timed at, besides its full width, to refit the prediction
#: (none: the calibration's prediction as it is).
REFIT_RATIOS = (0.3, 0.6)
#: Seconds of interleaved runs of the model and its refit variants.
REFIT_SECONDS = 1.5
#: A target's removal counts are timed and corrected until they keep the share within this
#: (relative), at most MEASURED_ROUNDS times.
MEASURED_TOLERANCE = 0.01
MEASURED_ROUNDS = 3  # 0: the cost model's counts, untimed
#: A refit worse than this on the model's own runs is worth a warning in the report.
REFIT_TOLERANCE = 0.05
#: The most a uniform plan removes when the floor of a target is sought (as ``ratio_for``).
FLOOR_RATIO = 0.95


@dataclass
class LatencyFit:
    """How the latency model of one model was made: the machine's calibration, the runs it
    was refitted on, and what the refit says."""

    threads: int
    #: The machine's calibration: run cost, chains timed, median and worst error on them, seconds.
    calibration: dict
    refit_ratios: list[float]
    #: Microseconds, full width first: as timed, and as the calibration alone predicted.
    measured_us: list[float]
    predicted_us: list[float]
    fixed_scale: float
    width_scale: float
    #: The share of the refitted model's full-width time that no channel removal touches.
    fixed_share: float
    #: The worst |refitted - measured| / measured over the runs it was refitted on: how well
    #: the model's own runs follow the cost model's shape.
    refit_error: float
    #: A target's rounds of removal counts timed (:func:`measured_counts`): the goal, the
    #: predicted and the measured share of each.
    rounds: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def latency_terms(dep: DependencyGraph, calibration: LatencyCalibration) -> list[Term]:
    """Microseconds of one run of ``dep``'s graph, as cost terms (see the module docstring)."""
    shapes = dep.ctx.shapes
    sizes = {key: dep.nx.nodes[key]["size"] for key in dep.nx.nodes}

    def spaces(name: str) -> tuple:
        return tuple((name, a) for a in range(len(shapes.get(name) or ())) if sizes.get((name, a)))

    terms: list[Term] = [(calibration.run_us(dep.graph, shapes), ())]
    for f in node_features(dep.graph, shapes):
        cost = calibration.ops[f.kind]
        macs = node_mac_spaces(f.node, shapes)
        terms.append((cost.overhead, ()))
        terms.append((cost.per_mac * f.macs + cost.per_weight * f.weights, macs[1] if macs else ()))
        terms.extend((cost.per_element * n, spaces(name)) for name, n in f.tensors)
    return [t for t in terms if t[0] > 0]


def uniform_removal(groups: list[ChannelGroup], ratio: float, round_to: int) -> dict[int, list[int]]:
    """Units a uniform ``ratio`` removes from each group: the first ones (of every balanced block)."""
    return {g.id: lowest(g, np.arange(g.size, dtype=float), removal_count(g, ratio, round_to)) for g in groups}


def uniform_variant(analysis, removed: dict[int, list[int]]) -> Model:
    """The analysed model without ``removed``, uncompensated: only its shapes matter."""
    groups = {g.id: g for g in analysis.dep.groups}
    plan = PruningPlan("latency-refit", 0.0, 0, [GroupPlan(gid, groups[gid].name, groups[gid].size, list(units))
                                                  for gid, units in removed.items() if units], compensate=False)
    graph, dep = fork(analysis.graph, analysis.dep)
    return to_model(apply_plan(graph, dep, plan), analysis.model)


def latency_model(analysis, groups: list[ChannelGroup], threads: int = 0, round_to: int = 1) -> MacModel:
    """The latency cost model of ``analysis`` at ``threads`` intra-op threads (0: all), refitted
    on the model's own runs at ``REFIT_RATIOS``; its :class:`LatencyFit` is its ``fit`` attribute."""
    t0 = time.perf_counter()
    with stage("latency calibration"):
        calibration = calibrate(threads)
    cost = MacModel(analysis.dep, groups, "latency", latency_terms(analysis.dep, calibration))
    fixed = sum(amount for amount, keys in cost.terms if not keys)
    removals = [uniform_removal(groups, r, round_to) for r in REFIT_RATIOS]
    predicted = [cost.base] + [cost.after_removal(r) for r in removals]
    measured, a, b = [], 1.0, 1.0
    if removals:
        measured = _timed(analysis, removals, threads)
        a, b = _refit(fixed, predicted, measured)
    refitted = cost.rescaled(a, b)
    fitted = a * fixed + b * (np.array(predicted) - fixed)
    refitted.fit = LatencyFit(
        threads, {k: v for k, v in calibration.to_dict().items() if k != "ops"}, list(REFIT_RATIOS),
        [float(m) for m in measured], [float(p) for p in predicted], float(a), float(b),
        float(a * fixed / max(refitted.base, 1e-12)),
        float(np.max(np.abs(fitted - measured) / measured)) if measured else 0.0, [], time.perf_counter() - t0)
    logger.info("latency model: fixed x%.2f, width x%.2f, fixed share %.0f%%", a, b, 100 * refitted.fit.fixed_share)
    return refitted


def measured_counts(analysis, cost: MacModel, groups: list[ChannelGroup], share: float, round_to: int,
                    threads: int) -> tuple[float, dict[int, int], float]:
    """(ratio, removal counts, goal in the cost's units) that keep ``share`` of the latency as
    timed, not only as predicted: the counts the cost model gives are timed (their structure is
    all that matters, so any units do), and while the time misses the share by more than
    ``MEASURED_TOLERANCE`` the goal is scaled by share / measured and the counts found again,
    ``MEASURED_ROUNDS`` times at most; the counts timed closest to the share are kept. Each
    round is recorded in ``cost.fit.rounds``."""
    goal = share * cost.base
    ratio = cost.ratio_for(groups, goal, round_to)
    tried = [(float("inf"), ratio, cost.counts_for(groups, goal, round_to, ratio), goal)]  # nothing timed (0 rounds)
    for _ in range(MEASURED_ROUNDS):
        ratio = cost.ratio_for(groups, goal, round_to)
        counts = cost.counts_for(groups, goal, round_to, ratio)
        removal = {g.id: lowest(g, np.arange(g.size, dtype=float), counts[g.id]) for g in groups}
        original, timed = _timed(analysis, [removal], threads)
        tried.append((abs(timed / original - share), ratio, counts, goal))
        if cost.fit is not None:
            cost.fit.rounds.append({"goal": goal / cost.base, "predicted": cost.after_removal(removal) / cost.base,
                                    "measured": timed / original})
        if abs(timed / original - share) <= MEASURED_TOLERANCE * share:
            break
        goal *= share / (timed / original)
    _, ratio, counts, goal = min(tried, key=lambda t: t[0])
    return ratio, counts, goal


def _timed(analysis, removals: list[dict[int, list[int]]], threads: int) -> list[float]:
    """Microseconds of one run of the analysed model and of each uniform variant, interleaved."""
    with stage("latency refit"):
        models = [analysis.model] + [uniform_variant(analysis, r) for r in removals]
        feed = random_inputs(analysis.model, analysis.input_shapes, np.random.default_rng(0))
        return [t * 1e6 for t in interleaved_medians([(session(m, threads), feed) for m in models], REFIT_SECONDS)]


def _refit(fixed: float, predicted: list[float], measured: list[float]) -> tuple[float, float]:
    """The factors of the fixed and of the width-dependent prediction that best explain the
    measured runs (relative error, non-negative)."""
    predicted, measured = np.asarray(predicted), np.asarray(measured)
    design = np.stack([np.full(len(predicted), fixed), predicted - fixed], axis=1)
    scale = np.maximum(np.abs(design / measured[:, None]).max(axis=0), 1e-30)
    a, b = nnls(design / measured[:, None] / scale, np.ones(len(measured))) / scale
    return float(a), float(b)


def check_reachable(cost: MacModel, groups: list[ChannelGroup], share: float, round_to: int) -> None:
    """A UserError when even the largest uniform plan keeps more than ``share`` of the
    predicted latency (by more than the 2% a target may miss by): what it cannot remove is
    per-run and per-node overhead, and groups that cannot shrink in steps of ``round_to``."""
    counts = {g.id: removal_count(g, FLOOR_RATIO, round_to) for g in groups}
    floor = cost.after_uniform(groups, counts) / cost.base
    if floor <= share * 1.02:
        return
    why = [f"{cost.fit.fixed_share:.0%} of its time is per-run and per-node overhead"] if cost.fit else []
    stuck = sum(1 for g in groups if counts[g.id] == 0)
    if round_to > 1 and stuck:
        why.append(f"{stuck} of its {len(groups)} prunable groups cannot shrink in steps of {round_to} channels "
                   "(--round-to; the default for latency is the runtime's channel block)")
    raise UserError(f"latency={share:g} is out of reach for this model on this machine: pruning channels keeps at "
                    f"least {floor:.0%} of its predicted latency ({'; '.join(why) or 'nothing shrinks'}); "
                    f"ask for {floor:.2f} or more")


__all__ = ["REFIT_TOLERANCE", "LatencyFit", "check_reachable", "latency_model", "latency_terms", "measured_counts",
           "uniform_removal", "uniform_variant"]
