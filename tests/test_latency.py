"""Latency targets: parsing, the cost model's shape (monotone in channel counts, non-negative
fits) and a prune that plans to the share asked for. Nothing here asserts a timing: what the
machine measures belongs to bench/latency.py."""

from __future__ import annotations

from pathlib import Path

import nets
import numpy as np
import onnx
import pytest
from onnxprune.passes import latency as latency_pass
from onnxprune.passes.cost import MacModel
from onnxprune.passes.latency import latency_terms

from onnxprune.errors import UserError
from onnxprune.ir import OpChain, import_graph, resolve_shapes
from onnxprune.latency import CLASSES, LatencyCalibration, OpCost, nnls, predict_us
from onnxprune.pipeline import analyse, parse_target, prune

MODELS = Path(__file__).resolve().parent.parent / "models"


def _calibration() -> LatencyCalibration:
    """Coefficients of the size a real fit gives, without timing anything."""
    ops = {kind: OpCost(1.0, 1e-5, 1e-4, 1e-4) for kind in CLASSES}
    return LatencyCalibration(1, 8.0, 1e-4, ops, 0, 0.0, 0.0, 0.0)


def test_a_latency_target_is_parsed_like_the_others():
    assert parse_target("latency=0.6") == ("latency", 0.6)
    assert parse_target("latency") == ("latency", None)
    for bad in ("latency=0", "latency=1.5", "latency=1", "latency=fast"):
        with pytest.raises(UserError, match="latency=S"):
            parse_target(bad)
    with pytest.raises(UserError, match="not both"):
        prune(nets.mlp(), 0.4, target="latency=0.6")


@pytest.mark.parametrize("argv", [["--target", "latency=0"], ["--target", "latency=1.5"],
                                  ["--ratio", "0.4", "--target", "latency=0.6"],
                                  ["--target", "latency=0.6", "--latency-threads", "-1"]])
def test_bad_latency_arguments_exit_2_and_write_nothing(capsys, tmp_path, argv):
    from onnxprune.cli import main

    model, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(nets.mlp(), str(model))
    assert main([str(model), str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_nnls_is_non_negative_and_optimal():
    rng = np.random.default_rng(0)
    a = rng.random((30, 4))
    b = a @ np.array([2.0, -1.0, 0.5, 0.0]) + 0.01 * rng.standard_normal(30)
    x = nnls(a, b)
    assert (x >= 0).all()
    gradient = a.T @ (a @ x - b)  # KKT: zero where x > 0, non-negative where x = 0
    assert np.allclose(gradient[x > 0], 0, atol=1e-8) and (gradient[x == 0] >= -1e-8).all()
    for mask in range(1, 16):  # no feasible least-squares fit on any subset of columns does better
        cols = [i for i in range(4) if mask >> i & 1]
        fit = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
        if (fit >= 0).all():
            assert np.linalg.norm(a @ x - b) <= np.linalg.norm(a[:, cols] @ fit - b) + 1e-9


@pytest.mark.parametrize("chain", [
    lambda c, d: OpChain("Conv", (1, c, 8, 8), 1, (d, c, 3, 3), attrs={"pads": [1] * 4}),
    lambda c, d: OpChain("MatMul", (4, c), 1, (c, d)),
    lambda c, d: OpChain("Conv", (1, c, 8, 8), 1, (c, 1, 3, 3), attrs={"pads": [1] * 4, "group": c}),
])
def test_a_node_costs_no_less_with_more_channels(chain):
    cal = _calibration()
    widths = (4, 8, 16, 32)
    cost = np.zeros((len(widths), len(widths)))
    for i, c in enumerate(widths):
        for j, d in enumerate(widths):
            model, _ = chain(c, d).model()
            cost[i, j] = predict_us(import_graph(model), resolve_shapes(model, {"x": chain(c, d).shape}), cal)
    assert (np.diff(cost, axis=0) >= 0).all() and (np.diff(cost, axis=1) >= 0).all()


def test_the_latency_cost_model_falls_with_every_unit_removed():
    analysis = analyse(nets.resnet())
    groups = analysis.dep.prunable_groups([])
    cost = MacModel(analysis.dep, groups, "latency", latency_terms(analysis.dep, _calibration()))
    assert all(amount >= 0 for amount, _ in cost.terms)
    last = cost.total()
    for g in groups:
        saved = cost.marginal(g)
        assert (saved >= 0).all() and saved.sum() > 0, g.name
        for unit in range(g.size - 1):
            cost.remove(g, unit)
            now = cost.total()
            assert now <= last + 1e-9
            last = now
    assert last < cost.base


def test_a_latency_target_plans_the_share_asked_for(monkeypatch):
    # The machine's calibration, the model's refit and the timed correction of the counts time
    # things: a fixed calibration, no refit and no correction make the plan the same on every
    # machine (the report still measures, unasserted).
    monkeypatch.setattr(latency_pass, "calibrate", lambda threads: _calibration())
    monkeypatch.setattr(latency_pass, "REFIT_RATIOS", ())
    monkeypatch.setattr(latency_pass, "MEASURED_ROUNDS", 0)
    target = "latency=0.6"
    pruned, report = prune(MODELS / "vgg.onnx", method="magnitude", target=target, round_to=1, latency_threads=1,
                           check=1, input_range=(0.0, 1.0))
    onnx.checker.check_model(pruned)
    check = report.latency
    assert report.target == target and check.threads == 1
    assert abs(check.predicted_share - 0.6) <= 0.02 * 0.6, check.predicted_share
    assert {m.threads for m in check.measured} == {0, 1}  # measured, never asserted: timings are the bench's
    assert check.fit["fixed_scale"] == check.fit["width_scale"] == 1.0
    assert report.to_dict()["latency"]["predicted_share"] == check.predicted_share
    assert report.after.macs < report.before.macs


def test_a_latency_target_out_of_reach_says_why():
    # The digits MLP is three Gemms: per-run and per-node overhead are most of its time. This
    # one calibrates and refits for real (the error does not hang on how fast anything ran).
    with pytest.raises(UserError, match="out of reach.*overhead"):
        prune(MODELS / "mlp.onnx", method="magnitude", target="latency=0.3", latency_threads=1, check=0)


def test_removal_counts_are_corrected_by_what_is_timed(monkeypatch):
    """A machine where pruned widths take 15% more than the model says: the timed correction
    asks for a lower goal and keeps the counts timed closest to the share."""
    analysis = analyse(MODELS / "vgg.onnx", input_range=(0.0, 1.0))
    groups = analysis.dep.prunable_groups([])
    cost = MacModel(analysis.dep, groups, "latency", latency_terms(analysis.dep, _calibration()))

    def timed(_, removals, threads):
        return [100.0, 100.0 * min(1.0, 1.15 * cost.after_removal(removals[0]) / cost.base)]
    monkeypatch.setattr(latency_pass, "_timed", timed)
    ratio, counts, goal = latency_pass.measured_counts(analysis, cost, groups, 0.6, 1, 1)
    assert goal < 0.6 * cost.base
    kept = 1.15 * cost.after_uniform(groups, counts) / cost.base
    first = cost.counts_for(groups, 0.6 * cost.base, 1, cost.ratio_for(groups, 0.6 * cost.base, 1))
    assert abs(kept - 0.6) < abs(1.15 * cost.after_uniform(groups, first) / cost.base - 0.6)
    assert abs(kept - 0.6) <= 0.02 * 0.6
