"""The nine "light" models that ship inside the onnx wheel, with random weights materialised.

Their weights are ConstantOfShape nodes (zeros); a pruning test needs real-looking values, so
each weight becomes a seeded random initializer scaled like a trained one (He-normal filters,
BatchNorm variances positive).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
                "squeezenet", "vgg19", "zfnet512"]


def materialise(name: str, seed: int = 0) -> onnx.ModelProto:
    model = onnx.load(str(LIGHT_DIR / f"light_{name}.onnx"))
    rng = np.random.default_rng(seed)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    users = {}
    for node in model.graph.node:
        for slot, name_in in enumerate(node.input):
            users.setdefault(name_in, (node.op_type, slot))
    keep = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in consts:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in consts[node.input[0]])
        op, slot = users.get(node.output[0], ("", 0))
        if op == "BatchNormalization" and slot == 4:
            value = rng.uniform(0.5, 1.5, shape)
        elif op == "BatchNormalization" and slot == 1:
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            value = rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[1:]))
        else:
            value = 0.1 * rng.standard_normal(shape)
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model
