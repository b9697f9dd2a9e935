"""The protobuf boundary: everything that reads, writes, exports or runs a ModelProto.

The rest of onnxprune works on graphsurgeon graphs and numpy arrays and reaches onnx and
onnxruntime only through the names exported here (``make lint`` enforces it).
"""

from __future__ import annotations

import onnx

from onnxprune.ir.emit import ModelEditor, NodeEmitter, NodeView
from onnxprune.ir.export import (
    check_model,
    copy_model,
    fix_input_dims,
    holds_large,
    import_graph,
    make_batch_dynamic,
    signature,
    to_model,
    toposort_nodes,
)
from onnxprune.ir.held import holding
from onnxprune.ir.inputs import sample_axes, stack_samples
from onnxprune.ir.io import keep_ir_version, load_model, load_model_info, save_model
from onnxprune.ir.opsets import AVAILABLE_SINCE, PARAMS_AS_INPUTS_SINCE, Opset
from onnxprune.ir.reference import evaluate_node, np_dtype, template_for
from onnxprune.ir.runtime import SHRINK_ARENA, Session, hold_lean, release_memory, session
from onnxprune.ir.shapes import (
    InputSpec,
    Shape,
    concrete_input_shapes,
    control_values,
    graph_inputs,
    input_dtypes,
    input_specs,
    output_names,
    parse_input_shapes,
    random_inputs,
    resolve_shapes,
    sample_bytes,
    skeleton,
)
from onnxprune.ir.slicing import Cut, Slicer
from onnxprune.ir.stats import MAC_OPS, ModelStats, count_macs, model_stats, node_macs
from onnxprune.ir.timing import OpChain, interleaved_medians
from onnxprune.ir.validate import check_runs, check_structure, runs_on

#: A model as onnx holds it; modules outside ``ir`` name the type through this alias.
Model = onnx.ModelProto

__all__ = [
    "AVAILABLE_SINCE", "MAC_OPS", "PARAMS_AS_INPUTS_SINCE", "SHRINK_ARENA", "Cut", "InputSpec", "Model", "ModelEditor",
    "ModelStats", "NodeEmitter",
    "NodeView", "OpChain", "Opset", "Session", "Shape", "Slicer", "check_model", "check_runs", "check_structure",
    "concrete_input_shapes", "control_values", "copy_model", "count_macs", "evaluate_node", "fix_input_dims", "graph_inputs",
    "hold_lean", "holding", "holds_large",
    "import_graph", "input_dtypes", "interleaved_medians", "input_specs", "keep_ir_version", "load_model",
    "load_model_info",
    "make_batch_dynamic", "model_stats", "node_macs", "np_dtype", "output_names", "parse_input_shapes",
    "random_inputs", "release_memory", "resolve_shapes", "runs_on", "sample_bytes", "sample_axes", "save_model", "session",
    "signature", "skeleton",
    "stack_samples", "template_for", "to_model", "toposort_nodes",
]
