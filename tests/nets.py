"""Small test networks written as onnx.parser text, with seeded random weights.

Every graph input except the declared real inputs becomes an initializer: filters are
He-scaled, names ending in ``var`` get positive values, ``scale`` values near 1.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.parser
from onnx import helper, numpy_helper

from onnxprune.ir import toposort_nodes

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'


def from_text(text: str, inputs: tuple[str, ...] = ("x",), seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER.format(opset=opset) + text)
    rng = np.random.default_rng(seed)
    keep = []
    for value in model.graph.input:
        if value.name in inputs:
            keep.append(value)
            continue
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if value.name.endswith("var"):
            data = rng.uniform(0.5, 1.5, shape)
        elif value.name.endswith("scale"):
            data = 1 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            data = rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[1:]))
        else:
            data = 0.1 * rng.standard_normal(shape)
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(data, dtype=dtype), value.name))
    del model.graph.input[:]
    model.graph.input.extend(keep)
    toposort_graph(model.graph)
    onnx.checker.check_model(model, full_check=True)
    return model


def toposort_graph(g: onnx.GraphProto) -> None:
    """Put producers first, in place: text is easier to write block by block, and a test that
    splices nodes into a graph appends them; the checker wants producers first."""
    ordered = toposort_nodes(list(g.node), {i.name for i in g.input} | {t.name for t in g.initializer})
    del g.node[:]
    g.node.extend(ordered)




def conv_bn(name: str, x: str, cin: int, cout: int, k: int = 3, group: int = 1, relu: bool = True) -> tuple[str, str]:
    """(declarations, body) of Conv -> BatchNorm (-> Relu) writing tensor ``name``."""
    pad = k // 2
    decl = (f"float[{cout},{cin // group},{k},{k}] {name}_w, float[{cout}] {name}_scale, float[{cout}] {name}_b, "
            f"float[{cout}] {name}_mean, float[{cout}] {name}_var")
    out = f"{name}_bn"
    body = (f"  {name}_c = Conv<pads=[{pad},{pad},{pad},{pad}], group={group}>({x}, {name}_w)\n"
            f"  {out} = BatchNormalization({name}_c, {name}_scale, {name}_b, {name}_mean, {name}_var)\n")
    if relu:
        body += f"  {name} = Relu({out})\n"
    return decl, body


def graph(signature: str, blocks: list[tuple[str, str]], tail: str, extra_decl: str = "") -> str:
    decls = ", ".join([d for d, _ in blocks] + ([extra_decl] if extra_decl else []))
    body = "".join(b for _, b in blocks) + tail
    inputs, outputs = signature.split("=>")
    return f"net ({inputs.strip()[1:-1]}, {decls}) => {outputs.strip()} {{\n{body}}}"


def resnet() -> onnx.ModelProto:
    """Stem, two residual blocks (one with a projection shortcut), pool, Gemm head."""
    blocks = [conv_bn("s", "x", 3, 8), conv_bn("a1", "s", 8, 8), conv_bn("a2", "a1", 8, 8, relu=False),
              conv_bn("b1", "r1", 8, 16), conv_bn("b2", "b1", 16, 16, relu=False),
              conv_bn("p", "r1", 8, 16, k=1, relu=False)]
    tail = ("  r1s = Add(a2_bn, s)\n  r1 = Relu(r1s)\n  r2s = Add(b2_bn, p_bn)\n  r2 = Relu(r2s)\n"
            "  g = GlobalAveragePool(r2)\n  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n")
    return from_text(graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail, "float[10,16] fc_w, float[10] fc_b"))


def concat_net() -> onnx.ModelProto:
    """Two branches concatenated (DenseNet/Inception style), then a consumer conv."""
    blocks = [conv_bn("a", "x", 3, 6), conv_bn("b", "x", 3, 4, k=1), conv_bn("c", "a", 6, 5),
              conv_bn("d", "cat", 15, 8)]
    tail = ("  cat = Concat<axis=1>(a, b, c)\n  g = GlobalAveragePool(d)\n  f = Flatten(g)\n"
            "  y = Gemm<transB=1>(f, fc_w, fc_b)\n")
    return from_text(graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail, "float[10,8] fc_w, float[10] fc_b"))


def mobile_net() -> onnx.ModelProto:
    """Inverted residual: expand, depthwise, squeeze-excitation, hard-swish, project, residual."""
    blocks = [conv_bn("s", "x", 3, 8), conv_bn("e", "s", 8, 16, k=1, relu=False),
              conv_bn("dw", "eh", 16, 16, group=16, relu=False), conv_bn("pr", "se", 16, 8, k=1, relu=False)]
    tail = ("  eh = HardSwish(e_bn)\n  dwh = HardSwish(dw_bn)\n  sq = GlobalAveragePool(dwh)\n"
            "  z1 = Conv(sq, se1_w, se1_b)\n  z1r = Relu(z1)\n  z2 = Conv(z1r, se2_w, se2_b)\n"
            "  gate = HardSigmoid<alpha=0.1666667, beta=0.5>(z2)\n  se = Mul(dwh, gate)\n"
            "  res = Add(pr_bn, s)\n  g = GlobalAveragePool(res)\n  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n")
    extra = "float[4,16,1,1] se1_w, float[4] se1_b, float[16,4,1,1] se2_w, float[16] se2_b, float[10,8] fc_w, float[10] fc_b"
    return from_text(graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail, extra))


def resnext(opset: int = 17) -> onnx.ModelProto:
    """Two 3x3 convolutions in 8 groups, each after a dense 1x1 (ResNeXt-style bottlenecks)."""
    blocks = [conv_bn("s", "x", 3, 16), conv_bn("a", "s", 16, 32, k=1), conv_bn("g", "a", 32, 32, group=8),
              conv_bn("b", "g", 32, 32, k=1), conv_bn("h", "b", 32, 32, group=8)]
    tail = "  p = GlobalAveragePool(h)\n  f = Flatten(p)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n"
    return from_text(graph("(float[1,3,8,8] x) => (float[1,10] y)", blocks, tail, "float[10,32] fc_w, float[10] fc_b"),
                     opset=opset)


def vgg_flatten() -> onnx.ModelProto:
    """Conv features flattened from a 4x4 map into a Gemm (a channel is a block of 16 features)."""
    blocks = [conv_bn("c1", "x", 3, 8), conv_bn("c2", "m", 8, 12)]
    tail = ("  m = MaxPool<kernel_shape=[2,2], strides=[2,2]>(c1)\n  m2 = MaxPool<kernel_shape=[2,2], strides=[2,2]>(c2)\n"
            "  f = Flatten(m2)\n  h = Gemm<transB=1>(f, fc1_w, fc1_b)\n  hr = Relu(h)\n  y = Gemm<transB=1>(hr, fc2_w, fc2_b)\n")
    extra = "float[20,192] fc1_w, float[20] fc1_b, float[10,20] fc2_w, float[10] fc2_b"
    return from_text(graph("(float[1,3,16,16] x) => (float[1,10] y)", blocks, tail, extra))


def mlp() -> onnx.ModelProto:
    """64-32-32-10 with MatMul+Add (TorchScript style) and Gemm layers, dynamic batch."""
    text = ("net (float[N,64] x, float[64,32] w1, float[32] b1, float[32,32] w2, float[32] b2, float[10,32] w3, "
            "float[10] b3) => (float[N,10] y) {\n  h1 = MatMul(x, w1)\n  h1b = Add(h1, b1)\n  a1 = Relu(h1b)\n"
            "  h2 = Gemm(a1, w2, b2)\n  a2 = Relu(h2)\n  y = Gemm<transB=1>(a2, w3, b3)\n}")
    return from_text(text)


ALL = {"resnet": resnet, "concat": concat_net, "mobile": mobile_net, "vgg_flatten": vgg_flatten, "mlp": mlp}
