"""The pipeline's passes: each fills in its part of the job once, the analysis stays frozen,
and the rewrite refuses a result that fails the checker or changes the signature."""

from __future__ import annotations

import hashlib

import nets
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxprune.errors import InternalError, UserError
from onnxprune.fidelity import compare_outputs, output_warnings
from onnxprune.pass_infra import Pass, PassManager, PassResult, PostconditionError, PreconditionError
from onnxprune.pipeline import (
    AnalysePass,
    PlanPass,
    PruneJob,
    PruneSettings,
    ReconstructPass,
    RewritePass,
    VerifyPass,
    analyse,
    pipeline,
    prune,
)
from onnxprune.tables import summary_table

PASSES = [AnalysePass, PlanPass, ReconstructPass, RewritePass, VerifyPass]


def _weights(analysis) -> str:
    """A digest of every constant of the analysed graph and of every slice the groups declare."""
    h = hashlib.sha256()
    for name, t in sorted(analysis.graph.tensors().items()):
        if isinstance(t, gs.Constant):
            h.update(name.encode() + np.ascontiguousarray(t.values).tobytes())
    for g in analysis.dep.groups:
        for m in g.members:
            h.update(f"{g.id}{m.node.name}{m.space}{len(m.coupling.params)}".encode())
    h.update(str(len(analysis.graph.nodes)).encode())
    return h.hexdigest()


@pytest.mark.parametrize("method", ["magnitude", "paoding"])
def test_a_second_run_of_each_pipeline_pass_changes_nothing(method):
    job = PruneJob(nets.resnet(), PruneSettings(ratio=0.4, method=method, check=2))
    for cls in PASSES:
        # progressive methods compute their corrections while planning: nothing left to reconstruct
        assert cls()(job).modified == (cls is not ReconstructPass or method == "magnitude"), cls.__name__
        assert not cls()(job).modified, cls.__name__
    assert job.pruned is not None and job.report.groups_pruned > 0


@pytest.mark.parametrize("method, reconstruction", [("paoding", None), ("paoding", "pair"), ("magnitude", None)])
def test_the_analysis_is_never_edited(method, reconstruction):
    analysis = analyse(nets.resnet())
    before = _weights(analysis)
    settings = PruneSettings(ratio=0.5, method=method, reconstruction=reconstruction, check=2)
    job = pipeline()(PruneJob(nets.resnet(), settings, analysis=analysis)).value
    assert job.plan.corrections, "compensation went somewhere"
    assert _weights(analysis) == before
    again = pipeline()(PruneJob(nets.resnet(), settings, analysis=analysis)).value
    assert again.pruned.SerializeToString() == job.pruned.SerializeToString()


def test_passes_refuse_what_they_do_not_accept():
    with pytest.raises(PreconditionError, match="not analysed"):
        PlanPass()(PruneJob(nets.resnet(), PruneSettings()))

    class Broken(Pass[int]):
        def call(self, value):
            return PassResult(value + 1, True)

        def ensures(self, value):
            return "odd" if value % 2 else None

    with pytest.raises(PostconditionError, match="Broken: postcondition failed: odd"):
        Broken()(2)


def test_the_rewrite_ensures_the_signature():
    job = pipeline()(PruneJob(nets.resnet(), PruneSettings(ratio=0.4, check=1))).value
    job.pruned.graph.output[0].type.tensor_type.shape.dim[-1].dim_value += 1
    with pytest.raises(InternalError, match="signature changed"):
        RewritePass().ensures(job)


def test_a_failing_pass_names_the_passes_before_it():
    class Explodes(Pass[int]):
        def call(self, value):
            raise ValueError("boom")

    class Fine(Pass[int]):
        def call(self, value):
            return PassResult(value, False)

    with pytest.raises(InternalError, match=r"Explodes failed \(passes before it: Fine\)"):
        PassManager([Fine(), Explodes()])(0)


def test_the_report_says_what_its_inputs_were_inverted_from():
    _, with_bn = prune(nets.resnet(), 0.4, method="paoding", check=2)
    assert not [w for w in with_bn.warnings if "channel block" not in w]
    assert with_bn.fidelity.inputs.endswith("distilled from BatchNorm statistics")
    # no BatchNorm: the classifier's logits alone, and the report says what that cannot vouch for
    _, logits_only = prune(nets.mlp(), 0.4, method="paoding", check=2)
    assert "distilled from class targets" in logits_only.fidelity.inputs
    assert len(logits_only.warnings) == 1 and "class logits alone" in logits_only.warnings[0]


def test_the_report_warns_when_nothing_could_be_distilled():
    text = ("net (float[N,16] x, float[16,32] w1, float[32,1] w2) => (float[N,1] y) {\n"
            "  h = MatMul(x, w1)\n  a = Relu(h)\n  y = MatMul(a, w2)\n}")
    _, without = prune(nets.from_text(text), 0.4, method="magnitude", check=2)
    assert len(without.warnings) == 1 and "no BatchNorm" in without.warnings[0]
    assert "input prior" in without.fidelity.inputs


def test_the_report_says_why_the_inversion_failed_when_it_falls_back_to_noise(monkeypatch):
    # Any runtime error of the inversion plans on noise; the report must say so and why,
    # not claim the model had nothing to invert.
    from onnxprune.evidence import distill
    from onnxprune.gradient import GradientUnsupported

    def refuse(self, x, feeds, last):
        raise RuntimeError("reverse pass refused\nsecond line")

    monkeypatch.setattr(distill.Distiller, "_gradient", refuse)
    _, report = prune(nets.resnet(), 0.4, method="paoding", check=2)
    assert report.fidelity.inputs.startswith("held-out synthetic inputs, input prior")
    failed = [w for w in report.warnings if "inversion" in w]
    assert len(failed) == 1 and "reverse pass refused" in failed[0] and "second line" not in failed[0]
    assert not [w for w in report.warnings if "no BatchNorm" in w]

    def no_graph(model):
        raise GradientUnsupported("Foo 'f': no gradient")

    monkeypatch.undo()
    monkeypatch.setattr(distill, "input_gradient_model", no_graph)
    _, report = prune(nets.resnet(), 0.4, method="magnitude", check=2)
    assert [w for w in report.warnings if "no gradient graph: Foo 'f': no gradient" in w]


def test_the_report_says_when_the_original_outputs_are_saturated():
    # logits thousands apart: the softmax is exactly one-hot, so the cosine can only be 0 or 1
    text = ("net (float[N,16] x, float[16,32] w1, float[32,10] w2, float[1] big) => (float[N,10] y) {\n"
            "  h = MatMul(x, w1)\n  a = Relu(h)\n  l = MatMul(a, w2)\n  s = Mul(l, big)\n  y = Softmax<axis = 1>(s)\n}")
    model = nets.from_text(text)
    for init in model.graph.initializer:
        if init.name == "big":
            init.float_data[:] = []
            init.raw_data = np.array([1e4], np.float32).tobytes()
    _, report = prune(model, 0.4, method="magnitude", check=4)
    assert report.fidelity.saturated == report.fidelity.samples == 4
    saturated = [w for w in report.warnings if "one-hot or not finite on every held-out input" in w]
    assert len(saturated) == 1
    table = summary_table(report)
    row = [[c._cells[i] for c in table.columns] for i in range(table.row_count)
           if table.columns[0]._cells[i].startswith("fidelity")][0]
    assert row[1] == "cos n/a" and row[2] == "relL2 n/a"


def test_outputs_one_hot_on_some_inputs_or_lost_by_the_pruned_model_are_counted():
    ref = np.array([[0.0, 1.0, 0.0], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], np.float32)
    new = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [np.nan, 0.1, 0.8]], np.float32)
    found = compare_outputs([ref], [new])
    assert (found.saturated, found.broken, found.samples) == (1, 1, 3)
    assert output_warnings(found)[0].startswith("the original model's outputs are one-hot or not finite on 1 of 3")
    assert "not finite on 1 held-out inputs" in output_warnings(found)[1]


@pytest.mark.parametrize("method", ["magnitude", "paoding"])
@pytest.mark.parametrize("target", ["macs=0.5", "params=0.6"])
def test_a_target_share_is_hit_within_two_percent(method, target):
    kind, share = target.split("=")
    _, report = prune(nets.resnet(), method=method, target=target, check=0)
    kept = getattr(report.after, kind) / getattr(report.before, kind)
    assert abs(kept - float(share)) <= 0.02 * float(share), (kept, report.ratio)
    assert report.target == target


def test_grouped_convolutions_do_not_push_a_target_past_its_share():
    # Grouped convolutions lose whole blocks on their own schedule, late; the free groups must
    # leave them what they still owe (a digits ResNeXt at macs=0.36 kept 32.5% before).
    _, report = prune(nets.resnext(), method="paoding", target="macs=0.36", check=0)
    kept = report.after.macs / report.before.macs
    assert abs(kept - 0.36) <= 0.02 * 0.36, kept
    assert not any("target" in w for w in report.warnings)


def test_the_report_warns_when_pruning_moves_convolutions_off_the_cpu_channel_block():
    from onnxprune.latency import channel_block

    block = channel_block()
    blocks = [nets.conv_bn("s", "x", 3, 2 * block), nets.conv_bn("a", "s", 2 * block, 2 * block)]
    tail = "  p = GlobalAveragePool(a)\n  f = Flatten(p)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n"
    model = nets.from_text(nets.graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail,
                                      f"float[10,{2 * block}] fc_w, float[10] fc_b"))
    _, off = prune(model, 0.3, method="magnitude", check=0)
    assert any(f"--round-to {block}" in w for w in off.warnings)
    _, aligned = prune(model, 0.3, method="magnitude", check=0, round_to=block)
    assert not any("block" in w for w in aligned.warnings)


def test_a_target_share_replaces_the_ratio():
    with pytest.raises(UserError, match="not both"):
        prune(nets.mlp(), 0.4, target="macs=0.5")
    for bad in ("flops=0.5", "macs=1.5", "macs=x", "channels=0.5"):
        with pytest.raises(UserError):
            prune(nets.mlp(), target=bad)


def test_a_target_out_of_reach_says_so():
    # the MLP's input and logits are fixed and each hidden layer keeps a unit: 2% is out of reach
    _, report = prune(nets.mlp(), method="magnitude", target="macs=0.02", check=0)
    assert report.after.macs / report.before.macs > 0.0204
    assert any("target macs=0.02 was not reached" in w for w in report.warnings)
    _, fine = prune(nets.mlp(), method="magnitude", target="macs=0.6", check=0)
    assert not any("not reached" in w for w in fine.warnings)


def test_probe_rows_run_more_probes_on_small_nets_inverted_on_their_statistics(monkeypatch):
    """Rows are cheap on small maps and 16 probes left the plan to chance there (docs/methods.md,
    "Probes a row"); nets inverted from class targets (the MLP) and larger maps (CONVERGE_ACTIVATIONS
    passed) keep PROBES."""
    from onnxprune.passes import progressive

    from onnxprune import analysis

    _, report = prune(nets.resnet(), 0.4, method="paoding", check=0)
    assert report.plan.details["probes"] == progressive.SMALL_MAP_PROBES
    _, report = prune(nets.mlp(), 0.4, method="paoding", check=0)
    assert report.plan.details["probes"] == progressive.PROBES
    monkeypatch.setattr(analysis, "CONVERGE_ACTIVATIONS", 1.0)
    _, report = prune(nets.resnet(), 0.4, method="paoding", check=0)
    assert report.plan.details["probes"] == progressive.PROBES
