"""Small recurrent and control-flow models built in code (onnx.helper), seeded.

``recurrent`` builds ``x -> MatMul -> Relu -> LSTM/GRU/RNN -> (merge directions) -> MatMul``,
the forms real exporters write: layouts 0 and 1, forward/reverse/bidirectional, with or
without bias, sequence lengths and initial states (constant, graph inputs, or zeros made at
run time by ConstantOfShape from the batch size, as PyTorch exports "no state given").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.rules.recurrent import GATES

SEQ, BATCH, FEATURES, CHANNELS, HIDDEN, OUT = 5, 2, 3, 6, 8, 4


@dataclass(frozen=True)
class Form:
    op: str = "LSTM"
    direction: str = "forward"
    layout: int = 0
    bias: bool = True
    seq_lens: bool = False
    initial: str = "none"  # none | const | zeros | input
    state_output: bool = False  # Y_h (and Y_c) are graph outputs too
    peephole: bool = False
    linear_before_reset: int = 0

    @property
    def dirs(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    def __str__(self) -> str:
        parts = [self.op, self.direction, f"layout{self.layout}"]
        parts += [k for k in ("bias", "seq_lens", "state_output", "peephole") if getattr(self, k)]
        parts += [f"init_{self.initial}"] if self.initial != "none" else []
        parts += ["lbr"] if self.linear_before_reset else []
        return "-".join(parts)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def recurrent(form: Form, seed: int = 0, hidden: int = HIDDEN, batch: int | str = BATCH) -> onnx.ModelProto:
    """``batch`` a name: the batch dimension is dynamic (analyse with an input shape)."""
    rng = np.random.default_rng(seed)
    gates, dirs = GATES[form.op], form.dirs
    x_shape = [SEQ, batch, FEATURES] if form.layout == 0 else [batch, SEQ, FEATURES]
    state_shape = [dirs, BATCH, hidden] if form.layout == 0 else [BATCH, dirs, hidden]
    inits = [_init("w0", rng.standard_normal((FEATURES, CHANNELS)) / np.sqrt(FEATURES)),
             _init("W", rng.standard_normal((dirs, gates * hidden, CHANNELS)) / np.sqrt(CHANNELS)),
             _init("R", rng.standard_normal((dirs, gates * hidden, hidden)) / np.sqrt(hidden)),
             _init("w1", rng.standard_normal((dirs * hidden, OUT)) / np.sqrt(dirs * hidden))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    y_shape = [SEQ, batch, OUT] if form.layout == 0 else [batch, SEQ, OUT]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="proj"),
             helper.make_node("Relu", ["a"], ["a_relu"], name="relu")]
    rnn_inputs = ["a_relu", "W", "R", "", "", "", "", ""]
    if form.bias:
        inits.append(_init("B", 0.1 * rng.standard_normal((dirs, 2 * gates * hidden))))
        rnn_inputs[3] = "B"
    if form.seq_lens:
        inits.append(numpy_helper.from_array(np.array([SEQ, SEQ - 2][:BATCH], np.int32), "seq_lens"))
        rnn_inputs[4] = "seq_lens"
    states = ["h0", "c0"] if form.op == "LSTM" else ["h0"]
    for k, name in enumerate(states):
        if form.initial == "const":
            inits.append(_init(name, 0.5 * rng.standard_normal(state_shape)))
        elif form.initial == "input":
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, state_shape))
        elif form.initial == "zeros":
            nodes += _zeros_like_pytorch(name, form, dirs, hidden, inits)
        if form.initial != "none":
            rnn_inputs[5 + k] = name
    if form.peephole:
        inits.append(_init("P", 0.1 * rng.standard_normal((dirs, 3 * hidden))))
        rnn_inputs[7] = "P"
    while rnn_inputs and not rnn_inputs[-1]:
        rnn_inputs.pop()
    rnn_outputs = ["Y", "Y_h", "Y_c"] if form.op == "LSTM" else ["Y", "Y_h"]
    attrs = {"hidden_size": hidden, "direction": form.direction, "layout": form.layout}
    if form.op == "GRU":
        attrs["linear_before_reset"] = form.linear_before_reset
    nodes.append(helper.make_node(form.op, rnn_inputs, rnn_outputs, name="rnn", **attrs))
    # Y: [seq, dirs, batch, H] (layout 0) or [batch, seq, dirs, H] -> features dirs*H
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merge_shape"))
    if form.layout == 0:
        nodes.append(helper.make_node("Transpose", ["Y"], ["Y_t"], name="dirs_last", perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", ["Y_t", "merge_shape"], ["feat"], name="merge_dirs"))
    else:
        nodes.append(helper.make_node("Reshape", ["Y", "merge_shape"], ["feat"], name="merge_dirs"))
    nodes.append(helper.make_node("MatMul", ["feat", "w1"], ["y"], name="head"))
    if form.state_output:
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in rnn_outputs[1:]]
    graph = helper.make_graph(nodes, f"recurrent_{form}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _zeros_like_pytorch(name: str, form: Form, dirs: int, hidden: int, inits: list) -> list[onnx.NodeProto]:
    """``ConstantOfShape([dirs, batch, H])`` with the batch read off x at run time."""
    batch_axis = 1 if form.layout == 0 else 0
    inits += [numpy_helper.from_array(np.array([batch_axis], np.int64), f"{name}_batch_axis"),
              numpy_helper.from_array(np.array([dirs], np.int64), f"{name}_dirs"),
              numpy_helper.from_array(np.array([hidden], np.int64), f"{name}_hidden")]
    parts = [f"{name}_dirs", f"{name}_batch", f"{name}_hidden"] if form.layout == 0 else \
        [f"{name}_batch", f"{name}_dirs", f"{name}_hidden"]
    return [helper.make_node("Shape", ["x"], [f"{name}_xshape"], name=f"{name}_shape"),
            helper.make_node("Gather", [f"{name}_xshape", f"{name}_batch_axis"], [f"{name}_batch"],
                             name=f"{name}_gather", axis=0),
            helper.make_node("Concat", parts, [f"{name}_dims"], name=f"{name}_concat", axis=0),
            helper.make_node("ConstantOfShape", [f"{name}_dims"], [name], name=f"{name}_zeros",
                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))]


def hidden_group(dep):
    """The group of the recurrent node's hidden units."""
    return next(g for g in dep.groups if ("Y", 3) in g.spaces or ("Y_h", 2) in g.spaces)


def feature_group(dep):
    """The group of the recurrent node's input features (the projection's channels)."""
    return next(g for g in dep.groups if ("a_relu", 2) in g.spaces)


# -- control flow ------------------------------------------------------------------------------
def _conv(name: str, x: str, cin: int, cout: int, rng, inits: list | None) -> list[onnx.NodeProto]:
    """Conv (3x3, same padding) -> Relu writing ``name``; weights as initializers, or as Constant
    nodes (what exporters put inside branches) when ``inits`` is None."""
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
    b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    nodes = []
    if inits is None:
        nodes += [helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(w, f"{name}_w")),
                  helper.make_node("Constant", [], [f"{name}_b"], value=numpy_helper.from_array(b, f"{name}_b"))]
    else:
        inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
    nodes += [helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_pre"], name=f"{name}_conv", pads=[1] * 4),
              helper.make_node("Relu", [f"{name}_pre"], [name], name=f"{name}_relu")]
    return nodes


def if_model(seed: int = 0, batch: int | str = 1) -> onnx.ModelProto:
    """``x -> conv a -> If(mode == 1, then: conv t(a), else: conv e(a)) -> conv y``: both branches
    read ``a`` from the outer graph, and the If's output is either branch's."""
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes = _conv("a", "x", 3, 8, rng, inits)
    branches = {}
    for tag in ("t", "e"):
        body = _conv(tag, "a", 8, 6, rng, None)
        out = helper.make_tensor_value_info(tag, TensorProto.FLOAT, None)
        branches[tag] = helper.make_graph(body, f"branch_{tag}", [], [out])
    inits.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    nodes += [helper.make_node("Equal", ["mode", "one"], ["cond"], name="is_one"),
              helper.make_node("If", ["cond"], ["b"], name="choose", then_branch=branches["t"], else_branch=branches["e"])]
    nodes += _conv("y", "b", 6, 4, rng, inits)
    graph = helper.make_graph(nodes, "if_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8]),
                               helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """``x -> conv c -> Loop(3 times: acc += a, from c) -> conv z -> conv y`` with ``a = conv(x)``:
    the Loop's body reads ``a`` from outside and carries ``acc``; only ``z`` is clear of it."""
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes = _conv("a", "x", 3, 8, rng, inits) + _conv("c", "x", 3, 8, rng, inits)
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "a"], ["acc_out"], name="accumulate"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)])
    inits += [numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")]
    nodes += [helper.make_node("Loop", ["trips", "go", "c"], ["summed"], name="repeat", body=body)]
    nodes += _conv("z", "summed", 8, 6, rng, inits) + _conv("y", "z", 6, 4, rng, inits)
    graph = helper.make_graph(nodes, "loop_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def if_recurrent_model(seed: int = 0) -> onnx.ModelProto:
    """``x -> MatMul a -> If(mode == 1, then: LSTM(a) -> Y_h, else: GRU(a) -> Y_h) -> Squeeze ->
    MatMul y``: each branch returns its cell's last state directly (nothing in the branch reads
    it), so the two cells' hidden units are one group through the If."""
    rng = np.random.default_rng(seed)
    inits = [_init("w0", rng.standard_normal((FEATURES, CHANNELS)) / np.sqrt(FEATURES)),
             _init("w1", rng.standard_normal((HIDDEN, OUT)) / np.sqrt(HIDDEN)),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    branches = {}
    for tag, op in (("t", "LSTM"), ("e", "GRU")):
        gates = GATES[op]
        weights = {"W": rng.standard_normal((1, gates * HIDDEN, CHANNELS)) / np.sqrt(CHANNELS),
                   "R": rng.standard_normal((1, gates * HIDDEN, HIDDEN)) / np.sqrt(HIDDEN),
                   "B": 0.1 * rng.standard_normal((1, 2 * gates * HIDDEN))}
        body = [helper.make_node("Constant", [], [f"{k}_{tag}"], value=_init(f"{k}_{tag}", v)) for k, v in weights.items()]
        body.append(helper.make_node(op, ["a", f"W_{tag}", f"R_{tag}", f"B_{tag}"], ["", f"h_{tag}"],
                                     name=f"cell_{tag}", hidden_size=HIDDEN))
        out = helper.make_tensor_value_info(f"h_{tag}", TensorProto.FLOAT, None)
        branches[tag] = helper.make_graph(body, f"branch_{tag}", [], [out])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="proj"),
             helper.make_node("Equal", ["mode", "one"], ["cond"], name="is_one"),
             helper.make_node("If", ["cond"], ["h"], name="choose", then_branch=branches["t"], else_branch=branches["e"]),
             helper.make_node("Squeeze", ["h", "axis0"], ["h2"], name="drop_dirs"),
             helper.make_node("MatMul", ["h2", "w1"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "if_recurrent",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, FEATURES]),
                               helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
