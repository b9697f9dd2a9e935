"""Interval propagation of a deviation box is sound: every deviation inside the box moves the
output by an amount inside the propagated intervals (checked against onnxruntime)."""

import nets
import numpy as np
import onnx
from onnx import helper

from onnxprune.intervals import DeviationIntervals, width_and_entropy
from onnxprune.ir import session
from onnxprune.pipeline import analyse


def _with_deviation(model: onnx.ModelProto, tensor: str, shape) -> onnx.ModelProto:
    """``model`` whose consumers of ``tensor`` read ``tensor + delta`` (delta a new input)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = f"{tensor}_dev"
    m.graph.input.append(helper.make_tensor_value_info("delta", onnx.TensorProto.FLOAT, list(shape)))
    m.graph.node.insert(0, helper.make_node("Add", [tensor, "delta"], [f"{tensor}_dev"]))
    nets.toposort_graph(m.graph)
    return m


def _check(model, tensor, box_shape, input_shape):
    analysis = analyse(model)
    hi = np.zeros(box_shape)
    hi[:, 1] = 0.5  # channel 1 deviates by up to 0.5 everywhere
    engine = DeviationIntervals(analysis.graph, model.graph.output[0].name, analysis.shapes)
    lo_out, hi_out = engine.propagate({tensor: (-hi, hi)})
    width, entropy = width_and_entropy(lo_out, hi_out)
    assert width[0] > 0 and entropy[0] > 0
    deviated = session(_with_deviation(model, tensor, box_shape))
    base = session(model)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.standard_normal(input_shape).astype(np.float32)
        delta = (rng.uniform(-1, 1, box_shape) * hi).astype(np.float32)
        change = deviated.run(None, {"x": x, "delta": delta})[0] - base.run(None, {"x": x})[0]
        assert np.all(change >= lo_out - 1e-5) and np.all(change <= hi_out + 1e-5)


def test_mlp_interval_bounds_hold():
    model = nets.mlp()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    _check(model, "a1", (1, 32), (1, 64))


def test_conv_residual_interval_bounds_hold():
    _check(nets.resnet(), "r1", (1, 8, 8, 8), (1, 3, 8, 8))
