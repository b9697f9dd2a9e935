"""Model inversion: what synthetic inputs are driven towards when a net has no BatchNorm."""

from __future__ import annotations

import nets
import numpy as np

from onnxprune import prune
from onnxprune.evidence.distill import Distiller
from onnxprune.evidence.priors import InputPrior
from onnxprune.ir import ModelEditor, session

#: A conv net as exporters ship it with BatchNorm folded: biased convs straight into ReLUs. The
#: second conv's bias is pushed far negative so that, on noise, its channels sit mostly off.
FOLDED = ("net (float[N,1,12,12] x, float[8,1,3,3] c1_w, float[8] c1_b, float[8,8,3,3] c2_w, float[8] c2_b, "
          "float[10,8] fc_w, float[10] fc_b) => (float[N,10] y) {\n"
          "  c1 = Conv<pads=[1,1,1,1]>(x, c1_w, c1_b)\n  r1 = Relu(c1)\n"
          "  c2 = Conv<pads=[1,1,1,1]>(r1, c2_w, c2_b)\n  r2 = Relu(c2)\n"
          "  g = GlobalAveragePool(r2)\n  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")


def _folded_net():
    model = nets.from_text(FOLDED)
    bias = next(t for t in model.graph.initializer if t.name == "c2_b")
    bias.float_data[:] = []
    bias.raw_data = np.full(8, -1.0, np.float32).tobytes()
    return model


def _imbalance(model, x: np.ndarray) -> float:
    """Mean over both pre-activations and their channels of (mean / deviation)^2."""
    edit = ModelEditor(model)
    edit.set_outputs(["c1", "c2"])
    total = 0.0
    for a in session(edit.finish()).run(None, {"x": x}):
        m, s = a.mean(axis=(0, 2, 3)), a.std(axis=(0, 2, 3))
        total += float(np.mean(m**2 / (s**2 + 1e-6)))
    return total / 2


def test_a_net_without_batchnorm_is_inverted_to_centre_its_pre_activations():
    model = _folded_net()
    shapes = {"x": (16, 1, 12, 12), "c1": (16, 8, 12, 12), "c2": (16, 8, 12, 12), "y": (16, 10)}
    d = Distiller(model, shapes, classes=10)
    assert d.objective.balance and d.objective.classes == 0  # no class targets on a conv net
    assert d.objective.source == "centred pre-activations"
    prior = InputPrior.uniform(0.0, 1.0)
    rng = np.random.default_rng(0)
    start = prior.sample((16, 1, 12, 12), rng).astype(np.float32)
    x = d.distill((16, 1, 12, 12), prior, np.random.default_rng(0), steps=80)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert _imbalance(model, x) < 0.5 * _imbalance(model, start)


def test_the_report_says_a_folded_net_was_inverted_without_batchnorm_statistics():
    _, report = prune(_folded_net(), 0.4, method="paoding", check=2)
    assert report.fidelity.inputs.endswith("distilled from centred pre-activations")
    assert len(report.warnings) == 1 and "no BatchNorm statistics (folded" in report.warnings[0]


def test_a_detector_neck_declared_with_symbolic_height_and_width_is_inverted():
    """Upsampling (Resize) has a backward rule, and the inversion runs at the analysed input
    size, so a net declared ``[N, 3, height, width]`` with an FPN-style upsample still distils."""
    from onnxprune.pipeline import analyse

    text = ("net (float[N,1,H,W] x, float[4,1,3,3] c1_w, float[4] c1_b, float[4,4,3,3] c2_w, float[4] c2_b, "
            "float[4] sc, float[10,4] fc_w, float[10] fc_b) => (float[N,10] y) {\n"
            "  c1 = Conv<pads=[1,1,1,1], strides=[2,2]>(x, c1_w, c1_b)\n  r1 = Relu(c1)\n"
            "  u = Resize<mode=\"nearest\", coordinate_transformation_mode=\"asymmetric\", nearest_mode=\"floor\">"
            "(r1, , sc)\n  c2 = Conv<pads=[1,1,1,1]>(u, c2_w, c2_b)\n  r2 = Relu(c2)\n"
            "  g = GlobalAveragePool(r2)\n  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")
    model = nets.from_text(text)
    scales = next(t for t in model.graph.initializer if t.name == "sc")
    scales.float_data[:] = []
    scales.raw_data = np.array([1, 1, 2, 2], np.float32).tobytes()
    analysis = analyse(model, input_shapes={"x": (1, 1, 12, 12)})
    assert analysis.distiller.usable
    inputs = analysis.synthetic(8, 0)
    assert inputs.source == "distilled from centred pre-activations"
    assert inputs.arrays["x"].shape == (8, 1, 12, 12)


def test_statistics_are_matched_to_convergence_on_small_nets_and_class_targets_keep_the_short_budget(monkeypatch):
    """BatchNorm and centring inversions converge slowly (docs/methods.md, "Steps to
    convergence"): a small net's planning pool gets CONVERGE_STEPS' most on an annealed step, a
    class-target inversion (the MLP) DISTILL_STEPS' most on a constant one; a BatchNorm net whose
    activations pass CONVERGE_ACTIVATIONS keeps what EVIDENCE_MACS buys, and a large BatchNorm
    net the short budget."""
    from onnxprune import analysis

    runs = []
    original = Distiller.distill

    def record(self, shape, prior, rng, **kw):
        runs.append((self.objective.source, kw["steps"], kw["anneal"]))
        return original(self, shape, prior, rng, **kw)

    monkeypatch.setattr(Distiller, "distill", record)
    for model in (nets.resnet(), _folded_net(), nets.mlp()):
        analysis.analyse(model).probe_inputs(16, 0)
    assert runs == [("BatchNorm statistics", analysis.CONVERGE_STEPS[1], True),
                    ("centred pre-activations", analysis.CONVERGE_STEPS[1], True),
                    ("class targets", analysis.DISTILL_STEPS[1], False)]
    monkeypatch.setattr(analysis, "CONVERGE_ACTIVATIONS", 1.0)  # large feature maps: the budget of any pool...
    runs.clear()
    for model in (nets.resnet(), _folded_net()):
        analysis.analyse(model).probe_inputs(16, 0)
    assert runs == [("BatchNorm statistics", analysis.DISTILL_STEPS[1], False),
                    ("centred pre-activations", analysis.CONVERGE_STEPS[1], True)]  # ...but centring needs its steps
    monkeypatch.setattr(analysis, "EVIDENCE_MACS", 1.0)  # every model is large: 4 inputs, the short budget
    runs.clear()
    analysis.analyse(nets.resnet()).probe_inputs(16, 0)
    assert runs == [("BatchNorm statistics", analysis.DISTILL_STEPS[0], False)]


def test_an_annealed_step_matches_batchnorm_statistics_closer_than_a_constant_one():
    """What CONVERGE_STEPS rests on: at the same steps, the annealed step (ANNEALED_LR on a
    cosine) leaves the BatchNorm running statistics less mismatched than the constant one."""
    from onnxprune.gradient import LABELS, LOSS
    from onnxprune.pipeline import analyse

    model = nets.resnet()
    analysis = analyse(model)
    d = analysis.distiller
    shape = (32, *analysis.input_shapes[d.name][1:])

    def mismatch(anneal: bool) -> float:
        x = d.distill(shape, analysis.prior, np.random.default_rng(0), steps=60, anneal=anneal)
        (loss,) = d.session.run([LOSS], {d.name: x, LABELS: np.zeros(shape[0], np.int64)})
        return float(np.log(np.expm1(np.mean(loss))))  # the loss is log(1 + e^s): s back

    assert mismatch(anneal=True) < mismatch(anneal=False)


def _gradients_whole_and_in_parts(d, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from onnxprune.gradient import INPUT_GRAD, LABELS

    feeds = {LABELS: np.zeros(len(x), np.int64)}
    (whole,) = d.session.run([INPUT_GRAD], {d.name: x, **feeds})
    d.whole, d.part = 1, 3  # as if one reverse pass held only 3 inputs: parts of 3, 3 and 2
    return whole, d._gradient(x, feeds, last=False)


def test_a_batch_too_large_for_one_reverse_pass_is_inverted_in_parts_with_the_whole_batchs_gradient():
    """BatchNorm statistics couple the samples: each part still gets exactly its share of the
    whole batch's gradient (its statistics measured over all parts first)."""
    from onnxprune.pipeline import analyse

    analysis = analyse(nets.resnet())
    d = analysis.distiller
    assert d.objective.batchnorm
    x = analysis.prior.sample((8, *analysis.input_shapes[d.name][1:]), np.random.default_rng(0)).astype(np.float32)
    whole, parts = _gradients_whole_and_in_parts(d, x)
    assert np.abs(whole).max() > 0
    np.testing.assert_allclose(parts, whole, rtol=1e-3, atol=1e-4 * np.abs(whole).max())
    # each part alone, as its own batch, is a different objective: what the parts avoid
    alone = d.session.run(["input_grad"], {d.name: x[:3], "labels": np.zeros(3, np.int64)})[0]
    assert not np.allclose(alone, whole[:3], rtol=1e-2, atol=1e-2 * np.abs(whole).max())


def test_a_folded_net_is_inverted_in_parts_with_the_whole_batchs_gradient():
    model = _folded_net()
    shapes = {"x": (16, 1, 12, 12), "c1": (16, 8, 12, 12), "c2": (16, 8, 12, 12), "y": (16, 10)}
    d = Distiller(model, shapes, classes=10)
    assert d.objective.balance
    x = InputPrior.uniform(0.0, 1.0).sample((8, 1, 12, 12), np.random.default_rng(0)).astype(np.float32)
    whole, parts = _gradients_whole_and_in_parts(d, x)
    np.testing.assert_allclose(parts, whole, rtol=1e-3, atol=1e-4 * np.abs(whole).max())


def test_a_model_one_input_of_which_is_too_large_to_invert_is_planned_on_the_prior_and_says_why(monkeypatch):
    """One input's reverse pass past INVERSION_INPUT_BYTES cannot be cut into smaller parts:
    a detector at 800x608 (3 GB an input) held 4.3 GB for its fidelity check alone. Such a
    model is not inverted, and the report says why instead of "the inversion failed"."""
    import onnxprune.analysis as analysis

    distilled, report = prune(nets.resnet(), 0.4, method="paoding", check=4)
    assert report.fidelity.inputs.startswith("held-out synthetic inputs, distilled")
    monkeypatch.setattr(analysis, "INVERSION_INPUT_BYTES", 1000)  # nets.resnet: ~40 kB an input
    prior, report = prune(nets.resnet(), 0.4, method="paoding", check=4)
    assert "not inverted: one input's reverse pass would hold" in report.fidelity.inputs
    assert any(w.startswith("no inputs were distilled: the model is too large to invert (one input's reverse pass")
               for w in report.warnings), report.warnings
    assert prior.SerializeToString() != distilled.SerializeToString()  # planned on other inputs
