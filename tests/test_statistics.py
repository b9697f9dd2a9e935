"""Channel statistics on synthetic inputs, and least-squares reconstruction from them."""

import nets
import numpy as np
import pytest

from onnxprune import prune
from onnxprune.evidence.statistics import (
    MAX_CHANNELS,
    MAX_POSITIONS,
    RIDGE,
    RIDGE_GRID,
    ChannelStats,
    _Moments,
    cross_validated_ridge,
    measure,
)
from onnxprune.ir import session
from onnxprune.pipeline import analyse
from onnxprune.plan import GroupPlan, PruningPlan


def _stats(seed=0, n=6):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    return ChannelStats(rng.standard_normal(n), np.diag(a @ a.T), a @ a.T, count=10**9)


def test_the_estimate_is_ridge_regression_on_the_kept_channels():
    st = _stats()
    removed, live = np.array([1, 4]), np.array([0, 2, 3, 5])
    b, residual = st.estimator(removed, live, ridge=1e-3)
    lam = 1e-3 * np.mean(np.diag(st.cov)[np.concatenate([removed, live])])
    kk = st.cov[np.ix_(live, live)] + lam * np.eye(len(live))
    expected = st.cov[np.ix_(removed, live)] @ np.linalg.inv(kk)
    np.testing.assert_allclose(b, expected, rtol=1e-8, atol=1e-10)
    explained = np.diag(expected @ st.cov[np.ix_(live, removed)])
    np.testing.assert_allclose(residual, np.diag(st.cov)[removed] - explained, rtol=1e-2, atol=1e-2)


def test_leave_one_out_matches_one_estimate_per_unit():
    st = _stats(1)
    live = np.arange(6)
    loo = st.leave_one_out([np.array([2]), np.array([3, 5])], live, ridge=1e-3)
    for k, atoms in enumerate(([2], [3, 5])):
        rest = np.setdiff1d(live, atoms)
        b, res = st.estimator(np.array(atoms), rest, ridge=1e-3)
        np.testing.assert_allclose(loo[k][0][:, rest], b, rtol=1e-6, atol=1e-9)
        assert np.all(loo[k][0][:, atoms] == 0)
        np.testing.assert_allclose(loo[k][1], res, rtol=1e-6, atol=1e-9)


def _folds(x):
    half = len(x) // 2
    return [(a.mean(0), a.T @ a / len(a)) for a in (x[:half], x[half:])]


def test_cross_validation_shrinks_only_where_the_inputs_say_little():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((5, 40))
    # Plenty of positions and channels that explain each other: the floor.
    x = rng.standard_normal((4000, 5)) @ mixing + 0.05 * rng.standard_normal((4000, 40))
    assert cross_validated_ridge(_folds(x)) == RIDGE
    # Few positions of independent channels: nothing to explain, the strongest shrinkage.
    assert cross_validated_ridge(_folds(rng.standard_normal((64, 100)))) == RIDGE_GRID[-1] / 2
    # Few positions of related channels: in between.
    x = rng.standard_normal((64, 5)) @ mixing + 0.5 * rng.standard_normal((64, 40))
    assert RIDGE < cross_validated_ridge(_folds(x)) < RIDGE_GRID[-1] / 2


def test_measured_statistics_match_numpy():
    model = nets.resnet()
    analysis = analyse(model)
    inputs = analysis.probe_inputs(4, 0)
    stats = measure(analysis.graph, analysis.model, inputs, [("x", 1)])
    x = np.moveaxis(inputs["x"].astype(np.float64), 1, -1).reshape(-1, inputs["x"].shape[1])
    np.testing.assert_allclose(stats["x", 1].mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["x", 1].cov, np.cov(x.T, bias=True), rtol=1e-5, atol=1e-8)
    assert stats["x", 1].ridge is None  # 4 inputs are one chunk: nothing to cross-validate
    ridges = {}
    stats = measure(analysis.graph, analysis.model, analysis.probe_inputs(16, 0), [("x", 1)], ridges=ridges)
    assert stats["x", 1].ridge == ridges["x", 1] >= RIDGE


@pytest.mark.parametrize("positions", [MAX_POSITIONS, 50])
def test_runs_in_parts_see_what_whole_runs_see(positions, monkeypatch):
    """Where a chunk's measured tensors pass RUN_BYTES, its inputs run in parts: the same
    positions (strided over the whole chunk where it holds too many), the same folds and
    ridges, and the same moments but for the order of their sums."""
    from onnxprune.evidence import statistics

    monkeypatch.setattr(statistics, "MAX_POSITIONS", positions)
    analysis = analyse(nets.resnet())
    inputs = analysis.probe_inputs(14, 0)  # three chunks and a part: 4, 4, 4, 2
    spaces = sorted({space for g in analysis.dep.prunable_groups() for space in g.atoms})
    whole = measure(analysis.graph, analysis.model, inputs, spaces, shapes=analysis.shapes)
    per_input = sum(4 * int(np.prod(analysis.shapes[t][1:])) for t in {t for t, _ in spaces})
    for part in (1, 3):
        monkeypatch.setattr(statistics, "RUN_BYTES", part * per_input)
        parts = measure(analysis.graph, analysis.model, inputs, spaces, shapes=analysis.shapes)
        for key, want in whole.items():
            got = parts[key]
            assert got.count == want.count and got.ridge == want.ridge
            for a, b in ((got.mean, want.mean), (got.var, want.var), (got.cov, want.cov)):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _reference_moments(runs, axis):
    """Sum, count and second moment the plain way: positions as rows, strided per run, the
    positions with a non-finite channel dropped."""
    total, count, second = 0.0, 0, 0.0
    for out in runs:
        x = np.moveaxis(out.astype(np.float64), axis, -1).reshape(-1, out.shape[axis])
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) > MAX_POSITIONS:
            x = x[:: int(np.ceil(len(x) / MAX_POSITIONS))]
        wide = x.shape[1] > MAX_CHANNELS
        total, count, second = total + x.sum(0), count + len(x), second + ((x * x).sum(0) if wide else x.T @ x)
    return total, count, second


@pytest.mark.parametrize("shape, axis", [((4, 6, 9, 9), 1), ((4, 5, 7), 2), ((2, 3, 64, 160), 1),
                                         ((4, MAX_CHANNELS + 3), 1), ((4, 1500), 1)])
def test_moments_are_the_plain_moments_whatever_the_layout(shape, axis):
    """Channels first or last, positions strided past MAX_POSITIONS, runs buffered before the
    product (1500 channels, 4 positions a run), squares only past MAX_CHANNELS, and one run
    with overflowing positions: the same numbers as rows of positions multiplied out."""
    rng = np.random.default_rng(0)
    runs = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    runs[1].reshape(-1)[7] = np.inf
    acc = _Moments(shape[axis])
    for out in runs:
        acc.add(out, axis)
    total, second = acc.finish()
    want_total, want_count, want_second = _reference_moments(runs, axis)
    assert acc.count == want_count
    np.testing.assert_allclose(total, want_total, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(second, want_second, rtol=1e-9, atol=1e-9)


def _redundant_mlp():
    """A linear hidden layer whose unit 5 is exactly 0.5*unit 1 - 2*unit 2."""
    model = nets.from_text("net (float[N,8] x, float[8,16] w1, float[16] b1, float[16,4] w2, float[4] b2) => "
                           "(float[N,4] y) {\n  h = MatMul(x, w1)\n  hb = Add(h, b1)\n  m = MatMul(hb, w2)\n"
                           "  y = Add(m, b2)\n}")
    inits = {t.name: t for t in model.graph.initializer}
    from onnx import numpy_helper
    w1, b1 = numpy_helper.to_array(inits["w1"]).copy(), numpy_helper.to_array(inits["b1"]).copy()
    w1[:, 5], b1[5] = 0.5 * w1[:, 1] - 2 * w1[:, 2], 0.5 * b1[1] - 2 * b1[2]
    inits["w1"].CopyFrom(numpy_helper.from_array(w1, "w1"))
    inits["b1"].CopyFrom(numpy_helper.from_array(b1, "b1"))
    return model


@pytest.mark.parametrize("reconstruction", ["least-squares", "pair"])
def test_least_squares_makes_a_redundant_unit_free(reconstruction):
    model = _redundant_mlp()
    analysis = analyse(model, {"x": (1, 8)}, input_range=(0.0, 1.0))
    group = next(g for g in analysis.dep.prunable_groups() if g.size == 16)
    plan = PruningPlan("test", 0.1, 0, [GroupPlan(group.id, group.name, group.size, [5])],
                       reconstruction=reconstruction)
    # the fit is measured on the inputs the check uses (class-inverted inputs of this toy
    # classifier span fewer directions than uniform ones: that is the evidence, not the fit)
    uniform = {"x": np.random.default_rng(4).uniform(0, 1, (64, 8)).astype(np.float32)}
    pruned, _ = prune(model, 0.1, plan=plan, input_shapes={"x": (1, 8)}, input_range=(0.0, 1.0), calibration=uniform,
                      method="magnitude")
    x = np.random.default_rng(3).uniform(0, 1, (32, 8)).astype(np.float32)
    y0, y1 = session(model).run(None, {"x": x})[0], session(pruned).run(None, {"x": x})[0]
    error = np.linalg.norm(y1 - y0) / np.linalg.norm(y0)
    if reconstruction == "least-squares":
        assert error < 0.02, error
    else:  # the mean alone cannot stand in for a unit that varies
        assert error > 0.05, error
