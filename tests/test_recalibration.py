"""BatchNorm statistics re-estimated on the pruned model: what each BatchNorm holds is what
its input measures on the planning inputs, upstream ones already updated; when it happens
(inputs distilled from BatchNorm statistics, or a calibration set) and what it buys."""

import json
from pathlib import Path

import nets
import numpy as np
import onnx
import pytest

from onnxprune import prune
from onnxprune.cli import main
from onnxprune.evaluate import load_npz
from onnxprune.evidence.recalibration import batchnorms, recalibrate
from onnxprune.ir import session, to_model
from onnxprune.pipeline import analyse

MODELS = Path(__file__).resolve().parent.parent / "models"


def _moments(model, names, x):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.add().name = name
    outs = session(probe).run(names, {"x": x})
    return [(o.mean(axis=(0, 2, 3)), o.var(axis=(0, 2, 3))) for o in outs]


@pytest.mark.parametrize("make", [nets.resnet, nets.mobile_net, nets.concat_net])
def test_every_batchnorm_holds_the_statistics_its_input_has(make):
    model = make()
    analysis = analyse(model, {"x": (1, 3, 8, 8)}, input_range=(0.0, 1.0))
    graph = analysis.graph.copy()
    for node in graph.nodes:  # a pruned model's drift: every convolution's filters scaled
        if node.op == "Conv":
            node.inputs[1].values = node.inputs[1].values * 0.7
    x = np.random.default_rng(0).uniform(0, 1, (64, 3, 8, 8)).astype(np.float32)
    nodes = batchnorms(graph)
    assert recalibrate(graph, analysis.model, {"x": x}) == len(nodes) > 0
    updated = to_model(graph, analysis.model)
    updated.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for node, (mean, var) in zip(nodes, _moments(updated, [n.inputs[0].name for n in nodes], x)):
        np.testing.assert_allclose(node.inputs[3].values, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(node.inputs[4].values, var, rtol=1e-3, atol=1e-6)


def test_planning_on_distilled_inputs_recalibrates_and_planning_without_them_does_not(open_gate):
    _, paoding = prune(nets.resnet(), 0.4, method="paoding")
    assert paoding.plan.recalibrate
    # every BatchNorm follows a re-fitted layer (tests/test_refit.py): none left to re-estimate
    assert paoding.plan.details["recalibrated"] == {"layers": 7, "batchnorms": 0, "inputs": 128,
                                                    "source": "distilled from BatchNorm statistics"}
    _, magnitude = prune(nets.resnet(), 0.4, method="magnitude")  # plans without inputs: as fast as it was
    assert not magnitude.plan.recalibrate and "recalibrated" not in magnitude.plan.details
    off, report = prune(nets.resnet(), 0.4, method="paoding", recalibrate=False)
    assert not report.plan.recalibrate
    _, raw = prune(nets.resnet(), 0.4, method="paoding", compensate=False)
    assert not raw.plan.recalibrate  # the raw baseline stays raw


def test_the_command_line_turns_it_off(tmp_path, capsys, open_gate):
    path = tmp_path / "resnet.onnx"
    onnx.save(nets.resnet(), str(path))
    assert main([str(path), str(tmp_path / "a.onnx"), "--save-plan", str(tmp_path / "a.json")]) == 0
    assert "layers re-fitted" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["recalibrate"] is True
    assert main([str(path), str(tmp_path / "b.onnx"), "--no-recalibration", "--save-plan", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["recalibrate"] is False
    assert "layers re-fitted" not in capsys.readouterr().out


def test_it_recovers_real_accuracy_on_the_digits_resnet():
    """models/ ResNet at 35% of its MACs, seed 0: 0.938 on the real test split as planned,
    0.991 with its BatchNorms re-estimated on the 128 planning inputs, 0.987 with its layers
    re-fitted on them (the default; tests/test_refit.py)."""
    x, y = load_npz(MODELS / "digits_test_32x32.npz")

    def accuracy(model):
        sess = session(model)
        name = sess.get_inputs()[0].name
        return float(np.mean(np.concatenate([sess.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
                             .argmax(1) == y))

    plain, _ = prune(MODELS / "resnet.onnx", method="paoding", target="macs=0.35", input_range=(0.0, 1.0),
                     recalibrate=False, check=1)
    recalibrated, _ = prune(MODELS / "resnet.onnx", method="paoding", target="macs=0.35", input_range=(0.0, 1.0), check=1)
    assert accuracy(recalibrated) > accuracy(plain) + 0.02
    assert accuracy(recalibrated) > 0.97


def test_a_replayed_plan_recalibrates_as_planned_unless_turned_off(open_gate):
    from onnxprune.plan import PruningPlan

    pruned, report = prune(nets.resnet(), 0.4, method="paoding", seed=3)
    text = report.plan.to_json()
    again, _ = prune(nets.resnet(), 0.4, plan=PruningPlan.from_json(text))
    assert again.SerializeToString() == pruned.SerializeToString()
    off, replayed = prune(nets.resnet(), 0.4, plan=PruningPlan.from_json(text), recalibrate=False)
    assert not replayed.plan.recalibrate and off.SerializeToString() != pruned.SerializeToString()


def test_inputs_far_from_the_running_statistics_do_not_recalibrate(monkeypatch):
    """The gate: the planning inputs must give the original model about its running
    statistics (a short inversion of a large model does not, and re-estimating on it
    mis-scales the model); the trained digits ResNet's do, the test net's do not."""
    from onnxprune.evidence.recalibration import MAX_MISMATCH, mismatch

    trained = analyse(MODELS / "resnet.onnx", input_range=(0.0, 1.0))
    distilled = trained.synthetic(trained.statistics_count, 0).arrays
    noise = {k: trained.prior.sample(v.shape, np.random.default_rng(0)).astype(np.float32) for k, v in distilled.items()}
    assert mismatch(trained.graph, trained.model, distilled) < MAX_MISMATCH < mismatch(trained.graph, trained.model, noise)
    assert trained.recalibrates(0)
    _, report = prune(nets.resnet(), 0.4, method="paoding")
    assert not report.plan.recalibrate
