"""evaluate/compare/load_npz: attacks checked against a closed-form linear model, the
finite-difference fallback, fixed-batch models, and the errors users get for bad data."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune.evaluate as ev
from onnxprune.errors import UserError
from onnxprune.evaluate import (
    Classifier,
    CompareReport,
    EvalReport,
    compare,
    evaluate,
    fgsm,
    finite_difference_gradient,
    load_npz,
    pgd,
)
from onnxprune.gradient import GRADIENT_RULES

K, D = 3, 6


def _model(nodes, x_shape, inits, out_shape=None, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@pytest.fixture(scope="module")
def linear():
    """Nearest-centroid linear classifier on three clusters in [0, 1]^6: accurate, attackable."""
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.2, 0.8, (K, D))
    y = np.arange(120) % K
    x = np.clip(centers[y] + rng.normal(0, 0.12, (120, D)), 0, 1).astype(np.float32)
    w = (4 * centers).astype(np.float32)
    b = (-2 * (centers**2).sum(1)).astype(np.float32)
    model = _model([helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1)], ["N", D], {"W": w, "B": b}, ["N", K])
    return model, x, y, w.astype(np.float64), b.astype(np.float64)


def _np_logits(x, w, b):
    return x.astype(np.float64) @ w.T + b


def _np_grad(x, y, w, b):
    z = _np_logits(x, w, b)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (p - np.eye(K)[y]) @ w


def _mlp(seed=0, fixed_batch=0, reshape_batch_one=False, extra=None):
    rng = np.random.default_rng(seed)
    inits = {"W1": rng.standard_normal((D, 8)).astype(np.float32), "W2": rng.standard_normal((8, K)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["z"])]
    if extra == "sin":
        nodes = [helper.make_node("Sin", ["x"], ["s"]), helper.make_node("MatMul", ["s", "W1"], ["h"])] + nodes[1:]
    if reshape_batch_one:  # a hard-coded [B, -1] reshape: the batch cannot be made dynamic
        inits["shape"] = np.array([fixed_batch, -1])
        nodes = nodes[:2] + [helper.make_node("Reshape", ["r", "shape"], ["rr"]),
                             helper.make_node("MatMul", ["rr", "W2"], ["z"])]
    return _model(nodes, [fixed_batch or "N", D], inits)


def _data(n=40, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, D)).astype(np.float32), rng.integers(0, K, n)


# --------------------------------------------------------------------------------- attacks
def test_fgsm_step_is_signed_gradient_clipped():
    x = np.array([[0.0, 0.5, 0.98]], np.float32)
    g = np.array([[-1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(fgsm(x, g, 0.05, 0.0, 1.0), np.array([[0.0, 0.55, 1.0]], np.float32))


def test_fgsm_and_pgd_on_linear_model_match_closed_form(linear, monkeypatch):
    model, x, y, w, b = linear
    seen = []
    real_fgsm = ev.fgsm
    monkeypatch.setattr(ev, "fgsm", lambda *a: seen.append(real_fgsm(*a)) or seen[-1])
    report = evaluate(model, x, y, epsilons=(0.01, 0.05, 0.1), pgd_steps=10)
    assert report.gradient == "graph"
    lo, hi = float(x.min()), float(x.max())
    grad = _np_grad(x, y, w, b)
    clean = (_np_logits(x, w, b).argmax(1) == y).mean()
    assert report.accuracy == pytest.approx(clean)
    assert clean > 0.8
    for (eps, acc), adv in zip(report.fgsm.items(), seen, strict=True):
        expected = np.clip(x + eps * (hi - lo) * np.sign(grad), lo, hi).astype(np.float32)
        np.testing.assert_allclose(adv, expected, atol=1e-6)
        assert acc == pytest.approx((_np_logits(expected, w, b).argmax(1) == y).mean())
        assert acc <= report.accuracy
    assert report.fgsm[0.1] < report.fgsm[0.01]  # a bigger budget hurts more
    # PGD at the middle epsilon, 10 steps of eps/4, re-implemented in numpy
    eps = 0.05 * (hi - lo)
    adv = x.copy()
    for _ in range(10):
        adv = np.clip(np.clip(adv + eps / 4 * np.sign(_np_grad(adv, y, w, b)), x - eps, x + eps), lo, hi)
        adv = adv.astype(np.float32)
    assert list(report.pgd) == [0.05]
    assert report.pgd[0.05] == pytest.approx((_np_logits(adv, w, b).argmax(1) == y).mean())
    assert report.pgd[0.05] <= report.fgsm[0.05]


def test_pgd_stays_in_the_ball_and_range():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (5, 4)).astype(np.float32)
    adv = pgd(lambda a, y: rng.standard_normal(a.shape), x, None, 0.1, 0.04, 7, 0.0, 1.0, rng=rng)
    assert np.all(np.abs(adv - x) <= 0.1 + 1e-6)
    assert adv.min() >= 0 and adv.max() <= 1 and adv.dtype == np.float32


def test_pgd_epsilon_and_steps_are_configurable(linear):
    model, x, y, _, _ = linear
    r = evaluate(model, x, y, epsilons=(0.02,), pgd_epsilon=(0.05, 0.2), pgd_steps=3, pgd_step_size=0.5)
    assert list(r.fgsm) == [0.02] and list(r.pgd) == [0.05, 0.2]
    assert r.pgd[0.2] <= r.pgd[0.05] and (r.pgd_steps, r.pgd_step_size) == (3, 0.5)
    assert evaluate(model, x, y, pgd_steps=0).pgd == {}


# ------------------------------------------------------------------ finite-difference fallback
def test_missing_rule_falls_back_to_finite_differences(monkeypatch, caplog):
    x, y = _data()
    model = _mlp()
    graph = evaluate(model, x, y)
    monkeypatch.delitem(GRADIENT_RULES, "Relu")
    with caplog.at_level(logging.WARNING, logger="onnxprune.evaluate"):
        fallback = evaluate(model, x, y)
    assert (graph.gradient, fallback.gradient) == ("graph", "finite-difference")
    assert "Relu" in caplog.text
    assert fallback.accuracy == graph.accuracy
    for e in graph.fgsm:
        assert abs(fallback.fgsm[e] - graph.fgsm[e]) <= 1 / len(x)
    assert abs(fallback.pgd[0.05] - graph.pgd[0.05]) <= 2 / len(x)


def test_finite_differences_agree_with_graph_gradient():
    x, y = _data(8)
    model = _mlp(seed=2)
    clf = Classifier(model, x, gradient="auto", fd_step=1e-3)
    exact = clf.gradient(x, y)
    fd = finite_difference_gradient(clf.sess, x, y, 1e-3)
    np.testing.assert_allclose(fd, exact, atol=2e-3 * np.abs(exact).max())


def test_unsupported_op_uses_finite_differences_or_fails_when_graph_is_required():
    x, y = _data(10)
    model = _mlp(extra="sin")
    assert evaluate(model, x, y, pgd_steps=2).gradient == "finite-difference"
    with pytest.raises(UserError, match="Sin"):
        evaluate(model, x, y, gradient="graph")


# ------------------------------------------------------------------------------ batch of one
@pytest.mark.parametrize("batch, reshape_batch_one", [(1, False), (1, True), (4, True)])
def test_fixed_batch_matches_dynamic_batch(batch, reshape_batch_one, caplog):
    x, y = _data(13)
    dynamic = evaluate(_mlp(seed=4), x, y, epsilons=(0.05,), pgd_steps=3)
    with caplog.at_level(logging.INFO, logger="onnxprune.evaluate"):
        fixed = evaluate(_mlp(seed=4, fixed_batch=batch, reshape_batch_one=reshape_batch_one), x, y,
                         epsilons=(0.05,), pgd_steps=3)
    assert ("at a time" in caplog.text) == reshape_batch_one  # else: run with a dynamic batch
    assert fixed.gradient == "graph"
    assert (fixed.accuracy, fixed.fgsm, fixed.pgd) == (dynamic.accuracy, dynamic.fgsm, dynamic.pgd)


def test_finite_differences_on_fixed_batch_model():
    x, y = _data(5)
    clf = Classifier(_mlp(seed=5), x, gradient="graph", fd_step=1e-3)
    fixed = Classifier(_mlp(seed=5, fixed_batch=4, reshape_batch_one=True), x, gradient="finite-difference",
                           fd_step=1e-3)
    assert fixed.fixed == 4 and fixed.method == "finite-difference"
    exact = clf.gradient(x, y)
    np.testing.assert_allclose(fixed.gradient(x, y), exact, atol=2e-3 * np.abs(exact).max())


# --------------------------------------------------------------------------- report & progress
def test_progress_and_json_report(linear):
    model, x, y, _, _ = linear
    calls = []
    report = evaluate(model, x, y, batch_size=50, progress=lambda d, t, label: calls.append((d, t, label)))
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and dones[-1] == calls[-1][1]
    assert {c[1] for c in calls} == {calls[-1][1]}
    labels = " ".join(c[2] for c in calls)
    assert "clean" in labels and "fgsm eps=0.1" in labels and "pgd eps=0.05" in labels
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d["fgsm"]) == {"0.01", "0.05", "0.1"} and d["n"] == len(x) and d["gradient"] == "graph"
    assert isinstance(report, EvalReport) and report.seconds > 0


def test_compare_agreement_and_cosine(linear, tmp_path):
    model, x, y, w, b = linear
    same = compare(model, model, x, y, pgd_steps=2)
    assert isinstance(same, CompareReport)
    assert same.agreement == 1.0 and same.cosine == pytest.approx(1.0)
    assert same.original.accuracy == same.pruned.accuracy
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    w2 = w.copy()
    w2[:, :3] = 0  # zero half of the input features
    pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array(w2.astype(np.float32), "W"))
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, path)
    calls = []
    r = compare(model, str(path), x, y, pgd_steps=2, progress=lambda d, t, label: calls.append((d, t, label)))
    assert r.agreement < 1.0 and r.cosine < 0.999
    assert r.pruned.accuracy == pytest.approx((_np_logits(x, w2, b).argmax(1) == y).mean())
    assert calls[-1][0] == calls[-1][1] and calls[-1][2].startswith("pruned:")
    assert json.loads(json.dumps(r.to_dict()))["agreement"] == r.agreement


def test_softmax_ended_model(linear):
    model, x, y, _, _ = linear
    soft = onnx.ModelProto()
    soft.CopyFrom(model)
    soft.graph.node[0].output[0] = "logits"
    soft.graph.node.append(helper.make_node("Softmax", ["logits"], ["z"], axis=1))
    a, b = evaluate(model, x, y), evaluate(soft, x, y)
    assert b.gradient == "graph"
    assert (a.accuracy, a.fgsm, a.pgd) == (b.accuracy, b.fgsm, b.pgd)


# ----------------------------------------------------------------------------- bad input
def test_evaluate_rejects_bad_input(linear, tmp_path):
    model, x, y, _, _ = linear
    with pytest.raises(UserError, match="labels go up to 7"):
        evaluate(model, x, np.where(y == 0, 7, y))
    with pytest.raises(UserError, match="epsilons"):
        evaluate(model, x, y, epsilons=(-0.1,))
    with pytest.raises(UserError, match="does not exist"):
        evaluate(tmp_path / "nope.onnx", x, y)
    with pytest.raises(UserError, match="rank 2"):
        evaluate(model, x[:, None, :], y)
    with pytest.raises(UserError, match="axis 1"):
        evaluate(model, x[:, :4], y)


def test_load_npz_accepts_the_documented_names(tmp_path):
    x, y = _data(5)
    for xk, yk in (("x", "y"), ("X", "y"), ("data", "labels")):
        path = tmp_path / f"{xk}{yk}.npz"
        np.savez(path, **{xk: x, yk: y.astype(np.int32)})
        lx, ly = load_npz(path, model=_mlp())
        np.testing.assert_array_equal(lx, x)
        assert ly.dtype == np.int64 and list(ly) == list(y)
    np.savez(tmp_path / "f.npz", x=(x * 255).astype(np.uint8), y=y.astype(np.float64))  # integral floats are fine
    lx, ly = load_npz(tmp_path / "f.npz")
    assert lx.dtype == np.float32 and ly.dtype == np.int64


@pytest.mark.parametrize("arrays, message", [
    ({"inputs": np.zeros((3, D)), "y": np.zeros(3, int)}, "expected inputs named x"),
    ({"x": np.zeros((3, D)), "y": np.array([0.0, 1.5, 2.0])}, "integer class indices"),
    ({"x": np.zeros((3, D)), "y": np.eye(3)}, "one-hot"),
    ({"x": np.zeros((3, D)), "y": np.zeros(4, int)}, "3 inputs but 4 labels"),
    ({"x": np.zeros((3, D)), "y": np.array([0, -1, 1])}, "non-negative"),
    ({"x": np.zeros((0, D)), "y": np.zeros(0, int)}, "empty"),
    ({"x": np.array(["a", "b"]), "y": np.zeros(2, int)}, "numeric"),
    ({"x": np.zeros((3, 2, D)), "y": np.zeros(3, int)}, "rank 2"),
    ({"x": np.zeros((3, D + 1)), "y": np.zeros(3, int)}, "axis 1 differs"),
])
def test_load_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        load_npz(path, model=_mlp())


def test_load_npz_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(UserError, match="single .npy array"):
        load_npz(tmp_path / "single.npy")


def test_channel_axis_hint(tmp_path):
    model = _model([helper.make_node("Flatten", ["x"], ["z"])], ["N", 1, 2, 3], {})
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2, 3)), y=np.zeros(4, int))
    with pytest.raises(UserError, match=r"x\[:, None\]"):
        load_npz(tmp_path / "d.npz", model=model)
