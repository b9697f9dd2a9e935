"""One coupling-rule test per op family: a producer conv, the op under test, a consumer conv.

A prunable family must prune the producer's channels exactly (zero-contribution exactness);
a family that cannot follow a removal must block the group and name the reason.
"""

import nets
import pytest
from exactness import assert_exact

from onnxprune.coupling import BlockKind
from onnxprune.pipeline import analyse
from onnxprune.rules.opsets import SOFTMAX_AXES, OpsetTable, placement

CONSTS = ("float[8,4,3,3] c1_w, float[8] c1_b, float[6,{cin},3,3] c2_w, float[10,6] fc_w, float[10] fc_b")


def sandwich(op_text: str, extra: str = "", cin: int = 8, opset: int = 17, hw: int = 8):
    """x -> Conv(8) -> h -> OP -> o -> Conv(6) -> pool -> Gemm -> y."""
    decl = CONSTS.format(cin=cin) + (", " + extra if extra else "")
    text = (f"net (float[1,4,{hw},{hw}] x, {decl}) => (float[1,10] y) {{\n"
            f"  h = Conv<pads=[1,1,1,1]>(x, c1_w, c1_b)\n{op_text}\n"
            f"  z = Conv<pads=[1,1,1,1]>(o, c2_w)\n  g = GlobalAveragePool(z)\n  f = Flatten(g)\n"
            f"  y = Gemm<transB=1>(f, fc_w, fc_b)\n}}")
    return nets.from_text(text, opset=opset)


PRUNABLE = {
    "Relu": ("  o = Relu(h)", ""),
    "LeakyRelu": ("  o = LeakyRelu<alpha=0.1>(h)", ""),
    "PRelu per channel": ("  o = PRelu(h, slope)", "float[8,1,1] slope"),
    "Clip": ("  lo = Constant<value=float {-1.0}>()\n  hi = Constant<value=float {1.0}>()\n  o = Clip(h, lo, hi)", ""),
    "Sigmoid": ("  o = Sigmoid(h)", ""),
    "HardSigmoid": ("  o = HardSigmoid(h)", ""),
    "HardSwish": ("  o = HardSwish(h)", ""),
    "Tanh": ("  o = Tanh(h)", ""),
    "Gelu": ("  o = Gelu(h)", ""),
    "Gelu as Erf": ("  d = Div(h, sq2)\n  e = Erf(d)\n  e1 = Add(e, one)\n  m = Mul(h, e1)\n  o = Mul(m, half)",
                    "float sq2, float one, float half"),
    "x*Sigmoid(x)": ("  s = Sigmoid(h)\n  o = Mul(h, s)", ""),
    "Dropout, Identity": ("  d = Dropout(h)\n  o = Identity(d)", ""),
    "MaxPool": ("  o = MaxPool<kernel_shape=[2,2], strides=[2,2]>(h)", ""),
    "AveragePool": ("  o = AveragePool<kernel_shape=[3,3], pads=[1,1,1,1]>(h)", ""),
    "Pad spatial": ("  p = Constant<value=int64[8] {0,0,1,1,0,0,1,1}>()\n  o = Pad(h, p)", ""),
    "Resize": ("  s = Constant<value=float[4] {1.0,1.0,2.0,2.0}>()\n  o = Resize<mode=\"nearest\">(h, , s)", ""),
    "BatchNormalization": ("  o = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)",
                           "float[8] bn_scale, float[8] bn_b, float[8] bn_mean, float[8] bn_var"),
    "InstanceNormalization": ("  o = InstanceNormalization(h, in_scale, in_b)", "float[8] in_scale, float[8] in_b"),
    "Add per-channel constant": ("  o = Add(h, k)", "float[8,1,1] k"),
    "Sub, Mul, Div constants": ("  a = Sub(h, k1)\n  b = Mul(a, k2)\n  o = Div(b, k3)",
                                "float[1,8,1,1] k1, float[8,1,1] k2, float[8,1,1] k3"),
    "Add of two branches": ("  h2 = Conv<pads=[1,1,1,1]>(x, c3_w)\n  o = Add(h, h2)", "float[8,4,3,3] c3_w"),
    "Mul broadcast scalar": ("  o = Mul(h, two)", "float two"),
    "squeeze-excitation gate": ("  p = GlobalAveragePool(h)\n  s1 = Conv(p, se1_w)\n  r = Relu(s1)\n"
                                "  s2 = Conv(r, se2_w)\n  gate = Sigmoid(s2)\n  o = Mul(h, gate)",
                                "float[2,8,1,1] se1_w, float[8,2,1,1] se2_w"),
    "Transpose round trip": ("  t = Transpose<perm=[0,2,3,1]>(h)\n  r = Relu(t)\n  o = Transpose<perm=[0,3,1,2]>(r)", ""),
    "Split and Concat": ("  sp = Constant<value=int64[2] {3,5}>()\n  a, b = Split<axis=1>(h, sp)\n"
                         "  ra = Relu(a)\n  o = Concat<axis=1>(b, ra)", ""),
    "depthwise Conv": ("  o = Conv<group=8, pads=[1,1,1,1]>(h, dw_w, dw_b)", "float[8,1,3,3] dw_w, float[8] dw_b"),
    "depthwise multiplier 2": ("  o = Conv<group=8, pads=[1,1,1,1]>(h, dw_w)", "float[16,1,3,3] dw_w"),
    "ReduceMean over space": ("  o = ReduceMean<axes=[2,3], keepdims=1>(h)", ""),
}


@pytest.mark.parametrize("family", sorted(PRUNABLE))
def test_prunable_family_is_exact(family):
    op_text, extra = PRUNABLE[family]
    cin = 16 if family == "depthwise multiplier 2" else 8
    model = sandwich(op_text, extra, cin=cin, opset=20 if family == "Gelu" else 17)
    _assert_producer_groups_exact(model, "h")


def _assert_producer_groups_exact(model, tensor):
    """Every group holding channels of ``tensor``'s producer is prunable and exact.

    (A Split or Slice gives each piece of the producer's channels its own group.)"""
    groups = [g for g in analyse(model).dep.groups if any(n.outputs[0].name == tensor for n in g.producers)]
    assert groups
    for group in groups:
        assert group.prunable, group.blocked
        assert_exact(model, group.id, list(range(0, group.size - 1, 2)))


def test_slice_on_channel_axis():
    op = ("  st = Constant<value=int64[1] {2}>()\n  en = Constant<value=int64[1] {8}>()\n"
          "  ax = Constant<value=int64[1] {1}>()\n  o = Slice(h, st, en, ax)")
    model = sandwich(op, cin=6)
    groups = [g for g in analyse(model).dep.groups if any(n.outputs[0].name == "h" for n in g.producers)]
    assert sorted(g.size for g in groups) == [2, 6]  # outside and inside the slice
    _assert_producer_groups_exact(model, "h")


def test_reshape_splitting_channels_prunes_whole_blocks():
    op = ("  s = Constant<value=int64[5] {1,2,4,8,8}>()\n  r = Reshape(h, s)\n  q = Relu(r)\n"
          "  s2 = Constant<value=int64[4] {1,8,8,8}>()\n  o = Reshape(q, s2)")
    model = sandwich(op)
    (group,) = [g for g in analyse(model).dep.groups if any(n.outputs[0].name == "h" for n in g.producers)]
    assert group.size == 2  # a unit is a block of 4 channels, like an attention head
    assert_exact(model, group.id, [1])


def test_grouped_conv_removes_equally_per_group():
    text = ("net (float[1,4,8,8] x, float[8,4,3,3] c1_w, float[6,4,3,3] c2_w, float[10,6] fc_w, float[10] fc_b)"
            " => (float[1,10] y) {\n  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n  o = Relu(h)\n"
            "  z = Conv<pads=[1,1,1,1], group=2>(o, c2_w)\n  g = GlobalAveragePool(z)\n  f = Flatten(g)\n"
            "  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")
    model = nets.from_text(text)
    dep = analyse(model).dep
    group = next(g for g in dep.groups if any(n.outputs[0].name == "h" for n in g.producers))
    assert group.balance is not None and sorted(set(group.balance.tolist())) == [0, 1]
    assert_exact(model, group.id, [1, 6])  # one per conv group


def test_grouped_conv_down_to_one_input_per_group_keeps_its_groups():
    """Three of every four inputs removed leaves weights [C, 1, k, k], as a depthwise conv has:
    the groups stay (an autodfp plan once set group=-16 here)."""
    text = ("net (float[1,4,8,8] x, float[8,4,3,3] c1_w, float[6,4,3,3] c2_w, float[10,6] fc_w, float[10] fc_b)"
            " => (float[1,10] y) {\n  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n  o = Relu(h)\n"
            "  z = Conv<pads=[1,1,1,1], group=2>(o, c2_w)\n  g = GlobalAveragePool(z)\n  f = Flatten(g)\n"
            "  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")
    model = nets.from_text(text)
    group = next(g for g in analyse(model).dep.groups if any(n.outputs[0].name == "h" for n in g.producers))
    assert_exact(model, group.id, [0, 1, 2, 4, 5, 7])  # three of four in each conv group


def test_conv_transpose_consumer_and_producer():
    text = ("net (float[1,4,8,8] x, float[8,4,3,3] c1_w, float[8,6,2,2] t_w, float[6] t_b, float[10,6] fc_w,"
            " float[10] fc_b) => (float[1,10] y) {\n  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n"
            "  z = ConvTranspose<strides=[2,2]>(h, t_w, t_b)\n  r = Relu(z)\n  g = GlobalAveragePool(r)\n"
            "  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")
    model = nets.from_text(text)
    dep = analyse(model).dep
    for g in dep.prunable_groups():
        assert_exact(model, g.id, [0, 2])
    assert len(dep.prunable_groups()) == 2


def test_gemm_without_transpose_and_matmul_with_bias():
    text = ("net (float[2,16] x, float[16,12] w1, float[12] b1, float[12,8] w2, float[8] b2, float[8,5] w3)"
            " => (float[2,5] y) {\n  h = Gemm(x, w1, b1)\n  a = Relu(h)\n  m = MatMul(a, w2)\n"
            "  mb = Add(m, b2)\n  r = Tanh(mb)\n  y = MatMul(r, w3)\n}")
    model = nets.from_text(text)
    groups = analyse(model).dep.prunable_groups()
    assert sorted(g.size for g in groups) == [8, 12]
    for g in groups:
        assert_exact(model, g.id, [1, 3])


def test_flatten_and_reshape_map_a_channel_to_a_block_of_features():
    text = ("net (float[1,4,4,4] x, float[8,4,3,3] c1_w, float[10,64] fc_w) => (float[1,10] y) {\n"
            "  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n  m = MaxPool<kernel_shape=[2,2], strides=[2,2]>(h)\n"
            "  sh = Constant<value=int64[2] {1,32}>()\n  f = Reshape(m, sh)\n  t = Concat<axis=1>(f, f)\n"
            "  y = MatMul(t, fcT)\n  fcT = Transpose<perm=[1,0]>(fc_w)\n}")
    model = nets.from_text(text)
    dep = analyse(model).dep
    (group,) = dep.prunable_groups()
    assert group.size == 8
    pruned = assert_exact(model, group.id, [0, 5])
    shape = next(i for i in pruned.graph.initializer if list(i.dims) == [2] and i.data_type == 7)
    assert list(shape.int64_data or __import__("numpy").frombuffer(shape.raw_data, "int64")) == [1, 24]


BLOCKED = {
    "LRN": ("  o = LRN<size=3>(h)", "mixes channels"),
    "Softmax over channels": ("  o = Softmax<axis=1>(h)", "normalises over this axis"),
    "unknown op": ("  o = Hardmax<axis=1>(h)", "Hardmax"),
    "Reshape scattering channels": ("  s = Constant<value=int64[3] {1,2,256}>()\n  r = Reshape(h, s)\n"
                                    "  s2 = Constant<value=int64[4] {1,8,8,8}>()\n  o = Reshape(r, s2)", "splits"),
    "ReduceSum over channels": ("  ax = Constant<value=int64[1] {1}>()\n  rs = ReduceSum(h, ax)\n  o = Add(h, rs)",
                                "reduces over this axis"),
    "op without a rule": ("  o = Einsum<equation=\"nchw->nchw\">(h)", "op Einsum"),
}


@pytest.mark.parametrize("family", sorted(BLOCKED))
def test_unfollowable_op_blocks_with_reason(family):
    op_text, reason = BLOCKED[family]
    model = sandwich(op_text)
    dep = analyse(model).dep
    group = next(g for g in dep.groups if any(n.outputs[0].name == "h" for n in g.producers))
    assert not group.prunable
    assert any(reason in r for r in group.blocked), group.blocked


def test_graph_input_and_output_groups_are_never_pruned():
    dep = analyse(sandwich("  o = Relu(h)")).dep
    reasons = [r for g in dep.groups for r in g.blocked]
    assert any("'x' is a graph input" in r for r in reasons)
    assert any("'y' is a graph output" in r for r in reasons)


def _producer_group(analysis, tensor: str):
    return next(g for g in analysis.dep.groups if any(n.outputs[0].name == tensor for n in g.producers))


#: family -> (op text, the kind of refusal, the op type of the node that refuses)
KINDS = {
    "op without a rule": (BLOCKED["op without a rule"][0], BlockKind.UNSUPPORTED_OP, "Einsum"),
    "LRN": (BLOCKED["LRN"][0], BlockKind.CROSS_CHANNEL, "LRN"),
    "Softmax over channels": (BLOCKED["Softmax over channels"][0], BlockKind.CROSS_CHANNEL, "Softmax"),
    "Reshape scattering channels": (BLOCKED["Reshape scattering channels"][0], BlockKind.AXIS_LAYOUT, "Reshape"),
    "Resize to sizes with a constant channel count": (
        "  i0 = Constant<value=int64[1] {0}>()\n  i1 = Constant<value=int64[1] {1}>()\n"
        "  i2 = Constant<value=int64[1] {2}>()\n  i4 = Constant<value=int64[1] {4}>()\n"
        "  sz = Shape(h)\n  n = Slice(sz, i0, i1)\n  hw = Slice(sz, i2, i4)\n  c = Constant<value=int64[1] {8}>()\n"
        "  s4 = Concat<axis=0>(n, c, hw)\n  o = Resize<mode=\"nearest\">(h, , , s4)",
        BlockKind.RUNTIME_SHAPE, "Resize"),
    "channel count read at run time": ("  sz = Shape(h)\n  o = Expand(h, sz)", BlockKind.RUNTIME_SHAPE, "Shape"),
    "MaxPool indices in use": ("  p, idx = MaxPool<kernel_shape=[1,1]>(h)\n  fi = Cast<to=1>(idx)\n  o = Add(p, fi)",
                               BlockKind.EXTRA_OUTPUT, "MaxPool"),
}


@pytest.mark.parametrize("family", sorted(KINDS))
def test_refusal_names_its_kind_and_node(family):
    op_text, kind, op = KINDS[family]
    analysis = analyse(sandwich(op_text))
    group = _producer_group(analysis, "h")
    node = next(n.name for n in analysis.graph.nodes if n.op == op)
    found = [r for r in group.reasons if r.kind is kind and r.node == node]
    assert found, group.reasons
    assert node in found[0].message  # the message users read names the same node
    assert group.blocked == [r.message for r in group.reasons] and not group.prunable


def test_graph_input_and_output_refusals_have_kinds_and_no_node():
    dep = analyse(sandwich("  o = Relu(h)")).dep
    reasons = {r.message: r for g in dep.groups for r in g.reasons}
    assert reasons["'x' is a graph input"].kind is BlockKind.GRAPH_INPUT
    assert reasons["'y' is a graph output"].kind is BlockKind.GRAPH_OUTPUT
    assert reasons["no weight produces these channels"].kind is BlockKind.NO_PRODUCER
    assert all(r.node is None for r in reasons.values())


def test_incompatible_grouped_convolutions_name_a_grouped_conv():
    text = ("net (float[1,4,8,8] x, float[12,4,3,3] c1_w, float[6,6,3,3] a_w, float[6,4,3,3] b_w, float[10,6] fc_w,"
            " float[10] fc_b) => (float[1,10] y) {\n  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n"
            "  za = Conv<pads=[1,1,1,1], group=2>(h, a_w)\n  zb = Conv<pads=[1,1,1,1], group=3>(h, b_w)\n"
            "  z = Add(za, zb)\n  g = GlobalAveragePool(z)\n  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")
    analysis = analyse(nets.from_text(text))
    (reason,) = _producer_group(analysis, "h").reasons
    grouped = {n.name for n in analysis.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1}
    assert reason.kind is BlockKind.GROUPED_PARTITION and reason.node in grouped
    assert reason.message == "grouped convolutions partition these channels in incompatible ways"


def test_blocked_messages_are_derived_from_reasons():
    group = _producer_group(analyse(sandwich(BLOCKED["LRN"][0])), "h")
    group.blocked.append("ignored")  # a fresh list each time: the reasons are the only state
    assert group.blocked == [r.message for r in group.reasons]
    assert group.reasons[0].to_dict() == {"kind": "cross_channel", "message": group.blocked[0],
                                          "node": group.reasons[0].node}


def test_opset_table_picks_the_newest_version_not_after_the_opset():
    table = OpsetTable({13: "new", 1: "old"})
    assert [table.at(v) for v in (0, 1, 12, 13, 21)] == ["old", "old", "old", "new", "new"]
    assert SOFTMAX_AXES.at(11).through_last and not SOFTMAX_AXES.at(13).through_last
    assert placement("Split", "split", 11).attribute == "split" and placement("Split", "split", 13).slot == 1


@pytest.mark.parametrize("opset, prunable", [(11, False), (17, True)])
def test_softmax_default_axis_follows_the_opset(opset, prunable):
    """Before opset 13 Softmax normalises over every axis from 1 on (channels too); from 13 on
    over the last axis only."""
    model = sandwich("  o = Softmax(h)", opset=opset)
    group = _producer_group(analyse(model), "h")
    assert group.prunable == prunable, group.blocked
    if prunable:
        assert_exact(model, group.id, [1, 4])
    else:
        assert group.reasons[0].kind is BlockKind.CROSS_CHANNEL


@pytest.mark.parametrize("opset, split_text, where", [
    (11, "Split<axis=1, split=[3,5]>(h)", "attribute"),
    (18, "Split<axis=1, num_outputs=2>(h)", "input"),
])
def test_pruned_split_sizes_go_where_the_opset_keeps_them(opset, split_text, where):
    model = sandwich(f"  a, b = {split_text}\n  ra = Relu(a)\n  o = Concat<axis=1>(b, ra)", opset=opset)
    group = _producer_group(analyse(model), "h")  # one piece of the split channels
    assert group.prunable, group.blocked
    pruned = assert_exact(model, group.id, [0])
    (split,) = [n for n in pruned.graph.node if n.op_type == "Split"]
    attributes = {a.name for a in split.attribute}
    assert ("split" in attributes) == (where == "attribute") and (len(split.input) == 2) == (where == "input")
