"""The shared node emitter writes each op in the form its opset wants, and the model editor
edits a copy of a model the way the probe and statistics builders need."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import helper, numpy_helper

from onnxprune.gradient.emitter import Emitter
from onnxprune.gradient.static import StaticInfo
from onnxprune.ir import ModelEditor, NodeEmitter, Opset, session


def _ir(opset: int) -> int:
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True)


def _model(opset: int, body: str = "y = Relu(x)", decl: str = "float[N, 3, 4] x", out: str = "float[N, 3, 4] y"):
    text = f'<ir_version: {_ir(opset)}, opset_import: ["" : {opset}]>\nnet ({decl}) => ({out}) {{\n  {body}\n}}'
    return onnx.parser.parse_model(text)


def _check_nodes(nodes, opset: int) -> None:
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version, ctx.opset_imports = _ir(opset), {"": opset}
    for node in nodes:
        onnx.checker.check_node(node, ctx)


def _helper_ops(b: NodeEmitter) -> dict[str, str]:
    """One of every opset-aware op on ``x`` [N, 3, 4]; their outputs by op."""
    return {
        "ReduceSum": b.reduce_sum("x", [1]),
        "ReduceMean": b.reduce_mean("x", [1, 2], keepdims=0),
        "Squeeze": b.squeeze(b.unsqueeze("x", [0]), [0]),
        "Pad": b.pad("x", [0, 1, 0, 0, 1, 0]),
        "PadValue": b.pad("x", [0, 0, 1, 0, 0, 2], np.float32(1.5)),
    }


# ------------------------------------------------------------------------- opset forms
@pytest.mark.parametrize("opset", range(9, 22))
def test_helper_ops_take_parameters_as_each_opset_wants(opset):
    b = NodeEmitter(opset, "t_{n}")
    _helper_ops(b)
    _check_nodes(b.nodes, opset)
    as_input = {n.op_type: len(n.input) > 1 for n in b.nodes}
    assert as_input == {"ReduceSum": opset >= 13, "ReduceMean": opset >= 18, "Unsqueeze": opset >= 13,
                        "Squeeze": opset >= 13, "Pad": opset >= 11}


@pytest.mark.parametrize(("op", "before", "since"), [("ReduceSum", 11, 13), ("ReduceMean", 17, 18), ("Pad", 9, 11)])
def test_a_parameter_moves_from_attribute_to_input_at_its_opset(op, before, since):
    def emitted(opset):
        b = NodeEmitter(opset, "t_{n}")
        if op == "Pad":
            b.pad("x", [0, 0, 1, 0, 0, 1], np.float32(2.0))
        else:
            getattr(b, {"ReduceSum": "reduce_sum", "ReduceMean": "reduce_mean"}[op])("x", [2, 1])
        (node,) = b.nodes
        return node, {a.name: helper.get_attribute_value(a) for a in node.attribute}, b.inits

    node, attrs, inits = emitted(before)
    key = "pads" if op == "Pad" else "axes"
    assert len(node.input) == 1 and not inits
    assert attrs[key] == ([0, 0, 1, 0, 0, 1] if op == "Pad" else [2, 1])
    if op == "Pad":
        assert attrs["value"] == 2.0 and attrs["mode"] == b"constant"
    node, attrs, inits = emitted(since)
    assert key not in attrs and list(node.input[1:]) == [t.name for t in inits]
    assert numpy_helper.to_array(inits[0]).tolist() == ([0, 0, 1, 0, 0, 1] if op == "Pad" else [2, 1])
    if op == "Pad":  # the fill value is a third input, of the padded tensor's type
        assert numpy_helper.to_array(inits[1]).dtype == np.float32 and numpy_helper.to_array(inits[1]) == 2.0


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, 21])
def test_helper_ops_compute_the_same_numbers_at_every_opset(opset):
    edit = ModelEditor(_model(opset))
    b = edit.emitter("t_{n}")
    outs = _helper_ops(b)
    edit.extend(b)
    edit.set_outputs(list(outs.values()))
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    got = dict(zip(outs, session(edit.finish()).run(None, {"x": x})))
    np.testing.assert_array_equal(got["ReduceSum"], x.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got["ReduceMean"], x.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(got["Squeeze"], x)
    np.testing.assert_array_equal(got["Pad"], np.pad(x, [(0, 0), (1, 1), (0, 0)]))
    np.testing.assert_array_equal(got["PadValue"], np.pad(x, [(0, 0), (0, 0), (1, 2)], constant_values=1.5))


# ------------------------------------------------------------------------- names and constants
def test_names_follow_the_scheme_and_skip_taken_ones():
    taken = {"p_2", "p_Add_4"}
    b = NodeEmitter(13, "p_{n}", taken)
    assert [b.fresh(), b.fresh()] == ["p_1", "p_3"]
    hinted = NodeEmitter(13, "p_{hint}_{n}", taken)
    outs = hinted.add("Split", ["x"], n_out=2, axis=None)
    assert outs == ["p_Split_1", "p_Split_2"] and {"p_1", "p_3", "p_Split_1"} <= taken
    (node,) = hinted.nodes
    assert node.name == "p_Split_1/node" and not node.attribute  # attributes given as None are left out
    hinted.emit("Identity", ["x"], ["named"])
    assert hinted.nodes[-1].output == ["named"]


def test_constants_are_shared_only_where_the_emitter_says_so():
    b = NodeEmitter(13, "c_{n}")
    assert b.i64([1, 2]) != b.i64([1, 2]) and len(b.inits) == 2  # the probe builders' choice
    model = _model(13)
    g = Emitter(StaticInfo(model, Opset(13)), {"x", "y"})
    assert g.i64([1, 2]) == g.i64([1, 2]) and len(g.inits) == 1  # the gradient's
    assert g.reduce_sum("x", [1, 2]) and len(g.inits) == 1  # its helpers go through the shared const


# ------------------------------------------------------------------------- the editor
def test_the_editor_edits_a_copy_and_its_io_surgery_runs():
    model = _model(13, "h = Relu(x)\n  y = Neg(h)")
    before = model.SerializeToString()
    edit = ModelEditor(model)
    assert edit.opset == Opset(13) and edit.inputs == ["x"] and edit.outputs == ["y"]
    assert [(n.op_type, n.inputs, n.outputs) for n in edit.nodes()] == [("Relu", ("x",), ("h",)),
                                                                         ("Neg", ("h",), ("y",))]
    edit.add_input("m", np.float32, ["N", 3, 4])
    edit.add_input("first", np.int64, ["N", None], first=True)
    assert edit.inputs == ["first", "x", "m"]
    edit.remove_inputs(["first"])
    b = edit.emitter("e_{n}")
    masked = b.add("Mul", ["h", "m"])
    neg = next(n.name for n in edit.model.graph.node if n.op_type == "Neg")
    edit.replace_input(neg, "h", masked)
    edit.extend(b)  # after Neg, which reads it: only a toposort makes the graph valid
    edit.add_output("h", np.float32)
    out = edit.finish(toposort=True)
    assert model.SerializeToString() == before
    assert [n.op_type for n in out.graph.node] == ["Relu", "Mul", "Neg"]
    assert [v.name for v in out.graph.input] == ["x", "m"] and [v.name for v in out.graph.output] == ["y", "h"]
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    m = np.random.default_rng(2).uniform(size=(2, 3, 4)).astype(np.float32)
    y, h = session(out).run(None, {"x": x, "m": m})
    np.testing.assert_array_equal(h, np.maximum(x, 0))
    np.testing.assert_array_equal(y, -(np.maximum(x, 0) * m))


def test_the_editor_sets_outputs_puts_nodes_first_and_reads_initializers():
    model = _model(13, "y = Add(x, w)", decl="float[N, 3] x, float[3] w")
    model.graph.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.float32), "w"))
    model.graph.input.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [3]))  # IR<4 style
    edit = ModelEditor(model)
    assert edit.inputs == ["x"]  # an initializer listed as input is not a real input
    np.testing.assert_array_equal(edit.constant("w"), np.arange(3, dtype=np.float32))
    assert edit.constant("x") is None
    b = edit.emitter("f_{n}")
    b.emit("Sub", ["x", b.const(np.float32(1))], ["x1"])
    edit.replace_input(edit.nodes()[0].name, "x", "x1")
    edit.extend(b, first=True)
    edit.set_outputs(["y", "x1"], np.float32)
    out = edit.finish()
    assert [n.op_type for n in out.graph.node] == ["Sub", "Add"]
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [onnx.TensorProto.FLOAT] * 2
    x = np.ones((2, 3), np.float32)
    y, x1 = session(out).run(None, {"x": x})
    np.testing.assert_array_equal(x1, np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(3, dtype=np.float32), (2, 3)))
