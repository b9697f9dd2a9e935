"""The nine light models shipped in the onnx wheel all prune at 0.4 into valid, smaller models."""

import numpy as np
import pytest
from light_models import LIGHT_MODELS, materialise

from onnxprune import prune
from onnxprune.ir import graph_inputs, random_inputs, session


def _signature(model):
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(graph_inputs(model)) + list(model.graph.output)]


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_prunes_to_a_valid_smaller_model(name):
    model = materialise(name)
    pruned, report = prune(model, 0.4, check=1, method="magnitude")
    assert report.after.params < report.before.params
    assert report.after.macs < report.before.macs
    assert report.groups_pruned >= 1
    assert _signature(pruned) == _signature(model)
    feeds = random_inputs(model, report.input_shapes, np.random.default_rng(0))
    (out,) = session(pruned).run(None, feeds)
    assert out.shape == session(model).run(None, feeds)[0].shape and np.isfinite(out).all()


def test_resnet50_prunes_its_residual_spine():
    pruned, report = prune(materialise("resnet50"), 0.4, check=1, method="magnitude")
    shapes = {i.name: list(i.dims) for i in pruned.graph.initializer}
    # The stage-4 spine (2048 channels at the last bottleneck's output) shrinks, not only the 3x3s.
    assert shapes["gpu_0/pred_w_0"][1] == round(2048 * 0.6)
