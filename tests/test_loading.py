"""Loading real exporters' quirks: external data, Constant-node weights, weight chains, shared
initializers, opset 9, and both torch exporters' files in models/."""

from pathlib import Path

import nets
import numpy as np
import onnx
import pytest
from exactness import assert_exact
from onnx import helper, numpy_helper

from onnxprune import prune
from onnxprune.ir import load_model_info, random_inputs, save_model, session
from onnxprune.pipeline import analyse

MODELS = Path(__file__).resolve().parent.parent / "models"


def _outputs(model, shapes, seed=0):
    return session(model).run(None, random_inputs(model, shapes, np.random.default_rng(seed)))


def test_external_data_round_trip(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(nets.resnet(), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model, external = load_model_info(src)
    assert external
    pruned, _ = prune(model, 0.4, method="magnitude")
    written = save_model(pruned, tmp_path / "out.onnx", external_data=True)
    assert [p.name for p in written] == ["out.onnx", "out.onnx.data"]
    reloaded, external = load_model_info(tmp_path / "out.onnx")
    assert external and len(reloaded.graph.initializer) == len(pruned.graph.initializer)


def _weights_as_constant_nodes(model):
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    nodes += list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_constant_node_weights_prune_like_initializers():
    plain, as_nodes = nets.resnet(), _weights_as_constant_nodes(nets.resnet())
    a, _ = prune(plain, 0.4, method="magnitude")
    b, _ = prune(as_nodes, 0.4, method="magnitude")
    shapes = {"x": (1, 3, 8, 8)}
    for x, y in zip(_outputs(a, shapes), _outputs(b, shapes)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_weights_behind_constant_of_shape_identity_and_cast_chains_are_folded():
    model = nets.resnet()
    # fc weight: float64 initializer -> Cast -> Identity; stem bias-like constant: ConstantOfShape.
    fc = next(t for t in model.graph.initializer if t.name == "fc_w")
    wide = numpy_helper.from_array(numpy_helper.to_array(fc).astype(np.float64), "fc_w64")
    model.graph.initializer.remove(fc)
    model.graph.initializer.append(wide)
    shape = numpy_helper.from_array(np.array([16], np.int64), "zeros_shape")
    model.graph.initializer.append(shape)
    model.graph.node.extend([
        helper.make_node("Cast", ["fc_w64"], ["fc_w32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Identity", ["fc_w32"], ["fc_w"]),
        helper.make_node("ConstantOfShape", ["zeros_shape"], ["zeros16"],
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
    ])
    add = next(n for n in model.graph.node if n.op_type == "Add" and "r2s" in n.output)
    add.output[0] = "r2s_pre"
    model.graph.node.append(helper.make_node("Add", ["r2s_pre", "zeros16b"], ["r2s"]))
    model.graph.node.append(helper.make_node("Reshape", ["zeros16", "shape3"], ["zeros16b"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([16, 1, 1], np.int64), "shape3"))
    nets.toposort_graph(model.graph)
    onnx.checker.check_model(model, full_check=True)
    analysis = analyse(model)
    assert {n.op for n in analysis.graph.nodes}.isdisjoint({"Cast", "Identity", "ConstantOfShape"})
    spine = next(g for g in analysis.dep.groups if any(n.outputs[0].name == "b2_c" for n in g.producers))
    assert spine.prunable
    assert_exact(model, spine.id, [0, 3, 9])


def test_shared_initializer_is_copied_before_slicing():
    text = ("net (float[1,4,8,8] x, float[8,4,3,3] w1, float[8,8,3,3] shared, float[10,8] fc_w) => (float[1,10] y) {\n"
            "  a = Conv<pads=[1,1,1,1]>(x, w1)\n  ar = Relu(a)\n  b = Conv<pads=[1,1,1,1]>(ar, shared)\n"
            "  br = Relu(b)\n  c = Conv<pads=[1,1,1,1]>(br, shared)\n  g = GlobalAveragePool(c)\n  f = Flatten(g)\n"
            "  y = Gemm<transB=1>(f, fc_w)\n}")
    model = nets.from_text(text)
    groups = analyse(model).dep.prunable_groups()
    assert len(groups) == 3
    for g in groups:
        assert_exact(model, g.id, [1, 2, 5])
    pruned, _ = prune(model, 0.5, method="magnitude")
    b, c = [n for n in pruned.graph.node if n.op_type == "Conv"][1:]
    assert b.input[1] != c.input[1]  # `shared` was copied, each copy sliced for its own groups


def test_opset9_sum_residual_and_old_batchnorm():
    text = ("net (float[1,3,8,8] x, float[8,3,3,3] s_w, float[8,8,3,3] a_w, float[8] bn_scale, float[8] bn_b,"
            " float[8] bn_mean, float[8] bn_var, float[10,8] fc_w, float[10] fc_b) => (float[1,10] y) {\n"
            "  s = Conv<pads=[1,1,1,1]>(x, s_w)\n  sr = Relu(s)\n  a = Conv<pads=[1,1,1,1]>(sr, a_w)\n"
            "  an = BatchNormalization<epsilon=0.00001>(a, bn_scale, bn_b, bn_mean, bn_var)\n"
            "  r = Sum(an, sr, sr)\n  u = Upsample<mode=\"nearest\">(r, up)\n  g = GlobalAveragePool(u)\n"
            "  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n"
            "  up = Constant<value=float[4] {1.0,1.0,2.0,2.0}>()\n}")
    model = nets.from_text(text, opset=9)
    (group,) = analyse(model).dep.prunable_groups()
    assert group.size == 8 and len(group.producers) == 2
    assert_exact(model, group.id, [2, 7])


@pytest.mark.parametrize("name", ["resnet", "resnet_dynamo", "mobilenet", "mobilenet_dynamo", "densenet_dynamo",
                                  "vit", "vit_dynamo"])
def test_torch_exports_prune_and_keep_a_dynamic_batch(name):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built")
    model, _ = load_model_info(path)
    pruned, report = prune(model, 0.4, check=2, method="magnitude")
    assert report.groups_pruned > 0 and report.after.params < report.before.params
    x = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
    (logits,) = session(pruned).run(None, {"input": x})
    assert logits.shape == (5, 10)


def test_lean_sessions_run_like_plain_ones(monkeypatch):
    """Large models get sessions fed their weights in place (no copy of the model): same outputs."""
    from onnxprune.ir import runtime

    model = nets.resnet()
    shapes = {"x": (1, 3, 8, 8)}
    plain = _outputs(model, shapes)
    monkeypatch.setattr(runtime, "LEAN_SESSION_BYTES", 1)
    monkeypatch.setattr(runtime, "LEAN_TENSOR_BYTES", 256)
    before = model.SerializeToString()
    sess = session(model)
    assert isinstance(sess, runtime.LeanSession) and [i.name for i in sess.get_inputs()] == ["x"]
    lean = sess.run(None, random_inputs(model, shapes, np.random.default_rng(0)))
    for a, b in zip(plain, lean):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert model.SerializeToString() == before


def test_saving_with_external_data_leaves_the_model_alone(tmp_path):
    model = nets.resnet()
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    reloaded, files = load_model_info(tmp_path / "m.onnx")
    assert [f.name for f in files] == ["m.onnx.data"]
    for a, b in zip(model.graph.initializer, reloaded.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_unsorted_fp16_model_is_sorted_and_keeps_its_dtypes(tmp_path):
    """Some published fp16 models list nodes out of order: sorted on load, still fp16."""
    model = nets.resnet()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(tmp_path / "fp16.onnx"))
    loaded, _ = load_model_info(tmp_path / "fp16.onnx")
    onnx.checker.check_model(loaded)
    assert {t.data_type for t in loaded.graph.initializer} == {onnx.TensorProto.FLOAT16}
    pruned, report = prune(loaded, 0.4, check=1, method="magnitude")
    assert report.groups_pruned > 0
    assert {t.data_type for t in pruned.graph.initializer if t.dims} <= {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64}


@pytest.mark.parametrize("name", sorted(nets.ALL))
def test_serialized_size_is_byte_size_without_encoding_the_weights(monkeypatch, name):
    """upb's ByteSize() encodes the whole model (a transient copy of every weight): large
    models are sized from a skeleton and their weights' dims, to the byte."""
    from onnxprune.ir import check_model, runtime

    model = nets.ALL[name]()
    monkeypatch.setattr(runtime, "LEAN_TENSOR_BYTES", 64)
    monkeypatch.setattr(runtime, "LEAN_SESSION_BYTES", 1)
    assert runtime.lean_weights(model)
    assert runtime.serialized_size(model) == model.ByteSize()
    check_model(model)  # the checker on the skeleton accepts a valid model


def test_a_name_that_is_not_utf8_is_a_damaged_file(tmp_path):
    """protobuf hands a string field it cannot decode back as bytes; loading refuses the file
    (exit 2 at the CLI) rather than failing later in whatever sets that name."""
    from onnxprune.errors import UserError
    from onnxprune.ir import load_model

    model = nets.mlp()
    model.graph.name = "Zq9xname"
    data = model.SerializeToString()
    assert data.count(b"Zq9xname") == 1
    path = tmp_path / "damaged.onnx"
    path.write_bytes(data.replace(b"Zq9xname", b"\x80q9xname"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_model(path)
