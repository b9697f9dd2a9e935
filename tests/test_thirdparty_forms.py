"""Forms met in real third-party models (bench/thirdparty.py), each reproduced by a small model
built here: dynamically quantized models (onnxruntime's quantize_dynamic, QOperator form, and
the older quantizer that quantizes the bias at run time), declarations an exporter repeats
without their shapes. Where the maths allows, removing a zero-contribution channel must leave
the outputs equal."""

from __future__ import annotations

import nets
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.ir import session
from onnxprune.pipeline import analyse, prune
from onnxprune.plan import GroupPlan, PruningPlan

QUANT_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")


def _quantize(model: onnx.ModelProto, tmp_path, name: str = "q") -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_dynamic
    src, dst = tmp_path / f"{name}.float.onnx", tmp_path / f"{name}.onnx"
    onnx.save(model, str(src))
    quantize_dynamic(str(src), str(dst))
    return onnx.load(str(dst))


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _cnn(zero: int | None = None) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> pool -> MatMul, float; with ``zero`` the first conv's
    output channel ``zero`` is dead (its filter and bias are zero) and nothing reads it."""
    model = nets.from_text("""
        net (float[1,3,16,16] x, float[8,3,3,3] w1, float[8] b1, float[12,8,3,3] w2, float[12] b2,
             float[12,10] wf, float[10] bf) => (float[1,10] y) {
          c1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
          r1 = Relu(c1)
          c2 = Conv<pads=[1,1,1,1]>(r1, w2, b2)
          r2 = Relu(c2)
          p = GlobalAveragePool(r2)
          f = Flatten(p)
          m = MatMul(f, wf)
          y = Add(m, bf)
        }""")
    if zero is not None:
        inits = {t.name: t for t in model.graph.initializer}
        for name, axis in (("w1", 0), ("b1", 0), ("w2", 1)):
            values = numpy_helper.to_array(inits[name]).copy()
            np.moveaxis(values, axis, 0)[zero] = 0
            inits[name].CopyFrom(numpy_helper.from_array(values, name))
    return model


def _group_of(analysis, producer_op: str, index: int = 0):
    groups = [g for g in analysis.dep.groups if any(n.op == producer_op for n in g.producers)]
    return groups[index]


def _prune_units(model, group, units):
    plan = PruningPlan("test", 0.5, 0, [GroupPlan(group.id, group.name, group.size, sorted(units))])
    pruned, _ = prune(model, 0.5, plan=plan, check=1, method="magnitude")
    return pruned


def _run(model, x):
    return session(model).run(None, {"x": x})[0]


def test_quantize_dynamic_cnn_finds_integer_groups_and_stays_quantized(tmp_path):
    model = _quantize(_cnn(), tmp_path)
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} <= set(_ops(model))
    analysis = analyse(model)
    prunable = analysis.dep.prunable_groups()
    assert {n.op for g in prunable for n in g.producers} >= {"ConvInteger"}
    pruned, report = prune(model, 0.4, check=2, method="magnitude")
    onnx.checker.check_model(pruned, full_check=True)
    ops = _ops(pruned)
    assert all(ops.get(op, 0) == _ops(model)[op] for op in QUANT_OPS)  # still quantized
    assert report.after.macs < report.before.macs
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert any(w.dtype in (np.int8, np.uint8) and w.ndim == 4 and w.shape[0] < 8 for w in weights.values())
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert _run(pruned, x).shape == (1, 10)


def test_quantized_zero_contribution_channel_prunes_exactly(tmp_path):
    """A dead channel (zero filter, zero bias, zero readers) quantizes to the zero points; its
    removal leaves every DynamicQuantizeLinear range unchanged (0 is always in range), so the
    quantized outputs are equal."""
    model = _quantize(_cnn(zero=5), tmp_path)
    analysis = analyse(model)
    group = _group_of(analysis, "ConvInteger", 0)
    assert group.size == 8 and group.prunable
    pruned = _prune_units(model, group, [5])
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(pruned, x), _run(model, x), atol=1e-6, rtol=0)
    assert sum(n.op_type == "ConvInteger" for n in pruned.graph.node) == 2


def test_zero_point_is_subtracted_before_the_magnitude_is_read(tmp_path):
    """uint8 weights around a zero point: magnitude reads q - zero_point, so the dead channel
    (all q equal to the zero point) scores lowest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = tmp_path / "f.onnx", tmp_path / "u8.onnx"
    onnx.save(_cnn(zero=2), str(src))
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    model = onnx.load(str(dst))
    from onnxprune.passes.scoring import MagnitudeScorer
    group = _group_of(analyse(model), "ConvInteger", 0)
    scores = MagnitudeScorer().score(group)
    assert int(np.argmin(scores)) == 2


# -- the older quantizer: the bias quantized at run time, in int32 --------------------------------
OLD_QUANT = """
    net (float[1,2,8,8] x) => (float[1,4,8,8] y) {
      xq, xs, xz = DynamicQuantizeLinear(x)
      bs = Mul(xs, ws)
      bt = Div(bias, bs)
      bf = Floor(bt)
      bi = Cast<to=6>(bf)
      br = Reshape(bi, bshape)
      ci = ConvInteger<pads=[1,1,1,1]>(xq, wq, xz, wz)
      ca = Add(ci, br)
      cf = Cast<to=1>(ca)
      os = Mul(xs, ws)
      c = Mul(cf, os)
      r = Relu(c)
      rq, rs, rz = DynamicQuantizeLinear(r)
      di = ConvInteger(rq, w2q, rz, w2z)
      df = Cast<to=1>(di)
      s2 = Mul(rs, w2s)
      y = Mul(df, s2)
    }"""


def _old_quant(dead: int | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    wq = rng.integers(0, 255, (6, 2, 3, 3)).astype(np.uint8)
    w2q = rng.integers(0, 255, (4, 6, 1, 1)).astype(np.uint8)
    bias = (0.1 * rng.standard_normal(6)).astype(np.float32)
    if dead is not None:
        wq[dead], w2q[:, dead], bias[dead] = 128, 128, 0.0
    model = onnx.parser.parse_model(nets.HEADER.format(opset=13) + OLD_QUANT)
    consts = {"ws": np.float32(0.01), "wq": wq, "wz": np.uint8(128), "bias": bias,
              "bshape": np.array([1, 6, 1, 1], np.int64), "w2q": w2q, "w2z": np.uint8(128), "w2s": np.float32(0.02)}
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def test_runtime_quantized_bias_is_sliced_with_its_channels():
    model = _old_quant(dead=3)
    analysis = analyse(model)
    group = _group_of(analysis, "ConvInteger", 0)
    assert group.size == 6 and group.prunable, group.blocked
    pruned = _prune_units(model, group, [3])
    onnx.checker.check_model(pruned, full_check=True)
    shapes = {t.name: list(numpy_helper.to_array(t).shape) for t in pruned.graph.initializer}
    assert shapes["bias"] == [5] and shapes["wq"][0] == 5 and shapes["w2q"][1] == 5
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "bshape")).tolist() == [1, 5, 1, 1]
    x = np.random.default_rng(2).standard_normal((1, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(pruned, x), _run(model, x), atol=1e-6, rtol=0)


def test_quantized_lstm_blocks_with_a_reason():
    node = helper.make_node("DynamicQuantizeLSTM", ["x"], ["y"], domain="com.microsoft", name="lstm")
    import onnx_graphsurgeon as gs

    from onnxprune.coupling import RuleContext, rule_for
    g = gs.import_onnx(helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])))
    gs_node = g.nodes[0]
    coupling = rule_for(gs_node).couple(gs_node, gs_node.inputs[0], 2, RuleContext(g, {"x": (2, 1, 4)}))
    assert coupling.reason is not None and "quantized" in coupling.reason.message


# -- declarations repeated without their shapes ---------------------------------------------------
def test_output_repeated_in_value_info_without_shape_keeps_its_declared_shape():
    """onnxruntime's older quantizer lists graph outputs again in value_info with only a type:
    the pruned model must still declare the output's shape (the checker requires it)."""
    model = _cnn()
    model.graph.value_info.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    pruned, _ = prune(model, 0.4, check=1, method="magnitude")
    onnx.checker.check_model(pruned, full_check=True)
    dims = [d.dim_value for d in pruned.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 10]


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_quantized_model_prunes_validly_at_ratio(tmp_path, ratio):
    model = _quantize(_cnn(), tmp_path)
    pruned, _ = prune(model, ratio, check=2, method="magnitude")
    onnx.checker.check_model(pruned, full_check=True)
    assert [o.name for o in pruned.graph.output] == ["y"]


# -- inputs whose first axis is not the batch ------------------------------------------------------
def test_state_and_scalar_inputs_are_fed_whole_in_the_fidelity_check():
    """A voice-activity net's state [layers, batch, hidden] and its scalar sample rate: the
    verification's synthetic feeds keep their exact shapes (they used to be stacked on axis 0,
    and onnxruntime refused the pruned model's own check: an internal error)."""
    model = nets.from_text("""
        net (float[1,8] x, float[3,1,8] state, int64 sr, float[8,16] w1, float[16,8] w2) => (float[1,8] y,
             float[3,1,8] stateN) {
          m = MatMul(x, w1)
          h = Relu(m)
          o = MatMul(h, w2)
          rate = Cast<to=1>(sr)
          y = Mul(o, rate)
          stateN = Add(state, y)
        }""", inputs=("x", "state", "sr"))
    analysis = analyse(model)
    assert analysis.sample_axes == {"x": 0, "state": 1, "sr": None}  # samples stack on the state's batch axis
    assert analysis.synthetic(4, 0).arrays["state"].shape == (3, 4, 8)
    pruned, report = prune(model, 0.4, check=3, method="magnitude")
    onnx.checker.check_model(pruned, full_check=True)
    assert report.groups_pruned == 1 and report.fidelity.probes == 3


# -- sizes computed at run time, followed per axis (U2-Net's upsample-to-skip) -------------------
UPSAMPLE_TO_SKIP = """
    net (float[1,3,16,16] x, float[8,3,3,3] w1, float[8] b1, float[6,8,3,3] w2, float[6] b2,
         float[4,14,3,3] w3) => (float[1,4,16,16] y) {
      i0 = Constant<value=int64[1] {0}>()
      i2 = Constant<value=int64[1] {2}>()
      i4 = Constant<value=int64[1] {4}>()
      c1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r1 = Relu(c1)
      p = MaxPool<kernel_shape=[2,2], strides=[2,2]>(r1)
      c2 = Conv<pads=[1,1,1,1]>(p, w2, b2)
      r2 = Relu(c2)
      big = Shape(r1)
      hw = Slice(big, i2, i4)
      small = Shape(r2)
      nc = Slice(small, i0, i2)
      sizes = Concat<axis=0>(nc, hw)
      up = Resize<mode="nearest">(r2, , , sizes)
      cat = Concat<axis=1>(up, r1)
      y = Conv<pads=[1,1,1,1]>(cat, w3)
    }"""


def _upsample_to_skip() -> onnx.ModelProto:
    return nets.from_text(UPSAMPLE_TO_SKIP)


def test_shape_to_resize_sizes_followed_per_axis():
    """sizes = Shape(r2)[0:2] ++ Shape(r1)[2:4]: the channel count is read from the resized
    tensor itself (it follows the pruning), r1's read is spatial only: both groups prune."""
    analysis = analyse(_upsample_to_skip())
    by_producer = {g.producers[0].outputs[0].name: g for g in analysis.dep.groups if g.producers}
    assert by_producer["c2"].prunable, by_producer["c2"].blocked
    assert by_producer["c1"].prunable, by_producer["c1"].blocked


@pytest.mark.parametrize("producer", ["c1", "c2"])
def test_shape_to_resize_zero_contribution_is_exact(producer):
    from exactness import assert_exact
    model = _upsample_to_skip()
    analysis = analyse(model)
    group = next(g for g in analysis.dep.groups if g.producers and g.producers[0].outputs[0].name == producer)
    pruned = assert_exact(model, group.id, [1, 3])
    assert [o.name for o in pruned.graph.output] == ["y"]


# -- tf2onnx / jax2tf forms -----------------------------------------------------------------------
TF_FORMS = {
    "Keras PRelu on an NHWC tensor (slope [H, W, C])": """
     net (float[1,3,8,8] x, float[8,3,3,3] w1, float[8,8,8] slope, float[6,8,3,3] w2) => (float[1,6,8,8] y) {
       c = Conv<pads=[1,1,1,1]>(x, w1)
       t = Transpose<perm=[0,2,3,1]>(c)
       p = PRelu(t, slope)
       b = Transpose<perm=[0,3,1,2]>(p)
       y = Conv<pads=[1,1,1,1]>(b, w2)
     }""",
    "NHWC bias and activation between Transpose pairs": """
     net (float[1,3,8,8] x, float[8,3,3,3] w1, float[8] bias, float[6,8,3,3] w2) => (float[1,6,8,8] y) {
       c = Conv<pads=[1,1,1,1]>(x, w1)
       t = Transpose<perm=[0,2,3,1]>(c)
       a = Add(t, bias)
       r = Relu(a)
       b = Transpose<perm=[0,3,1,2]>(r)
       y = Conv<pads=[1,1,1,1]>(b, w2)
     }""",
    "Keras Flatten of an NHWC tensor into a Dense": """
     net (float[1,3,4,4] x, float[8,3,3,3] w1, float[128,10] wd) => (float[1,10] y) {
       c = Conv<pads=[1,1,1,1]>(x, w1)
       r = Relu(c)
       t = Transpose<perm=[0,2,3,1]>(r)
       s = Constant<value=int64[2] {1,128}>()
       f = Reshape(t, s)
       y = MatMul(f, wd)
     }""",
    "Pad with pads computed at run time (SAME padding)": """
     net (float[1,3,8,8] x, float[8,3,3,3] w1, float[6,8,3,3] w2) => (float[1,6,10,10] y) {
       i2 = Constant<value=int64[1] {2}>()
       i4 = Constant<value=int64[1] {4}>()
       c = Conv<pads=[1,1,1,1]>(x, w1)
       s = Shape(c)
       hw = Slice(s, i2, i4)
       k = Constant<value=int64[2] {9,9}>()
       d = Sub(hw, k)
       z2 = Constant<value=int64[2] {0,0}>()
       pads = Concat<axis=0>(z2, d, z2, d)
       p = Pad(c, pads)
       y = Conv<pads=[1,1,1,1]>(p, w2)
     }""",
}


@pytest.mark.parametrize("form", sorted(TF_FORMS))
def test_tf2onnx_form_prunes_exactly(form):
    from exactness import assert_exact
    model = nets.from_text(TF_FORMS[form])
    analysis = analyse(model)
    group = next(g for g in analysis.dep.groups if g.producers and g.producers[0].outputs[0].name == "c")
    assert group.prunable and group.size == 8, group.blocked
    assert_exact(model, group.id, [2, 5])


def test_one_hot_equal_is_followed_and_says_nothing_produces_it():
    """jax2tf's one-hot, Equal(ids, classes): its class axis is not a channel any weight
    produces; the group says so instead of 'Equal is not supported'."""
    model = nets.from_text("""
     net (int64[1,16] ids, float[1,1,32] classes, float[32,8] w) => (float[1,16,8] y) {
       ax = Constant<value=int64[1] {2}>()
       u = Unsqueeze(ids, ax)
       f = Cast<to=1>(u)
       e = Equal(f, classes)
       o = Cast<to=1>(e)
       y = MatMul(o, w)
     }""", inputs=("ids",))
    group = next(g for g in analyse(model).dep.groups if ("o", 2) in g.spaces)
    assert [r.kind.value for r in group.reasons] == ["no_producer"]


# -- LayerNorms written out op by op ---------------------------------------------------------------
LAYER_NORMS = {
    # jax2tf / tf2onnx: sums times 1/n, E[x^2] - E[x]^2
    "ReduceSum * 1/n": """
     net (float[2,5] x, float[5,8] w1, float[8] gamma, float[8] beta, float[8,3] w2) => (float[2,3] y) {
       h = MatMul(x, w1)
       ax = Constant<value=int64[1] {1}>()
       inv = Constant<value=float {0.125}>()
       eps = Constant<value=float {0.001}>()
       s = ReduceSum<keepdims=0>(h, ax)
       mean = Mul(s, inv)
       sq = Mul(h, h)
       s2 = ReduceSum<keepdims=0>(sq, ax)
       ex2 = Mul(s2, inv)
       m2 = Mul(mean, mean)
       var = Sub(ex2, m2)
       shp = Constant<value=int64[2] {2,1}>()
       mr = Reshape(mean, shp)
       vr = Reshape(var, shp)
       ve = Add(vr, eps)
       sd = Sqrt(ve)
       rs = Reciprocal(sd)
       sc = Mul(rs, gamma)
       xc = Sub(h, mr)
       n = Mul(xc, sc)
       o = Add(n, beta)
       y = MatMul(o, w2)
     }""",
    # Keras / PyTorch: ReduceMean, Sub, Pow, ReduceMean
    "ReduceMean, Sub, Pow, ReduceMean": """
     net (float[2,5] x, float[5,8] w1, float[8] gamma, float[8] beta, float[8,3] w2) => (float[2,3] y) {
       h = MatMul(x, w1)
       two = Constant<value=float {2.0}>()
       eps = Constant<value=float {0.001}>()
       mean = ReduceMean<axes=[-1], keepdims=1>(h)
       xc = Sub(h, mean)
       p = Pow(xc, two)
       var = ReduceMean<axes=[-1], keepdims=1>(p)
       ve = Add(var, eps)
       sd = Sqrt(ve)
       n = Div(xc, sd)
       g = Mul(n, gamma)
       o = Add(g, beta)
       y = MatMul(o, w2)
     }""",
}


def _layer_norm_reference(model, x, keep):
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = x.astype(np.float64) @ w["w1"][:, keep]
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    o = (h - mean) / np.sqrt(var + 0.001) * w["gamma"][keep] + w["beta"][keep]
    return o @ w["w2"][keep]


@pytest.mark.parametrize("form", sorted(LAYER_NORMS))
def test_written_out_layer_norm_is_opt_in_and_then_a_layer_norm_over_the_kept_channels(form):
    model = nets.from_text(LAYER_NORMS[form])
    group = next(g for g in analyse(model).dep.groups if g.producers and g.producers[0].outputs[0].name == "h")
    assert not group.prunable and {r.kind.value for r in group.reasons} == {"opt_in"}, group.blocked
    assert "LayerNorm written out" in group.blocked[0]
    options = {"prune_hidden": True}
    group = next(g for g in analyse(model, options=options).dep.groups
                 if g.producers and g.producers[0].outputs[0].name == "h")
    assert group.prunable, group.blocked
    plan = PruningPlan("test", 0.5, 0, [GroupPlan(group.id, group.name, group.size, [2, 5])])
    pruned, _ = prune(model, 0.5, plan=plan, check=1, options=options, compensate=False, method="magnitude")
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    got = session(pruned).run(None, {"x": x})[0]
    keep = [0, 1, 3, 4, 6, 7]
    np.testing.assert_allclose(got, _layer_norm_reference(model, x, keep), atol=1e-4, rtol=1e-4)
    full = session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(full, _layer_norm_reference(model, x, list(range(8))), atol=1e-4, rtol=1e-4)


# -- recurrent state as graph input and output -----------------------------------------------------
def test_state_outputs_say_they_are_a_recurrent_state_in_inspect():
    """A state fed back by the caller (silero's state -> stateN) keeps its channels, and the
    refusal says why in words a user reads."""
    model = nets.from_text("""
        net (float[1,8] x, float[2,1,8] state, float[8,16] w1, float[16,8] w2) => (float[1,8] y,
             float[2,1,8] stateN) {
          m = MatMul(x, w1)
          h = Relu(m)
          y = MatMul(h, w2)
          stateN = Add(state, y)
        }""", inputs=("x", "state"))
    messages = [r.message for g in analyse(model).dep.groups for r in g.reasons]
    state = [m for m in messages if "recurrent state" in m]
    assert any(m.startswith("'stateN' is a graph output") for m in state), messages
    assert any(m.startswith("'state' is a graph input") for m in state), messages
    assert "'x' is a graph input" in messages  # not a state: the plain wording


def test_a_tensor_without_a_shape_blocks_with_that_reason_not_an_analysis_failure():
    """Silero's decoder Squeeze feeds only If bodies: its output had no shape and the group said
    'could not be analysed (TypeError(...))'. It now says which tensor has no shape."""
    from onnxprune.depgraph import DependencyGraph
    model = nets.from_text("""
        net (float[1,4,1] x, float[6,4,1] w1, float[3,6] w2) => (float[1,3] y) {
          c = Conv(x, w1)
          r = Relu(c)
          ax = Constant<value=int64[1] {2}>()
          s = Squeeze(r, ax)
          y = MatMul(s, w2t)
          w2t = Transpose<perm=[1,0]>(w2)
        }""")
    analysis = analyse(model)
    shapes = {k: v for k, v in analysis.shapes.items() if k != "s"}
    dep = DependencyGraph(analysis.graph, shapes)
    group = next(g for g in dep.groups if g.producers and g.producers[0].op == "Conv")
    kinds = {r.kind.value for r in group.reasons}
    assert "unknown_shape" in kinds and "analysis_failure" not in kinds, group.blocked
    assert any("'s' has no known shape" in m for m in group.blocked)


def test_a_model_of_ops_without_rules_has_groups_that_say_why():
    """A QLinearConv model (static quantization, QOperator) has no op onnxprune seeds from: it
    used to report no group and no reason at all."""
    rng = np.random.default_rng(0)
    w = rng.integers(-20, 20, (4, 3, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in
             {"xs": np.float32(0.05), "xz": np.uint8(128), "w": w, "ws": np.float32(0.01), "wz": np.int8(0),
              "ys": np.float32(0.1), "yz": np.uint8(128)}.items()]
    model = helper.make_model(helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits),
        opset_imports=[helper.make_opsetid("", 13)])
    groups = analyse(model).dep.groups
    assert groups and not any(g.prunable for g in groups)
    assert any("QLinearConv" in m for g in groups for m in g.blocked), [g.blocked for g in groups]


def test_a_mac_target_counts_the_integer_and_transposed_layers_the_report_counts(tmp_path):
    """The budget counted Conv, Gemm and MatMul only, the report every MAC op: on a dynamically
    quantized net (ConvInteger, MatMulInteger) it solved for a share of almost nothing and
    the int8 page classifier at --target macs=0.5 kept 0.9% of its MACs. ConvTranspose (a
    text detector's upsampling head) was left out the same way."""
    model = _quantize(_cnn(), tmp_path)
    _, report = prune(model, target="macs=0.5", check=1, method="magnitude")
    assert abs(report.after.macs / report.before.macs - 0.5) <= 0.02 * 0.5, report.after.macs / report.before.macs
    upsampling = nets.from_text(
        "net (float[1,4,8,8] x, float[16,4,3,3] c1_w, float[16,12,2,2] t_w, float[12] t_b, float[10,12] fc_w,"
        " float[10] fc_b) => (float[1,10] y) {\n  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n  a = Relu(h)\n"
        "  z = ConvTranspose<strides=[2,2]>(a, t_w, t_b)\n  r = Relu(z)\n  g = GlobalAveragePool(r)\n"
        "  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n}")
    _, report = prune(upsampling, target="macs=0.5", check=1, method="magnitude")
    assert abs(report.after.macs / report.before.macs - 0.5) <= 0.02 * 0.5, report.after.macs / report.before.macs
