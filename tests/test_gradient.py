"""The gradient graph: closed form on a linear model, and every backward rule against
central finite differences on a tiny model built in code (no torch anywhere)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.evaluate import finite_difference_gradient
from onnxprune.gradient import GRADIENT_RULES, GradientUnsupported, input_gradient_model
from onnxprune.gradient.emitter import Emitter
from onnxprune.gradient.static import StaticInfo
from onnxprune.ir import Opset

F = TensorProto.FLOAT
N_CLASSES = 3


def _ir(opset: int) -> int:
    """Oldest IR version for the opset: onnxruntime may reject the newest."""
    for min_opset, ir in ((21, 10), (19, 9), (15, 8), (12, 7), (11, 6), (10, 5)):
        if opset >= min_opset:
            return ir
    return 4


def make_model(nodes, x_shape, inits=None, opset=17, out="z", out_shape=None) -> onnx.ModelProto:
    tensors = []
    for name, value in (inits or {}).items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        tensors.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", F, x_shape)],
                              [helper.make_tensor_value_info(out, F, out_shape)], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=_ir(opset))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def classifier(nodes, body_out, x, inits=None, opset=17, x_shape=None, seed=0) -> onnx.ModelProto:
    """Body nodes, then Flatten + MatMul to N_CLASSES logits (width found by running the body)."""
    x_shape = x_shape or ["N"] + list(x.shape[1:])
    body = make_model(nodes, x_shape, inits, opset, out=body_out)
    width = int(np.prod(session(body).run(None, {"x": x})[0].shape[1:]))
    rng = np.random.default_rng(seed + 100)
    head = [helper.make_node("Flatten", [body_out], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "Whead"], ["z"])]
    inits = dict(inits or {}, Whead=rng.standard_normal((width, N_CLASSES)) / np.sqrt(width))
    return make_model(list(nodes) + head, x_shape, inits, opset)


def graph_gradient(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray):
    gm = input_gradient_model(model)
    onnx.checker.check_model(gm)
    loss, grad = session(gm).run(["loss", "input_grad"], {"x": x, "labels": y})
    return loss, grad


def reference_loss(model, x, y, probs=False):
    out = session(model).run(None, {"x": x})[0].reshape(len(x), -1).astype(np.float64)
    if probs:
        return -np.log(out[np.arange(len(x)), y])
    z = out - out.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(x)), y]


def assert_matches_fd(model, x, y=None, h=1e-2, tol=2e-3):
    y = np.arange(len(x)) % N_CLASSES if y is None else y
    loss, grad = graph_gradient(model, x, y)
    assert grad.shape == x.shape
    np.testing.assert_allclose(loss, reference_loss(model, x, y), rtol=1e-4, atol=1e-5)
    fd = finite_difference_gradient(session(model), x, y, h)
    scale = np.abs(fd).max()
    assert scale > 1e-4, "degenerate test: zero gradient"
    err = np.abs(grad - fd).max() / scale
    assert err < tol, f"graph vs finite-difference gradient: relative error {err:.2e}"


def rand(*shape, seed=0, lo=-1.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs if isinstance(outs, list) else [outs], **attrs)


# ------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("ends_in_softmax", [False, True])
def test_linear_softmax_closed_form(ends_in_softmax):
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((4, 6)), rng.standard_normal(4)
    nodes = [node("Gemm", ["x", "W", "B"], "z" if not ends_in_softmax else "logits", transB=1)]
    if ends_in_softmax:
        nodes.append(node("Softmax", ["logits"], "z", axis=1))
    model = make_model(nodes, ["N", 6], {"W": w, "B": b}, opset=13)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1])
    loss, grad = graph_gradient(model, x, y)
    z = x.astype(np.float64) @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(grad, (p - np.eye(4)[y]) @ w, atol=1e-5)
    np.testing.assert_allclose(loss, -np.log(p[np.arange(5), y]), atol=1e-5)


# ----------------------------------------------------------------------- one case per rule
def _conv(x_shape, w_shape, opset=17, **attrs):
    x = rand(2, *x_shape)
    w = rand(*w_shape, seed=1) * 0.5
    inits = {"W": w, "B": rand(w_shape[0], seed=2)}
    return classifier([node("Conv", ["x", "W", "B"], "c", **attrs)], "c", x, inits, opset), x


CASES = {
    "conv_groups_stride_pads": lambda: _conv((4, 7, 7), (6, 2, 3, 3), group=2, strides=[2, 2], pads=[1, 0, 2, 1]),
    "conv_same_upper": lambda: _conv((2, 8, 8), (3, 2, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv_dilation": lambda: _conv((2, 8, 8), (3, 2, 3, 2), strides=[1, 2], dilations=[2, 3], pads=[2, 1, 0, 1]),
    "conv_same_lower": lambda: _conv((2, 7, 7), (3, 2, 2, 2), auto_pad="SAME_LOWER", strides=[2, 2]),
    "conv_stride1_groups_dilation": lambda: _conv((4, 6, 6), (6, 2, 3, 3), group=2, dilations=[2, 1],
                                                  pads=[2, 1, 1, 0]),
    "conv_stride1_pads_beyond_kernel": lambda: _conv((2, 5, 5), (3, 2, 2, 2), pads=[3, 0, 0, 2]),
    "conv_depthwise_1d": lambda: _conv((3, 9), (3, 1, 3), group=3, strides=[2]),
    # strided grouped convs take the spread-gradient Conv: dilated, unequal strides, a crop
    "conv_depthwise_stride_dilation": lambda: _conv((4, 9, 8), (4, 1, 3, 2), group=4, strides=[2, 3],
                                                    dilations=[2, 1], pads=[2, 0, 1, 1]),
    "conv_depthwise_stride_crop": lambda: _conv((3, 7, 8), (3, 1, 1, 2), group=3, strides=[3, 3]),
    "conv_depthwise_stride_opset11": lambda: _conv((4, 8, 8), (4, 1, 3, 3), opset=11, group=4, strides=[2, 2],
                                                   pads=[1, 1, 1, 1]),
    "conv_depthwise_stride_opset12": lambda: _conv((4, 8, 8), (4, 1, 3, 3), opset=12, group=4, strides=[2, 2],
                                                   pads=[1, 1, 1, 1]),
    "conv_groups_stride_past_kernel_pad": lambda: _conv((4, 6, 6), (4, 2, 2, 2), group=2, strides=[2, 2],
                                                        pads=[2, 2, 0, 0]),
    "conv_opset9": lambda: _conv((2, 6, 6), (3, 2, 3, 3), opset=9, strides=[2, 2], pads=[1, 1, 1, 1]),
}


def _case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


@_case("conv_dynamic_spatial")
def _():
    x = rand(2, 2, 7, 7)
    inits = {"W": rand(3, 2, 3, 3, seed=1), "Wh": rand(3, N_CLASSES, seed=3)}
    nodes = [node("Conv", ["x", "W"], "c", strides=[2, 2], pads=[1, 1, 0, 0]),
             node("GlobalAveragePool", ["c"], "g"), node("Flatten", ["g"], "f"), node("MatMul", ["f", "Wh"], "z")]
    return make_model(nodes, ["N", 2, "H", "W"], inits), x


@_case("conv_transpose")
def _():
    x = rand(2, 3, 4, 4)
    nodes = [node("ConvTranspose", ["x", "W"], "c", strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])]
    return classifier(nodes, "c", x, {"W": rand(3, 2, 3, 3, seed=1)}), x


def separated(*shape, seed=0, spacing=0.05):
    """Distinct values at least ``spacing`` apart: no max-pool near-ties or kinks for the
    finite differences to straddle."""
    n = int(np.prod(shape))
    values = (np.arange(n) - n / 2) * spacing
    return np.random.default_rng(seed).permutation(values).reshape(shape).astype(np.float32)


def _pool(op, opset=17, x_shape=(2, 7, 7), **attrs):
    x = separated(2, *x_shape)
    return classifier([node(op, ["x"], "p", **attrs)], "p", x, opset=opset), x


CASES.update({
    "maxpool_overlapping_scatter": lambda: _pool("MaxPool", 17, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "maxpool_overlapping_onehot": lambda: _pool("MaxPool", 13, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "maxpool_ceil_dilation": lambda: _pool("MaxPool", 12, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                                           dilations=[1, 2]),
    "maxpool_opset9": lambda: _pool("MaxPool", 9, kernel_shape=[3, 3], strides=[2, 2]),
    "maxpool_same_upper_unpool": lambda: _pool("MaxPool", 17, kernel_shape=[2, 2], strides=[2, 2],
                                               auto_pad="SAME_UPPER"),
    "maxpool_ceil_pads_unpool": lambda: _pool("MaxPool", 11, kernel_shape=[2, 3], strides=[2, 3], ceil_mode=1,
                                              pads=[1, 0, 0, 1]),
    "maxpool_1d_unpool_opset9": lambda: _pool("MaxPool", 9, x_shape=(3, 9), kernel_shape=[3], strides=[3]),
    "avgpool_exclude_pad": lambda: _pool("AveragePool", 17, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "avgpool_include_pad_ceil": lambda: _pool("AveragePool", 17, kernel_shape=[3, 3], strides=[2, 2],
                                              pads=[1, 0, 1, 0], count_include_pad=1, ceil_mode=1),
    "avgpool_opset9": lambda: _pool("AveragePool", 9, kernel_shape=[2, 2], strides=[2, 2]),
    "global_avgpool": lambda: _pool("GlobalAveragePool"),
    "lrn": lambda: _pool("LRN", 13, x_shape=(5, 3, 3), size=3, alpha=0.5, beta=0.75, bias=1.0),
    "lrn_opset9": lambda: _pool("LRN", 9, x_shape=(6, 3, 3), size=5, alpha=0.5, beta=0.6, bias=2.0),
})


@_case("opset21_convnet")
def _():
    x = separated(2, 2, 6, 6)
    inits = {"W": rand(4, 2, 3, 3, seed=1), "s": rand(4, seed=2, lo=0.5, hi=2), "b": rand(4, seed=3),
             "m": rand(4, seed=4), "v": rand(4, seed=5, lo=0.5, hi=2)}
    nodes = [node("Conv", ["x", "W"], "c", pads=[1, 1, 1, 1]), node("BatchNormalization", ["c", "s", "b", "m", "v"], "bn"),
             node("Relu", ["bn"], "r"), node("MaxPool", ["r"], "p", kernel_shape=[3, 3], strides=[2, 2])]
    return classifier(nodes, "p", x, inits, opset=21), x


@_case("conv_batchnorm_relu")
def _():
    x = rand(2, 2, 5, 5)
    inits = {"W": rand(4, 2, 3, 3, seed=1), "s": rand(4, seed=2, lo=0.5, hi=2), "b": rand(4, seed=3),
             "m": rand(4, seed=4), "v": rand(4, seed=5, lo=0.5, hi=2)}
    nodes = [node("Conv", ["x", "W"], "c"), node("BatchNormalization", ["c", "s", "b", "m", "v"], "bn"),
             node("Relu", ["bn"], "r")]
    return classifier(nodes, "r", x, inits, opset=9), x


@_case("layernorm")
def _():
    x = rand(3, 4, 5)
    inits = {"s": rand(4, 5, seed=2, lo=0.5, hi=2), "b": rand(4, 5, seed=3)}
    return classifier([node("LayerNormalization", ["x", "s", "b"], "l", axis=1)], "l", x, inits), x


@_case("instancenorm")
def _():
    x = rand(2, 3, 4, 4)
    inits = {"s": rand(3, seed=2, lo=0.5, hi=2), "b": rand(3, seed=3)}
    return classifier([node("InstanceNormalization", ["x", "s", "b"], "l")], "l", x, inits), x


@_case("decomposed_layernorm_opset13")  # what the TorchScript exporter emits before opset 17
def _():
    x = rand(3, 2, 6)
    nodes = [node("ReduceMean", ["x"], "mu", axes=[-1]), node("Sub", ["x", "mu"], "xc"),
             node("Pow", ["xc", "two"], "sq"), node("ReduceMean", ["sq"], "var", axes=[-1]),
             node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "sd"), node("Div", ["xc", "sd"], "xn"),
             node("Mul", ["xn", "gamma"], "xs"), node("Add", ["xs", "beta"], "ln")]
    inits = {"two": np.array(2.0), "eps": np.array(1e-5), "gamma": rand(6, seed=2), "beta": rand(6, seed=3)}
    return classifier(nodes, "ln", x, inits, opset=13), x


for _approx in ("none", "tanh"):
    CASES[f"gelu_{_approx}"] = (lambda a: lambda: (lambda x: (classifier(
        [node("Gelu", ["x"], "g", approximate=a)], "g", x, opset=20), x))(rand(3, 6) * 2))(_approx)


def _unary(op, opset=17, lo=-2.0, hi=2.0, **attrs):
    x = rand(3, 8, lo=lo, hi=hi)
    x[np.abs(np.abs(x) - 3) < 0.05] += 0.1  # keep clear of HardSwish's kinks
    return classifier([node(op, ["x"], "u", **attrs)], "u", x, opset=opset), x


CASES.update({
    "relu": lambda: _unary("Relu"),
    "leaky_relu": lambda: _unary("LeakyRelu", alpha=0.2),
    "sigmoid": lambda: _unary("Sigmoid"),
    "tanh": lambda: _unary("Tanh"),
    "hard_sigmoid": lambda: _unary("HardSigmoid", alpha=0.3, beta=0.4),
    "hard_swish": lambda: _unary("HardSwish", lo=-4, hi=4),  # no sample within 0.05 of the kinks at +-3
    "erf": lambda: _unary("Erf"),
    "elu": lambda: _unary("Elu", alpha=0.7),
    "selu": lambda: _unary("Selu"),
    "softplus": lambda: _unary("Softplus"),
    "exp": lambda: _unary("Exp"),
    "log": lambda: _unary("Log", lo=0.5, hi=2),
    "sqrt": lambda: _unary("Sqrt", lo=0.5, hi=2),
    "reciprocal": lambda: _unary("Reciprocal", lo=0.5, hi=2),
    "abs_neg": lambda: _unary("Abs"),
    "neg": lambda: _unary("Neg"),
    "clip_opset9_attrs": lambda: _unary("Clip", opset=9, min=-0.5, max=0.7),
    "identity": lambda: _unary("Identity"),
    "dropout_inference": lambda: _unary("Dropout", opset=13),
    "softmax_opset11_coerced": lambda: (lambda x: (classifier([node("Softmax", ["x"], "s", axis=1)], "s", x, opset=11),
                                                   x))(rand(3, 2, 4) * 3),
    "softmax_mid_graph": lambda: _unary("Softmax", axis=-1),
    "log_softmax_mid_graph": lambda: _unary("LogSoftmax", opset=13, axis=1),
})


@_case("clip_inputs")
def _():
    x = rand(3, 8, lo=-2, hi=2)
    return classifier([node("Clip", ["x", "lo", "hi"], "c")], "c", x, {"lo": np.array(-0.5), "hi": np.array(0.8)}), x


@_case("prelu")
def _():
    x = rand(3, 4, 5)
    return classifier([node("PRelu", ["x", "slope"], "p")], "p", x, {"slope": rand(4, 1, seed=3)}), x


@_case("pow_constant_exponent")
def _():
    x = rand(3, 6, lo=0.5, hi=1.5)
    nodes = [node("Pow", ["x", "e"], "p"), node("Pow", ["x", "ei"], "q"), node("Add", ["p", "q"], "s")]
    return classifier(nodes, "s", x, {"e": np.array(1.5), "ei": np.array(3, np.int64)}, opset=15), x


@_case("arith_broadcast")
def _():
    x = rand(3, 1, 3, 4)
    inits = {"a": rand(3, 1, seed=1), "m": rand(4, seed=2), "s": np.array(0.3), "one": np.array(1.0),
             "big": rand(2, 3, 1, seed=4)}
    nodes = [node("Add", ["x", "a"], "t1"), node("Mul", ["t1", "m"], "t2"), node("Sub", ["s", "t2"], "t3"),
             node("Mul", ["x", "x"], "sq"), node("Add", ["sq", "one"], "den"), node("Div", ["t3", "den"], "t4"),
             node("Sub", ["t4", "x"], "t5"), node("Div", ["t5", "m"], "t6"),
             node("Mul", ["big", "t6"], "t7")]  # output broader than x: reduce over axis 1 too
    return classifier(nodes, "t7", x, inits, opset=13), x


@_case("arith_broadcast_opset9")
def _():
    x = rand(3, 3, 4)
    inits = {"a": rand(3, 1, seed=1), "m": rand(1, 4, seed=2, lo=0.5, hi=1.5)}
    nodes = [node("Add", ["x", "a"], "t1"), node("Mul", ["t1", "x"], "t2"), node("Div", ["t2", "m"], "t3"),
             node("Sum", ["t3", "x", "a"], "t4"), node("Mean", ["t4", "x"], "t5")]
    return classifier(nodes, "t5", x, inits, opset=9), x


@_case("max_min_where")
def _():
    x = rand(3, 6)
    inits = {"c": rand(6, seed=1), "mask": np.array([True, False, True, True, False, False])}
    nodes = [node("Max", ["x", "c"], "mx"), node("Min", ["mx", "x2"], "mn"), node("Mul", ["x", "x"], "x2"),
             node("Where", ["mask", "mn", "x"], "w")]
    nodes = [nodes[2], nodes[0], nodes[1], nodes[3]]
    return classifier(nodes, "w", x, inits, opset=13), x


@_case("matmul_batched_broadcast")
def _():
    x = rand(2, 1, 3, 4)
    inits = {"W": rand(5, 4, 2, seed=1), "v": rand(2, seed=2), "u": rand(3, seed=3)}
    nodes = [node("MatMul", ["x", "W"], "a"),  # [N,5,3,2] (x broadcast over 5)
             node("Transpose", ["x"], "xt", perm=[0, 1, 3, 2]), node("MatMul", ["x", "xt"], "b"),  # both sides active
             node("MatMul", ["a", "v"], "c"),  # [N,5,3] (1-D right operand)
             node("MatMul", ["u", "b"], "d"),  # [N,1,3] (1-D left operand)
             node("Concat", ["c", "d"], "e", axis=1)]
    return classifier(nodes, "e", x, inits), x


@_case("gemm_transposes")
def _():
    x = rand(4, 5)
    inits = {"W": rand(3, 5, seed=1), "C": rand(1, 3, seed=2), "W1": rand(5, 3, seed=3), "W2": rand(3, 5, seed=4)}
    nodes = [node("Gemm", ["x", "W", "C"], "g1", transB=1, alpha=0.7, beta=0.5),
             node("Transpose", ["x"], "xt"),
             node("Gemm", ["xt", "W1"], "g2", transA=1),  # the input as a transposed A
             node("Gemm", ["W2", "x"], "g3", transB=1), node("Transpose", ["g3"], "g3t"),  # ... as a transposed B
             node("Gemm", ["W2", "xt"], "g4"), node("Transpose", ["g4"], "g4t"),  # ... as B
             node("Gemm", ["x", "W", "g1"], "g5", transB=1, beta=1.5),  # ... reaching C
             node("Sum", ["g1", "g2", "g3t", "g4t", "g5"], "z")]
    return make_model(nodes, ["N", 5], inits, opset=13), x


@_case("gemm_opset9_bias")
def _():
    x = rand(3, 5)
    return make_model([node("Gemm", ["x", "W", "C"], "z", transB=1)], ["N", 5],
                      {"W": rand(3, 5, seed=1), "C": rand(3, seed=2)}, opset=9), x


@_case("shape_subgraph_reshape")  # Shape/Gather/Concat/ConstantOfShape: no gradient, only shapes
def _():
    x = rand(3, 2, 6)
    inits = {"zero": np.array([0]), "minus1": np.array([-1]), "four": np.array([4])}
    nodes = [node("Shape", ["x"], "shp"), node("Gather", ["shp", "zero"], "n", axis=0),
             node("Concat", ["n", "four", "minus1"], "newshape", axis=0), node("Reshape", ["x", "newshape"], "r"),
             node("ConstantOfShape", ["newshape2"], "ones", value=numpy_helper.from_array(np.ones(1, np.float32))),
             node("Shape", ["r"], "newshape2"), node("Mul", ["r", "ones"], "rm"),
             node("Transpose", ["rm"], "t", perm=[0, 2, 1]), node("Unsqueeze", ["t", "ax"], "u"),
             node("Squeeze", ["u", "ax"], "s"), node("Flatten", ["s"], "f", axis=1)]
    nodes = nodes[:4] + [nodes[5], nodes[4]] + nodes[6:]
    return classifier(nodes, "f", x, {**inits, "ax": np.array([1])}, opset=13), x


@_case("concat_split_slice")
def _():
    x = rand(3, 4, 6)
    inits = {"st": np.array([1, -5]), "en": np.array([4, 100]), "ax": np.array([1, 2]),
             "st2": np.array([0]), "en2": np.array([6]), "ax2": np.array([2]), "sp2": np.array([2])}
    nodes = [node("Relu", ["x"], "r"), node("Concat", ["x", "r"], "c", axis=1),
             node("Split", ["c"], ["s0", "s1", "s2"], axis=2, split=[1, 2, 3]), node("Mul", ["s0", "s2"], "m"),
             node("Slice", ["x", "st", "en", "ax"], "sl"),
             node("Slice", ["x", "st2", "en2", "ax2", "sp2"], "sl2"),  # strided: scatter path
             node("Flatten", ["m"], "fm"), node("Flatten", ["sl"], "fs"), node("Flatten", ["sl2"], "fs2"),
             node("Concat", ["fm", "fs", "fs2"], "out", axis=1)]
    return classifier(nodes, "out", x, inits, opset=11), x


@_case("split_opset18_unused_output")
def _():
    x = rand(3, 6)
    nodes = [node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3), node("Mul", ["a", "c"], "m")]
    return classifier(nodes, "m", x, opset=18), x


@_case("slice_opset9_attrs")
def _():
    x = rand(3, 4, 6)
    nodes = [node("Slice", ["x"], "s", starts=[1, 0], ends=[3, -1], axes=[1, 2]),
             node("Unsqueeze", ["s"], "u", axes=[1]), node("Squeeze", ["u"], "q", axes=[1])]
    return classifier(nodes, "q", x, opset=9), x


@_case("pad_constant_with_crop")
def _():
    x = rand(3, 2, 5)
    inits = {"pads": np.array([0, 1, -1, 0, 0, 2])}
    return classifier([node("Pad", ["x", "pads"], "p", mode="constant")], "p", x, inits, opset=13), x


@_case("pad_opset9")
def _():
    x = rand(3, 2, 5)
    return classifier([node("Pad", ["x"], "p", pads=[0, 1, 1, 0, 0, 2], value=0.5)], "p", x, opset=9), x


@_case("pad_reflect_axes")
def _():
    x = rand(3, 2, 5)
    inits = {"pads": np.array([2, 1]), "axes": np.array([-1])}
    return classifier([node("Pad", ["x", "pads", "", "axes"], "p", mode="reflect")], "p", x, inits, opset=18), x


@_case("gather_data_path")
def _():
    x = rand(3, 4, 5)
    inits = {"i": np.array([0, 3, 3, -1]), "j": np.array(2)}
    nodes = [node("Gather", ["x", "i"], "a", axis=2), node("Gather", ["x", "j"], "b", axis=1),
             node("Flatten", ["a"], "fa"), node("Concat", ["fa", "b"], "c", axis=1)]
    return classifier(nodes, "c", x, inits, opset=16), x


@_case("expand_cast_identity")
def _():
    x = rand(3, 1, 4)
    nodes = [node("Expand", ["x", "shape"], "e"), node("Cast", ["e"], "d", to=TensorProto.DOUBLE),
             node("Cast", ["d"], "f", to=TensorProto.FLOAT), node("Identity", ["f"], "i")]
    return classifier(nodes, "i", x, {"shape": np.array([1, 3, 1])}, opset=13), x


@_case("reduce_ops")
def _():
    x = rand(3, 4, 5)
    nodes = [node("ReduceMean", ["x", "ax"], "m", keepdims=0), node("ReduceSum", ["x", "ax2"], "s"),
             node("Flatten", ["s"], "fs"), node("ReduceMean", ["x"], "all", keepdims=0),
             node("Unsqueeze", ["all", "z0"], "allu"), node("Mul", ["m", "allu"], "ma"),
             node("Concat", ["ma", "fs"], "c", axis=1)]
    inits = {"ax": np.array([-1]), "ax2": np.array([1]), "z0": np.array([0])}
    return classifier(nodes, "c", x, inits, opset=18), x


@_case("broadcast_gradients_read_unexpanded")  # the BatchNorm-matching term: x feeds a mean, x - mean, a Sigmoid
def _():
    x = rand(3, 4, 5, 5)
    nodes = [node("ReduceMean", ["x", "ax"], "m"), node("Sub", ["x", "m"], "c"), node("Mul", ["c", "c"], "sq"),
             node("ReduceMean", ["sq", "ax"], "v"), node("Sqrt", ["v"], "sd"), node("Sigmoid", ["x"], "r"),
             node("ReduceMean", ["r", "ax"], "rm"), node("Exp", ["rm"], "e"), node("Mul", ["r", "sd"], "rs"),
             node("Mul", ["x", "e"], "xe"), node("Add", ["rs", "xe"], "t")]
    # per-sample statistics: the finite-difference check perturbs each sample alone
    return classifier(nodes, "t", x, {"ax": np.array([2, 3])}, opset=18), x


def test_reduction_gradients_are_read_unexpanded():
    """Every ReduceMean's gradient above reaches consumers that broadcast anyway (Sum, Mul, a
    square, a unary rule): no Expand is left in the gradient graph."""
    model, _ = CASES["broadcast_gradients_read_unexpanded"]()
    assert not [n for n in input_gradient_model(model).graph.node if n.op_type == "Expand"]


@_case("symbolic_feature_dims")  # no static shapes: dynamic broadcast reduction, Split sizes, class count
def _():
    x = rand(3, 5)
    inits = {"st": np.array([0]), "en": np.array([1]), "ax": np.array([1])}
    nodes = [node("Slice", ["x", "st", "en", "ax"], "s"), node("Add", ["x", "s"], "a"),
             node("Concat", ["a", "s"], "z", axis=1)]
    return make_model(nodes, ["N", "D"], inits, opset=13), x


@_case("constant_node_weights")
def _():
    x = rand(3, 5)
    w = numpy_helper.from_array(rand(5, N_CLASSES, seed=7), "w")
    nodes = [node("Constant", [], "W", value=w), node("Constant", [], "b", value_float=0.25),
             node("MatMul", ["x", "W"], "mm"), node("Add", ["mm", "b"], "z")]
    return make_model(nodes, ["N", 5], opset=13), x


def _resize_case(opset, op="Resize", x_shape=(2, 3, 5), **attrs):
    """A conv, then ``op``; scales (or sizes) as its last constant input."""
    x = rand(2, *x_shape)
    sizes = attrs.pop("sizes", None)
    scales = attrs.pop("scales", None)
    ins, inits = ["c"], {"W": rand(3, x_shape[0], 3, 3, seed=1)}
    if op == "Upsample":
        ins, inits["sc"] = ins + ["sc"], np.asarray(scales, np.float32)
    elif opset == 10:
        ins, inits["sc"] = ins + ["sc"], np.asarray(scales, np.float32)
    elif sizes is not None:  # the batch is in the sizes: only runs at this batch
        ins, inits["sz"] = ins + ["", "", "sz"], np.asarray(sizes, np.int64)
    else:
        ins, inits["sc"] = ins + ["", "sc"], np.asarray(scales, np.float32)
    nodes = [node("Conv", ["x", "W"], "c", pads=[1, 1, 1, 1]), node(op, ins, "r", **attrs)]
    return classifier(nodes, "r", x, inits, opset), x


# nearest and linear, every coordinate transformation that maps output to input positions
_case("resize_nearest_half_pixel")(lambda: _resize_case(13, scales=[1, 1, 2, 2], mode="nearest"))
_case("resize_nearest_asymmetric_floor_x3")(lambda: _resize_case(
    13, scales=[1, 1, 3, 2], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
_case("resize_linear_pytorch_half_pixel")(lambda: _resize_case(
    13, scales=[1, 1, 2, 1.5], mode="linear", coordinate_transformation_mode="pytorch_half_pixel"))
_case("resize_opset10_nearest")(lambda: _resize_case(10, scales=[1, 1, 2, 2], mode="nearest"))
_case("upsample_opset9_linear")(lambda: _resize_case(9, op="Upsample", scales=[1, 1, 2, 2], mode="linear"))


@pytest.mark.parametrize("x_shape, sizes, attrs", [
    ((2, 3, 5), [2, 3, 7, 11], {"mode": "nearest", "nearest_mode": "ceil"}),
    ((2, 3, 5), [2, 3, 9, 10], {"mode": "linear"}),
    ((2, 6, 7), [2, 3, 4, 3], {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
])
def test_resize_to_sizes_matches_finite_differences(x_shape, sizes, attrs):
    """Sizes (the batch among them) instead of scales: the scale is output / input. The model
    runs at its one batch, so the differences are taken one element at a time."""
    model, x = _resize_case(13, x_shape=x_shape, sizes=sizes, **attrs)
    y = np.arange(len(x)) % N_CLASSES
    _, grad = graph_gradient(model, x, y)
    h = 1e-2
    fd = np.zeros(x.size)
    for i in range(x.size):
        step = np.zeros(x.size, np.float32)
        step[i] = h
        up, down = (reference_loss(model, (x.ravel() + d).reshape(x.shape), y).sum() for d in (step, -step))
        fd[i] = (up - down) / (2 * h)
    assert np.abs(grad.ravel() - fd).max() / np.abs(fd).max() < 2e-3


def test_resize_refuses_what_is_not_a_fixed_interpolation():
    model, _ = _resize_case(13, scales=[1, 1, 2, 2], mode="cubic")
    with pytest.raises(GradientUnsupported, match="mode 'cubic'"):
        input_gradient_model(model)


@_case("fixed_batch_one")
def _():
    x = rand(1, 2, 4, 4)
    nodes = [node("Conv", ["x", "W"], "c", pads=[1, 1, 1, 1]), node("MaxPool", ["c"], "p", kernel_shape=[2, 2], strides=[2, 2]),
             node("Reshape", ["p", "shape"], "r"), node("MatMul", ["r", "Wh"], "z")]
    inits = {"W": rand(3, 2, 3, 3, seed=1), "shape": np.array([1, 12]), "Wh": rand(12, N_CLASSES, seed=2)}
    return make_model(nodes, [1, 2, 4, 4], inits, opset=13), x


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_finite_differences(name):
    model, x = CASES[name]()
    assert_matches_fd(model, x)


def test_cases_cover_required_rules():
    used = set()
    for name in CASES:
        model, _ = CASES[name]()
        used |= {n.op_type for n in model.graph.node}
    required = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid", "Tanh",
                "HardSigmoid", "HardSwish", "Clip", "Erf", "Gelu", "Softmax", "LogSoftmax", "BatchNormalization",
                "LayerNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
                "Transpose", "Concat", "Split", "Slice", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Pow",
                "Sqrt", "ReduceMean", "Shape", "Gather", "ConstantOfShape", "Cast", "Pad"}
    assert required <= used
    assert required - {"Shape", "ConstantOfShape"} <= set(GRADIENT_RULES)


# --------------------------------------------------------------------- softmax-ended models
def test_softmax_ended_conv_model_uses_minus_log_prob():
    x = rand(3, 2, 6, 6)
    model = classifier([node("Conv", ["x", "W"], "c", strides=[2, 2]), node("Relu", ["c"], "r")], "r", x,
                       {"W": rand(4, 2, 3, 3, seed=1)})
    model.graph.node.append(node("Softmax", ["z"], "p", axis=-1))
    model.graph.output[0].name = "p"
    y = np.array([0, 1, 2])
    loss, grad = graph_gradient(model, x, y)
    np.testing.assert_allclose(loss, reference_loss(model, x, y, probs=True), rtol=1e-4)
    fd = finite_difference_gradient(session(model), x, y, 1e-2, output_kind="probs")
    assert np.abs(grad - fd).max() / np.abs(fd).max() < 2e-3


def test_gradient_model_keeps_inputs_and_adds_labels():
    model, x = CASES["conv_batchnorm_relu"]()
    gm = input_gradient_model(model)
    assert [i.name for i in gm.graph.input] == ["x", "labels"]
    assert [o.name for o in gm.graph.output] == ["loss", "input_grad"]
    assert gm.graph.input[1].type.tensor_type.elem_type == TensorProto.INT64
    assert gm.opset_import[0].version == 9  # emitted in the model's own opset
    assert len(model.graph.output) == 1 and model.graph.output[0].name == "z"  # input model untouched


# ----------------------------------------------------------------------------- unsupported
def test_op_without_rule_raises_gradient_unsupported():
    model = make_model([node("Sin", ["x"], "s"), node("MatMul", ["s", "W"], "z")], ["N", 4],
                       {"W": rand(4, N_CLASSES)}, opset=13)
    with pytest.raises(GradientUnsupported) as info:
        input_gradient_model(model)
    assert info.value.ops == ("Sin",)
    assert "Sin" in str(info.value)


def test_op_off_the_input_path_needs_no_rule():
    # Sin only transforms a weight: constants need no gradient rule.
    model = make_model([node("Sin", ["W"], "ws"), node("MatMul", ["x", "ws"], "z")], ["N", 4],
                       {"W": rand(4, N_CLASSES)}, opset=13)
    assert_matches_fd(model, rand(3, 4))


def test_removed_rule_is_reported(monkeypatch):
    monkeypatch.delitem(GRADIENT_RULES, "Relu")
    model, _ = CASES["relu"]()
    with pytest.raises(GradientUnsupported, match="Relu"):
        input_gradient_model(model)


def test_softmax_behind_reshapes_is_skipped_for_a_stable_loss():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, N_CLASSES)) * 20  # confident: p(label) underflows in float32
    nodes = [node("MatMul", ["x", "W"], "logits"), node("Unsqueeze", ["logits", "ax"], "u"),
             node("Softmax", ["u"], "p", axis=1), node("Flatten", ["p"], "f"), node("Identity", ["f"], "z")]
    model = make_model(nodes, ["N", 6], {"W": w, "ax": np.array([2])}, opset=13)
    x = rand(4, 6)
    z = x.astype(np.float64) @ w.astype(np.float32)
    y = z.argmin(1)  # the least likely class
    loss, grad = graph_gradient(model, x, y)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(loss, -logp[np.arange(4), y], rtol=1e-4)  # finite, unlike -log(p)
    np.testing.assert_allclose(grad, (np.exp(logp) - np.eye(N_CLASSES)[y]) @ w.astype(np.float32).T, rtol=1e-4,
                               atol=1e-4)


# ------------------------------------------------------------------------------- opset table
@pytest.mark.parametrize("opset", range(9, 22))
def test_helper_ops_take_parameters_as_the_opset_wants(opset):
    """The emitter's helper ops put axes/starts/pads in inputs or attributes as each opset's
    schema says: every node passes onnx's checker at that opset."""
    model = make_model([node("Relu", ["x"], "z")], ["N", 3, 4], opset=opset)
    b = Emitter(StaticInfo(model, Opset(opset)), {"x", "z"})
    b.reduce_sum("x", [1])
    b.reduce_mean("x", [1])
    b.squeeze(b.unsqueeze("x", [0]), [0])
    b.slice("x", [0], [1], [1])
    b.pad("x", [0, 1, 0, 0, 1, 0])
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version, ctx.opset_imports = _ir(opset), {"": opset}
    for n in b.nodes:
        onnx.checker.check_node(n, ctx)
    as_input = {n.op_type: len(n.input) > 1 for n in b.nodes}
    assert as_input == {"ReduceSum": opset >= 13, "ReduceMean": opset >= 18, "Unsqueeze": opset >= 13,
                        "Squeeze": opset >= 13, "Slice": opset >= 10, "Pad": opset >= 11}


def test_shape_probe_feeds_every_input_and_fills_only_the_gaps():
    """A model with a second float input beside its data (a probe model's masks) is run with
    both fed, at batches 2 and 3, and the gap comes back batch-symbolic."""
    from onnxprune.gradient.probe import _gaps, probe_shapes

    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "net (float[N,4] x, float[N,4] m) => (float[N,3] y) {\n"
        "  xm = Mul(x, m)\n  h = MatMul(xm, w)\n  y = Relu(h)\n}")
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 3), np.float32), "w"))
    static = StaticInfo(model, Opset(17))
    assert static.types["h"][1] == ["N", 3]
    static.types["h"] = (TensorProto.FLOAT, None)  # as if inference had not reached it
    assert _gaps(static) == ["h"]
    probe_shapes(static)
    assert static.types["h"][1] == ["N", 3] and not _gaps(static)
