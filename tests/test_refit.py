"""Linear layers re-fitted to the original's outputs after pruning: each layer is put back to
what the original layer computes from what the pruned model feeds it; which BatchNorms that
leaves to re-estimate; when it runs, and what it buys on a trained net."""

import json
from pathlib import Path

import nets
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxprune import prune
from onnxprune.evidence.recalibration import batchnorms, refitted_inputs
from onnxprune.evidence.refit import layers, refit
from onnxprune.ir import load_model, session, to_model
from onnxprune.pipeline import analyse
from onnxprune.plan import PruningPlan

MODELS = Path(__file__).resolve().parent.parent / "models"


def grouped_net():
    """A grouped convolution (two groups) between dense ones, a Gemm head stored [in, out]."""
    blocks = [nets.conv_bn("a", "x", 3, 8), nets.conv_bn("g", "a", 8, 8, group=2), nets.conv_bn("b", "g", 8, 6, k=1)]
    tail = "  p = GlobalAveragePool(b)\n  f = Flatten(p)\n  y = Gemm(f, fc_w, fc_b)\n"
    return nets.from_text(nets.graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail,
                                     "float[6,10] fc_w, float[10] fc_b"))


def _outputs(graph, template, x, name="x"):
    model = to_model(graph, template)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return session(model).run(None, {name: x})[0]


@pytest.mark.parametrize("make", [nets.resnet, nets.mobile_net, nets.concat_net, nets.vgg_flatten, grouped_net])
def test_every_layer_is_put_back_to_what_the_original_computes(make):
    """Weights drifted and nothing removed: each layer's inputs are the original's once the
    layers above are re-fitted, so the fit undoes the drift exactly (dense, depthwise and
    grouped convolutions, Gemms either way round)."""
    model = make()
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    analysis = analyse(model, {"x": (1, 3, size, size)}, input_range=(0.0, 1.0))
    graph = analysis.graph.copy()
    rng = np.random.default_rng(0)
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm"):
            w = node.inputs[1].values
            node.inputs[1].values = (w * rng.uniform(0.5, 1.5, w.shape)).astype(w.dtype)
    x = rng.uniform(0, 1, (64, 3, size, size)).astype(np.float32)
    want = _outputs(analysis.graph, analysis.model, x)
    assert not np.allclose(_outputs(graph, analysis.model, x), want, atol=1e-2)
    fitted = refit(graph, analysis.graph, analysis.model, {"x": x}, removed={})
    assert fitted == {n.name for n in graph.nodes if n.op in ("Conv", "Gemm")}
    np.testing.assert_allclose(_outputs(graph, analysis.model, x), want, rtol=1e-3, atol=1e-3)
    # a layer without a bias keeps none: what the fit adds goes into the BatchNorm after it
    assert [len(n.inputs) for n in graph.nodes] == [len(n.inputs) for n in analysis.graph.nodes]


def test_grouped_and_depthwise_convolutions_fit_one_block_per_group():
    analysis = analyse(grouped_net(), {"x": (1, 3, 8, 8)}, input_range=(0.0, 1.0))
    by_name = {layer.node.name: layer for layer in layers(analysis.graph, analysis.graph, {})}
    grouped = next(n.name for n in analysis.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) == 2)
    assert [list(kept) for _, kept in by_name[grouped].blocks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    mobile = analyse(nets.mobile_net(), {"x": (1, 3, 8, 8)}, input_range=(0.0, 1.0))
    depthwise = next(n.name for n in mobile.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) == 16)
    layer = {la.node.name: la for la in layers(mobile.graph, mobile.graph, {})}[depthwise]
    assert len(layer.blocks) == 16 and all(len(kept) == 1 for _, kept in layer.blocks)


def test_only_batchnorms_fed_by_layers_it_could_not_refit_are_re_estimated():
    graph = analyse(nets.resnet(), {"x": (1, 3, 8, 8)}, input_range=(0.0, 1.0)).graph
    convs = {n.name for n in graph.nodes if n.op == "Conv"}
    every = {n.name for n in batchnorms(graph)}
    assert refitted_inputs(graph, convs) == every
    assert refitted_inputs(graph, set()) == set()
    left = next(n for n in graph.nodes if n.op == "Conv" and n.inputs[0].name != "x")
    after = {n.name for n in batchnorms(graph) if n.inputs[0].name == left.outputs[0].name}
    assert refitted_inputs(graph, convs - {left.name}) == every - after


def test_planning_on_distilled_inputs_refits_and_the_plan_replays_it(open_gate):
    pruned, report = prune(nets.mobile_net(), 0.4, method="paoding", seed=1)
    assert report.plan.refit and report.plan.details["recalibrated"]["layers"] > 0
    again, _ = prune(nets.mobile_net(), 0.4, plan=PruningPlan.from_json(report.plan.to_json()))
    assert again.SerializeToString() == pruned.SerializeToString()
    # a plan saved before re-fitting existed replays as it was made: BatchNorms re-estimated only
    old = json.loads(report.plan.to_json())
    del old["refit"]
    _, replayed = prune(nets.mobile_net(), 0.4, plan=PruningPlan.from_json(json.dumps(old)))
    assert not replayed.plan.refit and replayed.plan.details["recalibrated"]["layers"] == 0
    assert replayed.plan.details["recalibrated"]["batchnorms"] == len(batchnorms(analyse(nets.mobile_net()).graph))


def test_it_recovers_real_accuracy_where_re_estimation_does_not():
    """models/ MobileNet at 35% of its MACs, seed 1, on the real test split: 0.864 as planned,
    0.873 with its BatchNorms re-estimated, 0.971 with its layers re-fitted."""
    from onnxprune.evaluate import load_npz

    x, y = load_npz(MODELS / "digits_test_32x32.npz")

    def accuracy(model):
        sess = session(model)
        return float(np.mean(sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y))

    plan = None
    results = {}
    for name, refits in (("re-fitted", True), ("re-estimated", False)):
        if plan is not None:
            plan = PruningPlan.from_json(plan.to_json())
            plan.refit = refits
        model, report = prune(MODELS / "mobilenet.onnx", method="paoding", target="macs=0.35", input_range=(0.0, 1.0),
                              seed=1, check=1, plan=plan)
        plan = report.plan
        results[name] = accuracy(model)
    assert results["re-fitted"] > results["re-estimated"] + 0.05
    assert results["re-fitted"] > 0.95


def test_a_block_too_wide_to_solve_is_left_as_compensation_made_it(monkeypatch):
    import onnxprune.evidence.refit as module

    analysis = analyse(nets.vgg_flatten(), {"x": (1, 3, 16, 16)}, input_range=(0.0, 1.0))
    monkeypatch.setattr(module, "MAX_WIDTH", 100)  # the head reads 192 flattened features
    ops = [layer.node.op for layer in layers(analysis.graph, analysis.graph, {})]
    assert ops == ["Conv", "Conv", "Gemm"]  # the convolutions and the 20-wide Gemm; not the 192-wide one


def _drift(graph, ops, seed=0):
    rng = np.random.default_rng(seed)
    for node in graph.nodes:
        if node.op in ops and isinstance(node.inputs[1], gs.Constant):  # not attention's own MatMuls
            w = node.inputs[1].values
            node.inputs[1].values = (w * rng.uniform(0.5, 1.5, w.shape)).astype(w.dtype)


def test_a_transformers_linear_layers_are_put_back_through_attention_and_layernorm():
    """The ViT's MatMul layers (qkv, projection, MLP; x [N, T, D] @ W [D, out], their bias in
    the Add after them) are re-fitted on their last axis like a Gemm on its second."""
    analysis = analyse(load_model(MODELS / "vit.onnx"), input_range=(0.0, 1.0))
    graph = analysis.graph.copy()
    _drift(graph, ("MatMul", "Gemm", "Conv"))
    x = np.random.default_rng(1).uniform(0, 1, (32, 1, 32, 32)).astype(np.float32)
    want = _outputs(graph=analysis.graph, template=analysis.model, x=x, name="input")
    assert not np.allclose(_outputs(graph, analysis.model, x, "input"), want, atol=1e-2)
    fitted = refit(graph, analysis.graph, analysis.model, {"input": x}, removed={}, shapes=analysis.shapes)
    linear = {n.name for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul") and isinstance(n.inputs[1], gs.Constant)}
    assert fitted == linear and sum(n.op == "MatMul" for n in graph.nodes if n.name in fitted) == 8
    np.testing.assert_allclose(_outputs(graph, analysis.model, x, "input"), want, rtol=1e-3, atol=1e-3)


def test_a_matmul_with_no_bias_to_carry_the_shift_is_left_alone():
    text = ("net (float[1,4,8] x, float[8,6] w1, float[1,1,6] b1, float[6,5] w2) => (float[1,4,5] y) {\n"
            "  h = MatMul(x, w1)\n  hb = Add(h, b1)\n  r = Relu(hb)\n  y = MatMul(r, w2)\n}")
    analysis = analyse(nets.from_text(text), input_range=(0.0, 1.0))
    graph = analysis.graph.copy()
    _drift(graph, ("MatMul",))
    first = next(n for n in graph.nodes if n.op == "MatMul").name
    assert [layer.node.name for layer in layers(graph, analysis.graph, {}, analysis.shapes)] == [first]
    x = np.random.default_rng(0).uniform(0, 1, (64, 4, 8)).astype(np.float32)
    assert refit(graph, analysis.graph, analysis.model, {"x": x}, removed={}, shapes=analysis.shapes) == {first}
    bias = next(n for n in graph.nodes if n.op == "Add").inputs[1]
    assert bias.values.shape == (1, 1, 6)  # the Add's constant keeps the form it was stored in


def test_a_calibrated_vit_recovers_its_accuracy_once_its_matmuls_are_re_fitted(monkeypatch):
    """The validation zoo's ViT at 35% of its MACs, planned and re-fitted on its 64 unlabelled
    calibration samples: the real test split's logit cosine with the unpruned model was 0.872
    with only the patch embedding and the head re-fitted, 0.955 with every linear layer."""
    import onnxprune.evidence.refit as module
    from onnxprune.evaluate import load_npz
    from onnxprune.evidence.calibration import load_calibration
    from onnxprune.ir import input_specs

    zoo = MODELS / "validation"
    model = load_model(zoo / "vit.onnx")
    x, _ = load_npz(zoo / "digits_test_pm1_32x32.npz")
    calibration = load_calibration(zoo / "digits_calib_pm1_32x32.npz", input_specs(model))

    def cosine(pruned):
        a, b = (session(m).run(None, {"input": x})[0].astype(np.float64) for m in (model, pruned))
        return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    found = {}
    for kind in ("every layer", "no MatMul"):
        if kind == "no MatMul":
            every = module.layers
            monkeypatch.setattr(module, "layers", lambda *a, every=every: [la for la in every(*a) if la.node.op != "MatMul"])
        pruned, report = prune(model, target="macs=0.35", input_range=(-1.0, 1.0), check=1, calibration=calibration)
        found[kind] = (cosine(pruned), report.plan.details["recalibrated"]["layers"])
    assert found["every layer"][1] > found["no MatMul"][1] >= 1
    assert found["every layer"][0] > max(0.93, found["no MatMul"][0] + 0.04)
