"""Probes measure exactly what pruning with compensation does, row by row, in one session."""

from pathlib import Path

import nets
import numpy as np
import pytest

from onnxprune import prune
from onnxprune.evidence.probes import ProbeModel, impacts, mask_name, merge_dst_name, merge_src_name
from onnxprune.ir import session
from onnxprune.pipeline import analyse
from onnxprune.plan import GroupPlan, PruningPlan

MODELS = Path(__file__).resolve().parent.parent / "models"


def _mlp_probe():
    model = nets.mlp()
    analysis = analyse(model, {"x": (1, 64)}, input_range=(0.0, 1.0))
    group = next(g for g in analysis.dep.prunable_groups() if g.size == 32 and g.producers[0].op == "MatMul")
    probe = ProbeModel(analysis.graph, analysis.model, [group], analysis.moments, analysis.prior,
                       analysis.input_shapes, probes=6, seed=0)
    return model, analysis, group, probe


def test_a_probe_row_equals_the_pruned_and_compensated_model():
    model, analysis, group, probe = _mlp_probe()
    masks = np.ones((3, group.size), np.float32)
    src = np.zeros_like(masks)
    dst = np.zeros_like(masks)
    masks[1, 5] = 0                                # row 1: remove unit 5
    masks[2, 5], src[2, 5], dst[2, 9] = 0, 1, 0.7  # row 2: merge unit 5 into unit 9, scale 0.7
    out = probe.run({mask_name(group): masks, merge_src_name(group): src, merge_dst_name(group): dst})
    x = probe.inputs["x"]
    np.testing.assert_allclose(out[0], session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    for row, merge in ((1, ([], [])), (2, ([9], [0.7]))):
        gp = GroupPlan(group.id, group.name, group.size, [5], merge_into=merge[0], merge_scale=merge[1],
                       merge_corr=[0.0] * len(merge[0]))
        pruned, _ = prune(model, 0.5, plan=PruningPlan("test", 0.5, 0, [gp]), input_range=(0.0, 1.0), method="magnitude")
        np.testing.assert_allclose(out[row], session(pruned).run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_batched_rows_equal_separate_runs():
    _, _, group, probe = _mlp_probe()
    masks = np.ones((4, group.size), np.float32)
    for r in range(4):
        masks[r, r] = 0
    together = probe.run({mask_name(group): masks})
    for r in range(4):
        alone = probe.run({mask_name(group): masks[r:r + 1]})
        np.testing.assert_allclose(together[r], alone[0], rtol=1e-6)


def test_impact_measures():
    base = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    same, flipped = base[None].copy(), base[None].copy()
    flipped[0, 0] = [0.0, 3.0, 0.0]
    impact = impacts(np.concatenate([same, flipped]), base)
    assert impact.rel_l2[0] == 0 and impact.top1[0] == 0 and impact.width[0] == 0
    assert impact.top1[1] == 0.5 and impact.margin[1] > 0 and impact.width[1] > 0


def _first_order_over_every_group(analysis, probes: int):
    """(groups, probe model over all of them, its first-order estimate, checked present)."""
    groups = analysis.dep.prunable_groups()
    probe = ProbeModel(analysis.graph, analysis.model, groups, analysis.moments, analysis.prior,
                       analysis.input_shapes, inputs=analysis.probe_inputs(probes, 0))
    taylor = probe.first_order()
    assert taylor is not None and set(taylor) == {g.id for g in groups}
    return groups, probe, taylor


def test_first_order_estimate_ranks_like_measured_removals():
    from pathlib import Path

    from onnxprune.pipeline import analyse as analyse_path
    path = Path(__file__).resolve().parent.parent / "models" / "resnet.onnx"
    groups, probe, taylor = _first_order_over_every_group(analyse_path(path, input_range=(0.0, 1.0)), 16)
    group = max(groups, key=lambda g: g.size)
    masks = np.ones((group.size, group.size), np.float32)
    np.fill_diagonal(masks, 0)
    exact = probe.measure({mask_name(group): masks}).rel_l2
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(taylor[group.id]), rank(exact))[0, 1] > 0.3


def test_impacts_taken_in_blocks_of_rows_are_the_same_numbers(monkeypatch):
    """Wide output layers (a recogniser's steps x characters) are scored a block of rows at a
    time, which must not change a single number."""
    from onnxprune.evidence import probes

    rng = np.random.default_rng(0)
    outputs, base = rng.standard_normal((7, 3, 50)), rng.standard_normal((3, 50))
    whole = impacts(outputs, base)
    monkeypatch.setattr(probes, "IMPACT_ELEMENTS", 2 * 3 * 50)  # blocks of two rows, the last one alone
    blocked = impacts(outputs, base)
    for field in whole.__dataclass_fields__:
        assert np.array_equal(getattr(whole, field), getattr(blocked, field)), field


def test_a_least_squares_probe_row_equals_the_reconstructed_model(monkeypatch):
    from onnxprune.passes.candidates import least_squares_estimates
    from onnxprune.passes.reconstruct import consumer_spaces

    model = nets.resnet()
    analysis = analyse(model, input_range=(0.0, 1.0))
    group = max(analysis.dep.prunable_groups(), key=lambda g: g.size)  # the residual spine
    stats = analysis.statistics(consumer_spaces(group), seed=0)
    plans = {group.id: GroupPlan(group.id, group.name, group.size, [])}
    estimates, residual = least_squares_estimates([group], plans, stats, {})
    assert residual[group.id].shape == (group.size,) and np.all(residual[group.id] >= 0)
    probe = ProbeModel(analysis.graph, analysis.model, [group], analysis.moments, analysis.prior,
                       analysis.input_shapes, inputs=analysis.probe_inputs(4, 0), estimates=estimates)
    masks = np.ones((1, group.size), np.float32)
    masks[0, 3] = 0
    out = probe.run({mask_name(group): masks})
    plan = PruningPlan("test", 0.1, 0, [GroupPlan(group.id, group.name, group.size, [3])],
                       reconstruction="least-squares")
    pruned, _ = prune(model, 0.1, plan=plan, input_range=(0.0, 1.0), method="magnitude")
    # The commit also lowers downstream BatchNorm variances; the probe does not (measured
    # without it, like the pair merges): compare with that correction off.
    from onnxprune.passes.reconstruct import Reconstructor
    monkeypatch.setattr(Reconstructor, "_reduce_variance", lambda *a, **k: None)
    plain, _ = prune(model, 0.1, plan=plan, input_range=(0.0, 1.0), method="magnitude")
    run = lambda m: np.concatenate([session(m).run(None, {"x": x[None]})[0] for x in probe.inputs["x"]])  # noqa: E731
    # float32 weights against the probe's float32 estimate: equal to about 1e-3
    assert np.linalg.norm(run(plain) - out[0]) < 3e-3 * np.linalg.norm(out[0])
    assert np.linalg.norm(run(pruned) - out[0]) < 0.05 * np.linalg.norm(out[0])


def _two_candidates_per_group(groups, rng):
    """Rows as candidate measurement writes them: one removal, or one merge, per row."""
    rows = 2 * len(groups)
    feeds = {}
    for k, g in enumerate(groups):
        mask = np.ones((rows, g.size), np.float32)
        src, dst = np.zeros_like(mask), np.zeros_like(mask)
        u = int(rng.integers(g.size))
        mask[2 * k, u] = 0
        mask[2 * k + 1, u], src[2 * k + 1, u], dst[2 * k + 1, (u + 1) % g.size] = 0, 1, 0.7
        feeds.update({mask_name(g): mask, merge_src_name(g): src, merge_dst_name(g): dst})
    return feeds


@pytest.mark.parametrize("source", ["resnet", "vit", "light_squeezenet"])
def test_single_unit_rows_run_the_sparse_form_and_equal_the_dense_one(source):
    """Candidate rows (one unit removed or merged per row) run the sparse form, channels first
    (conv maps, concat spaces, opset 9) and last (tokens, multi-channel heads), with the
    least-squares estimate; rows it cannot express fall back to the dense form."""
    from onnxprune.passes.candidates import least_squares_estimates
    from onnxprune.passes.reconstruct import consumer_spaces

    from onnxprune.evidence.probes import probeable

    if source.startswith("light_"):
        from light_models import materialise
        analysis = analyse(materialise(source[len("light_"):]))
    else:
        analysis = analyse(MODELS / f"{source}.onnx", input_range=(0.0, 1.0))
    groups = [g for g in analysis.dep.prunable_groups() if probeable(g, analysis.shapes)]
    stats = analysis.statistics(consumer_spaces(*groups), seed=0)
    plans = {g.id: GroupPlan(g.id, g.name, g.size, []) for g in groups}
    estimates, _ = least_squares_estimates(groups, plans, stats, {})
    probe = ProbeModel(analysis.graph, analysis.model, groups, analysis.moments, analysis.prior,
                       analysis.input_shapes, probes=2, seed=0, estimates=estimates)
    assert probe.sparse_spaces
    feeds = _two_candidates_per_group(groups, np.random.default_rng(0))
    assert probe.sparse_expresses(feeds)
    sparse = probe.run(feeds)
    # One more row removing two units of the first group: the whole run goes dense.
    mixed = {name: np.concatenate([m, np.ones_like(m[:1]) if "mask" in name else np.zeros_like(m[:1])])
             for name, m in feeds.items()}
    mixed[mask_name(groups[0])][-1, :2] = 0
    assert not probe.sparse_expresses(mixed)
    stray = {name: m.copy() for name, m in feeds.items()}
    stray[merge_src_name(groups[0])][1] = 0  # a merge target without its group's source
    assert not probe.sparse_expresses(stray)
    dense = probe.run(mixed)
    scale = np.abs(dense).max()
    np.testing.assert_allclose(sparse, dense[:-1], atol=1e-5 * scale, rtol=1e-4)
    assert np.abs(dense[-1] - probe.base).max() > 0


def _caffe2_style_net():
    """An IR 3, opset 9 classifier as old converters wrote them: every initializer listed as a
    graph input, and the head's Reshape to a stored [1, C] shape."""
    from onnx import helper, numpy_helper

    blocks = [nets.conv_bn("c1", "x", 3, 8), nets.conv_bn("c2", "c1", 8, 12)]
    tail = ("  p = GlobalAveragePool(c2)\n  f = Reshape(p, flat)\n  h = Gemm<transB=1>(f, fc_w, fc_b)\n"
            "  y = Softmax(h)\n")
    model = nets.from_text(nets.graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail,
                                      "int64[2] flat, float[10,12] fc_w, float[10] fc_b"), opset=9)
    flat = next(t for t in model.graph.initializer if t.name == "flat")
    flat.CopyFrom(numpy_helper.from_array(np.array([1, 12], np.int64), "flat"))
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    return model


def test_first_order_on_an_opset_9_model_with_initializers_as_inputs():
    """Inference reads the stored Reshape shape (IR 3 lists it as an input), the masks are cut
    with opset 9's attribute Slice, and the loss finds the class count."""
    from onnxprune.ir.shapes import infer_shapes

    model = _caffe2_style_net()
    inputs = [i.name for i in model.graph.input]
    inferred = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in infer_shapes(model).graph.value_info}
    assert inferred["f"] == [1, 12] and inferred["h"] == [1, 10]
    assert [i.name for i in model.graph.input] == inputs and model.ir_version == 3  # left as it was
    groups, _, taylor = _first_order_over_every_group(analyse(model, input_range=(0.0, 1.0)), 4)
    assert all(np.all(np.isfinite(v)) and v.shape == (g.size,) for g in groups for v in [taylor[g.id]])


def test_opset_9_masks_read_units_as_opset_17_gathers_do():
    """Before opset 11 a unit-to-channel map is a one-hot MatMul (the first order differentiates
    it; a Gather's gradient needs ScatterElements): rows measure the same either way."""
    blocks = [nets.conv_bn("c1", "x", 3, 8), nets.conv_bn("c2", "m", 8, 12)]
    tail = ("  m = MaxPool<kernel_shape=[2,2], strides=[2,2]>(c1)\n  m2 = MaxPool<kernel_shape=[2,2], strides=[2,2]>(c2)\n"
            "  f = Flatten(m2)\n  h = Gemm<transB=1>(f, fc1_w, fc1_b)\n  y = Gemm<transB=1>(h, fc2_w, fc2_b)\n")
    text = nets.graph("(float[1,3,16,16] x) => (float[1,10] y)", blocks, tail,
                      "float[20,192] fc1_w, float[20] fc1_b, float[10,20] fc2_w, float[10] fc2_b")
    out = []
    for opset in (9, 17):
        analysis = analyse(nets.from_text(text, opset=opset), input_range=(0.0, 1.0))
        group = next(g for g in analysis.dep.prunable_groups() if g.size == 12)  # read as blocks by the Gemm
        probe = ProbeModel(analysis.graph, analysis.model, [group], analysis.moments, analysis.prior,
                           analysis.input_shapes, inputs=analysis.probe_inputs(4, 0))
        masks = np.ones((3, group.size), np.float32)
        masks[1, 2], masks[2, 7] = 0, 0
        out.append(probe.run({mask_name(group): masks}))
        assert probe.first_order() is not None
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_the_first_order_factor_is_off_where_units_cannot_merge():
    """A conv map read flattened into blocks cannot merge a unit into another; paoding plans
    such nets without the first-order factor (it measured worse there), others with it."""
    from onnxprune.evidence.probes import mergeable

    flat = analyse(nets.vgg_flatten(), input_range=(0.0, 1.0))
    assert not all(mergeable(g) for g in flat.dep.prunable_groups())
    assert all(mergeable(g) for g in analyse(nets.resnet(), input_range=(0.0, 1.0)).dep.prunable_groups())
    for model, used in ((nets.vgg_flatten(), False), (nets.mobile_net(), True)):
        _, report = prune(model, 0.3, method="paoding", input_range=(0.0, 1.0), check=0)
        assert report.plan.details["first_order"] is used


def _shape_fed_net():
    """A Reshape at the end whose target is the Shape of an early map: a tensor of the batch's
    size that no row may capture at the probes' batch."""
    blocks = [nets.conv_bn("c1", "x", 3, 8), nets.conv_bn("c2", "c1", 8, 8)]
    tail = ("  sh = Shape(c1)\n  r = Reshape(c2, sh)\n  g = GlobalAveragePool(r)\n  f = Flatten(g)\n"
            "  y = Gemm<transB=1>(f, fc_w, fc_b)\n")
    return nets.from_text(nets.graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail,
                                     "float[10,8] fc_w, float[10] fc_b"))


@pytest.mark.parametrize("name,lean", [("resnet", False), ("concat", False), ("mobile", False),
                                       ("vgg_flatten", False), ("shape_fed", False),
                                       ("resnet", True), ("vgg_flatten", True), ("mobile", "in")])
def test_rows_run_from_where_their_masks_enter_as_through_the_whole_model(name, lean, monkeypatch):
    """Rows of one group run a sub-model fed what the unablated run computed upstream; rows of
    several groups, or none, run whole. Every row reads as the whole model reads it. ``lean``:
    as a large model's, the sub-models' large weights kept out of their protos and fed as
    inputs (True), or put back where the sub-model's own are too few to be lean ("in")."""
    from onnxprune.ir import runtime

    if lean:
        monkeypatch.setattr(runtime, "LEAN_TENSOR_BYTES", 64)
        monkeypatch.setattr(runtime, "LEAN_SESSION_BYTES", 1 if lean is True else 1 << 30)
    model = _shape_fed_net() if name == "shape_fed" else nets.ALL[name]()
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    analysis = analyse(model, {"x": shape}, input_range=(0.0, 1.0))
    groups = analysis.dep.prunable_groups()
    probe = ProbeModel(analysis.graph, analysis.model, groups, analysis.moments, analysis.prior,
                       analysis.input_shapes, probes=5, seed=0)
    assert probe.frontier.cuts, "some group spares part of the model"
    for cut in probe.frontier.cuts.values():
        assert all(analysis.moments.shapes[c][0] == 1 for c in cut.captures)
    probe.frontier.session_seconds = 0.0  # sessions free: every group with a cut runs its own sub-model
    rows = 2 * len(groups) + 2
    masks = {}
    for k, g in enumerate(groups):
        m = np.ones((rows, g.size), np.float32)
        m[2 * k, 0] = 0
        m[2 * k + 1, g.size - 1] = 0
        if k < 2:
            m[-1, 1 % g.size] = 0  # the last row ablates two groups at once; the one before, none
        src, dst = np.zeros_like(m), np.zeros_like(m)
        if g.size > 1:
            src[2 * k + 1, g.size - 1], dst[2 * k + 1, 0] = 1, 0.5
        masks.update({mask_name(g): m, merge_src_name(g): src, merge_dst_name(g): dst})
    runs = probe.runs
    whole = probe.run(masks, raw=True)
    assert probe.runs - runs == rows
    np.testing.assert_allclose(probe.run_rows(masks), whole, rtol=1e-5, atol=1e-6)
    assert probe.runs - runs == 2 * rows


@pytest.mark.parametrize("max_batch, held", [(1, True), (2, True), (2, False), (2048, False)])
def test_rows_larger_than_a_run_run_in_parts_with_the_same_outputs(max_batch, held, monkeypatch):
    """A model whose row of probes passes a run's samples (a detector at 800x608) runs each
    row, and the unablated base with its captures, in parts; one whose captures pass
    CAPTURE_BYTES takes each block's when the block runs (``held`` False). The same outputs,
    whole model and sub-models alike."""
    from onnxprune.evidence import frontier

    analysis = analyse(nets.resnet(), {"x": (1, 3, 8, 8)}, input_range=(0.0, 1.0))
    groups = analysis.dep.prunable_groups()

    def probe_with(batch):
        probe = ProbeModel(analysis.graph, analysis.model, groups, analysis.moments, analysis.prior,
                           analysis.input_shapes, probes=5, seed=0, max_batch=batch)
        probe.frontier.session_seconds = 0.0  # every group with a cut runs its own sub-model
        return probe

    whole = probe_with(2048)
    if not held:
        monkeypatch.setattr(frontier, "CAPTURE_BYTES", 0)
    parts = probe_with(max_batch)
    assert whole.frontier.holds and parts.frontier.holds == held
    assert bool(parts.frontier.captured) == held
    np.testing.assert_array_equal(parts.base, whole.base)
    masks = {}
    for k, g in enumerate(groups):
        m = np.ones((4 * len(groups) + 1, g.size), np.float32)
        for r in range(4):  # four rows a group (a block pays for its captures), all at once in the last
            m[4 * k + r, r % g.size] = m[-1, 0] = 0
        masks[mask_name(g)] = m
    assert parts.frontier.cuts
    np.testing.assert_array_equal(parts.run(masks, raw=True), whole.run(masks, raw=True))
    if held:
        np.testing.assert_array_equal(parts.run_rows(masks), whole.run_rows(masks))
        assert parts.runs == whole.runs
    else:  # a block that takes its captures costs a run more: some rows run whole instead
        np.testing.assert_allclose(parts.run_rows(masks), whole.run(masks, raw=True), rtol=1e-5, atol=1e-6)
        assert parts.frontier.rows > 0 and not parts.frontier.captured  # blocks took their own


def test_a_cut_recomputes_shape_tensors_instead_of_capturing_them():
    """A tensor that depends on the batch's size (a Shape) cannot be repeated over rows: its
    producer joins the sub-model and reads the map it measures, which is captured."""
    from onnx import TensorProto, helper

    from onnxprune.ir import Slicer

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Shape", ["a"], ["sh"]),
             helper.make_node("Mul", ["a", "m"], ["b"]), helper.make_node("Reshape", ["b", "sh"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph)
    shapes = {"x": (1, 4), "a": (1, 4), "sh": (2,), "b": (1, 4), "y": (1, 4), "m": (1, 4)}
    cut = Slicer(model, shapes, 1, {"x"}).cut({"m"}, "y")
    assert [nodes[k].op_type for k in cut.nodes] == ["Shape", "Mul", "Reshape"]
    assert cut.captures == ["a"] and cut.inputs == ["m"]
    assert Slicer(model, shapes, 1, {"x"}).cut({"x"}, "y") is None  # the whole model: no cut
