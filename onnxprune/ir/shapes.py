"""Concrete shapes for analysis.

The dependency graph needs the size of every channel axis. Shapes are resolved at concrete
input shapes (``--input-shape``; a lone dynamic batch dimension defaults to 1) by onnx shape
inference, and whatever inference leaves symbolic is read from one onnxruntime run with the
missing tensors added as outputs. The model that is written keeps its dynamic dimensions:
these shapes serve analysis only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxprune.errors import UserError
from onnxprune.ir.runtime import session, without_initializers

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
#: Marks the inputs of a :func:`skeleton` that stand for weights.
_WEIGHT_INPUT = "onnxprune:weight"


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: IR<4 models also list their initializers as inputs."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference (with data propagation) over a weightless view of ``model``: its
    large float initializers become typed inputs (inference reads their dims, never their
    bytes, and serialising them for it cost four copies of a 100 MB model), its small and
    integer ones (shape tensors) stay constants, and the view is IR 4 with only its real
    inputs. An IR 3 model lists every initializer as an input, where inference would take it
    for data and leave a Reshape to a stored shape unshaped; an initializer missing from an
    IR 3 model's inputs would leave its consumers unshaped (onnxruntime runs both)."""
    big = [t for t in model.graph.initializer if math.prod(t.dims) > _SKELETON_MAX and t.data_type
           and np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).kind == "f"]
    view = without_initializers(model, {t.name for t in big})
    view.ir_version = max(model.ir_version, 4)
    inits = {t.name for t in model.graph.initializer}
    del view.graph.input[:]
    view.graph.input.extend(i for i in model.graph.input if i.name not in inits)
    view.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big)
    return onnx.shape_inference.infer_shapes(view, data_prop=True)


@dataclass(frozen=True)
class InputSpec:
    """A real graph input: its name, dimensions (None where not fixed; None for all when the
    model declares no shape) and element type."""

    name: str
    dims: tuple[int | None, ...] | None
    dtype: np.dtype


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for v in graph_inputs(model):
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        specs.append(InputSpec(v.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """Each real graph input's element type, in input order."""
    return {spec.name: spec.dtype for spec in input_specs(model)}


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def concrete_input_shapes(model: onnx.ModelProto, overrides: dict[str, Shape]) -> dict[str, Shape]:
    """Every graph input's concrete shape, or a UserError that says which dimension is missing."""
    names = {i.name for i in graph_inputs(model)}
    unknown = set(overrides) - names
    if unknown:
        raise UserError(f"--input-shape names unknown input(s) {sorted(unknown)}; inputs are {sorted(names)}")
    shapes: dict[str, Shape] = {}
    for value in graph_inputs(model):
        if value.name in overrides:
            shapes[value.name] = tuple(overrides[value.name])
            continue
        dims = _dims(value)
        if not value.type.tensor_type.HasField("shape"):
            raise UserError(f"input '{value.name}' has no shape; give one with --input-shape {value.name}:...")
        dynamic = [k for k, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
        if dynamic == [0] or not dynamic:
            shapes[value.name] = tuple(1 if k in dynamic else int(d) for k, d in enumerate(dims))
            continue
        shown = ",".join(str(d) for d in dims)
        hint = ",".join(("1" if k == 0 else "N") if k in dynamic else str(d) for k, d in enumerate(dims))
        raise UserError(f"input '{value.name}' has dynamic dimensions [{shown}]; give a concrete shape with "
                        f"--input-shape {value.name}:{hint}")
    return shapes


def parse_input_shapes(specs: list[str] | None) -> dict[str, Shape]:
    """Parse ``NAME:1,3,224,224`` specs (the onnx-simplifier convention)."""
    shapes: dict[str, Shape] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise UserError(f"--input-shape '{spec}': expected NAME:D1,D2,... with positive integers") from None
        shapes[name] = shape
    return shapes


def graph_inputs_of(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [i for i in graph_inputs(model) if i.doc_string != _WEIGHT_INPUT]


def _scalar_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The main graph's one-element constants (reading every initializer would copy every
    weight, and a held one has no bytes to read)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if math.prod(t.dims) == 1}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            if math.prod(node.attribute[0].t.dims) == 1:
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def control_values(model: onnx.ModelProto) -> dict[str, int]:
    """Integer scalar inputs the model compares with a constant (``Equal(sr, 16000)`` choosing
    an If branch), and the first value each is compared with."""
    scalars = {s.name for s in input_specs(model)
               if s.dtype.kind in "iu" and s.dims is not None and int(np.prod([d or 0 for d in s.dims])) <= 1}
    constants, found = _scalar_constants(model), {}
    for node in model.graph.node:
        if node.op_type != "Equal":
            continue
        for here, there in ((0, 1), (1, 0)):
            name = node.input[here]
            if name in scalars and name not in found and node.input[there] in constants:
                value = np.asarray(constants[node.input[there]]).ravel()
                if value.size == 1:
                    found[name] = int(value[0])
    return found


def random_inputs(model: onnx.ModelProto, shapes: dict[str, Shape], rng: np.random.Generator,
                  batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded synthetic inputs: standard normal floats, small non-negative integers (a scalar
    the model compares with a constant, such as a sample rate, gets that constant)."""
    feeds = {}
    controls = control_values(model)
    for value in graph_inputs_of(model):
        shape = list(shapes[value.name])
        if batch is not None and shape:
            shape[0] = batch
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if value.name in controls:
            feeds[value.name] = np.full(shape, controls[value.name], dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


_SKELETON_MAX = 4096


def skeleton(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its large constants turned into typed inputs: shapes without the weight
    bytes, so that inferring them costs the same for a 500 MB model as for a 5 MB one."""
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    inits = []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        small = not isinstance(tensor._values, LazyValues) and tensor.values.size <= _SKELETON_MAX
        if small or np.dtype(tensor.dtype).kind in "iub":  # shape-like tensors: inference reads them
            inits.append(OnnxExporter.export_tensor_proto(tensor))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
            value = helper.make_tensor_value_info(tensor.name, dtype, list(tensor.shape))
            value.doc_string = _WEIGHT_INPUT
            inputs.append(value)
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    model = helper.make_model(helper.make_graph(nodes, graph.name or "skeleton", inputs, outputs, inits),
                              opset_imports=template.opset_import)
    model.ir_version = max(template.ir_version, 4)
    return model


def resolve_shapes(model: onnx.ModelProto, input_shapes: dict[str, Shape],
                   wanted: set[str] | None = None) -> dict[str, Shape]:
    """Concrete shapes of the model's tensors at the given input shapes.

    ``model`` may be a :func:`skeleton`. ``wanted`` limits the onnxruntime fallback to the
    tensors the caller needs (by default every tensor some node or graph output reads).
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[value.name]:
                dims.add().dim_value = d
    del fixed.graph.value_info[:]
    try:
        inferred = infer_shapes(fixed)
    except Exception as exc:  # inference is best effort; onnxruntime is the ground truth
        logger.debug("shape inference failed: %s", exc)
        inferred = fixed
    shapes: dict[str, Shape] = {}
    values = _branch_values(fixed)  # If branches' tensors: inference only, no run
    for value in values + list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = _dims(value)
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape") \
                and all(isinstance(d, int) for d in dims):
            shapes[value.name] = tuple(int(d) for d in dims)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    produced = {o for n in model.graph.node for o in n.output if o}
    if wanted is None:
        wanted = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    missing = sorted((wanted & produced) - shapes.keys())
    if missing:
        shapes.update(_run_for_shapes(fixed, input_shapes, missing, model))
    return shapes


def _inline_branches(graph: onnx.GraphProto, nodes: list, inits: list) -> None:
    """Every node of ``graph`` into ``nodes``, with each If replaced by both branches' nodes and
    Identities from its then-branch outputs: one flat graph in which inference types the
    branches' tensors (it does not type them inside subgraphs)."""
    for node in graph.node:
        branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        if node.op_type != "If" or set(branches) != {"then_branch", "else_branch"}:
            nodes.append(node)
            continue
        for branch in (branches["then_branch"], branches["else_branch"]):
            inits.extend(branch.initializer)
            _inline_branches(branch, nodes, inits)
        for k, out in enumerate(node.output):
            if out:
                nodes.append(helper.make_node("Identity", [branches["then_branch"].output[k].name], [out]))


def _branch_values(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inferred types of the tensors inside If branches (empty when there are none, or when
    inference fails on the flattened graph)."""
    if not any(n.op_type == "If" for n in model.graph.node):
        return []
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    nodes, inits = [], []
    _inline_branches(model.graph, nodes, inits)
    del flat.graph.node[:]
    flat.graph.node.extend(nodes)
    flat.graph.initializer.extend(inits)
    try:
        inferred = infer_shapes(flat)
    except Exception as exc:
        logger.debug("shape inference of the flattened branches failed: %s", exc)
        return []
    typed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    return typed + list(inferred.graph.value_info)


def _run_for_shapes(model: onnx.ModelProto, input_shapes: dict[str, Shape], names: list[str],
                    declared: onnx.ModelProto | None = None) -> dict[str, Shape]:
    """Shapes of ``names`` from one onnxruntime run of ``model`` (inputs fixed at
    ``input_shapes``), or of ``declared`` (the model with its own, dynamic, input dimensions)
    when onnxruntime cannot load the fixed one: fixing a dimension the model leaves open can
    make a branch that this input never takes fail its type checks (an If with one branch per
    sample rate)."""
    logger.debug("reading %d shapes from an onnxruntime run", len(names))
    sess, error = None, None
    for candidate in (model, declared) if declared is not None else (model,):
        probe = onnx.ModelProto()
        probe.CopyFrom(candidate)
        present = {o.name for o in probe.graph.output}
        for name in names:
            if name not in present:
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))
        try:
            sess = session(probe)
            break
        except Exception as exc:
            error = error or exc
    if sess is None:
        raise UserError(f"onnxruntime cannot load the model: {str(error).splitlines()[0]}") from None
    feeds = random_inputs(model, input_shapes, np.random.default_rng(0))
    for value in model.graph.input:
        if value.doc_string == _WEIGHT_INPUT:  # a skeleton's weight: any values give the shapes
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            feeds[value.name] = np.zeros(dims, helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    wanted = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(wanted, feeds)
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run the model at {input_shapes}: {str(exc).splitlines()[0]}") from None
    return {n: tuple(np.shape(v)) for n, v in zip(wanted, values) if n in set(names)}


def sample_bytes(shapes: dict[str, tuple], names) -> int:
    """Bytes one sample of the tensors ``names`` holds, in float32: ``shapes`` batch first,
    unknown or symbolic shapes counting nothing."""
    total = 0
    for name in names:
        shape = shapes.get(name)
        if shape and all(isinstance(d, int) for d in shape):
            total += 4 * int(np.prod(shape[1:], dtype=np.int64))
    return total
