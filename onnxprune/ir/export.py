"""Between graphsurgeon graphs and ModelProtos: export, import, batch-dynamic copies, checks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxprune.errors import InternalError, UserError
from onnxprune.ir import runtime
from onnxprune.ir.held import active as held_active
from onnxprune.ir.held import header, held_array, held_tensors, holdable, is_held
from onnxprune.ir.held import hold as hold_array
from onnxprune.ir.runtime import lean_weights, weights_as_inputs
from onnxprune.ir.shapes import graph_inputs
from onnxprune.ir.validate import subgraphs

_MODEL_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def to_model(graph: gs.Graph, template: onnx.ModelProto, hold: bool = False,
             hold_large: bool = False) -> onnx.ModelProto:
    """Export ``graph`` with the template's opsets, functions and metadata (not its weights).
    With ``hold``, where the template holds weights (:mod:`onnxprune.ir.held`), the graph's big
    constants are held too, not copied into the protobuf: the model the rewrite exports is
    written out from the graph's own arrays. ``hold_large``: held inside any holding block,
    whatever the template (a caller that knows the model it makes is large)."""
    model = onnx.ModelProto()
    with _held_constants(graph, (hold and bool(held_tensors(template))) or (hold_large and held_active())):
        model.graph.CopyFrom(OnnxExporter.export_graph(graph, do_type_check=False))
    _hoist_shared_initializers(model.graph)
    for name in _MODEL_FIELDS:
        setattr(model, name, getattr(template, name))
    model.opset_import.extend(template.opset_import)
    model.metadata_props.extend(template.metadata_props)
    model.functions.extend(template.functions)
    model.ir_version = max(template.ir_version, 4)  # initializers no longer listed as inputs
    return model


def holds_large(graph: gs.Graph, arrays: list[np.ndarray] = (), copies: int = 1) -> bool:
    """Whether a model exported from ``graph`` with ``arrays`` as more constants is large
    enough for lean sessions (:func:`~onnxprune.ir.runtime.lean_weights`: its constants of
    ``LEAN_TENSOR_BYTES`` or more add up to ``LEAN_SESSION_BYTES``), inside an open holding
    block: where exporting it with ``hold_large`` shares its weights instead of copying them.
    ``copies``: how many times a model made from the export carries each of the graph's
    constants (a gradient model: the weights and their flipped kernels, 2). Sizes are read off
    shapes, so lazily loaded constants stay unloaded."""
    if not held_active():
        return False
    sizes = [math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in graph.tensors().values()
             if isinstance(t, gs.Constant)] * copies + [np.asarray(a).nbytes for a in arrays]
    return sum(n for n in sizes if n >= runtime.LEAN_TENSOR_BYTES) >= runtime.LEAN_SESSION_BYTES


@contextmanager
def _held_constants(graph: gs.Graph, hold: bool) -> Iterator[None]:
    """Within the block, the main graph's constants of ``LEAN_TENSOR_BYTES`` or more export as
    held tensors (graphsurgeon exports a lazily loaded constant's TensorProto as it is)."""
    swapped = []
    if hold:
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, LazyValues):
                continue
            values = tensor._values
            if values.nbytes < runtime.LEAN_TENSOR_BYTES or tensor.export_dtype != values.dtype:
                continue
            data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
            if not holdable(data_type):
                continue
            proto = onnx.TensorProto(name=tensor.name, data_type=data_type, dims=values.shape)
            if tensor.data_location is not None:
                proto.data_location = tensor.data_location
            hold_array(proto, np.ascontiguousarray(values))
            swapped.append((tensor, values))
            tensor._values = LazyValues(proto)
    try:
        yield
    finally:
        for tensor, values in swapped:
            tensor._values = values


def _hoist_shared_initializers(graph: onnx.GraphProto) -> dict[str, list[onnx.GraphProto]]:
    """graphsurgeon exports a constant that subgraphs read from an enclosing graph as each
    reader's own initializer (a copy per branch and per nesting level). Keep one copy, in the
    innermost graph enclosing every reader. Returns, per name, the subgraphs below ``graph``
    still holding it."""
    below: dict[str, list[onnx.GraphProto]] = {}
    children = [_hoist_shared_initializers(sub) | {t.name: [sub] for t in sub.initializer} for sub in subgraphs(graph.node)]
    owners: dict[str, int] = {}
    for found in children:
        for name, graphs in found.items():
            owners[name] = owners.get(name, 0) + 1
            below.setdefault(name, []).extend(graphs)
    own = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    for name, graphs in list(below.items()):
        if owners[name] < 2 and name not in own:
            continue
        for sub in dict.fromkeys(map(id, graphs)):
            holder = next(g for g in graphs if id(g) == sub)
            kept = [t for t in holder.initializer if t.name != name]
            if len(kept) != len(holder.initializer):
                if name not in own:
                    graph.initializer.append(next(t for t in holder.initializer if t.name == name))
                    own.add(name)
                del holder.initializer[:]
                holder.initializer.extend(kept)
        del below[name]
    return below


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model's graph as graphsurgeon sees it, or a UserError that says why not."""
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise UserError(f"cannot read the model's graph: {exc}") from None
    _restore_declared_shapes(graph, model)
    for tensor in graph.tensors().values():  # held weights: the constants take the arrays, no copy
        if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues) and is_held(tensor._values.tensor):
            was = header(tensor._values.tensor)  # what the tensor's data_location was before it was held
            tensor.data_location = was.data_location if was.HasField("data_location") else None
            tensor.values = held_array(tensor._values.tensor)
    return graph


def _restore_declared_shapes(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """A value_info entry that repeats a graph input or output without its shape (onnxruntime's
    older quantizer writes them) hides the declared shape from graphsurgeon; the export would then
    write an output without a shape, which the checker refuses. The declaration wins."""
    declared = {v.name: v.type.tensor_type for v in list(model.graph.input) + list(model.graph.output)}
    for tensor in list(graph.inputs) + list(graph.outputs):
        spec = declared.get(tensor.name)
        if tensor.shape is None and spec is not None and spec.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in spec.shape.dim]


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def make_batch_dynamic(model: onnx.ModelProto, batch: int = 1, reshapes: bool = True) -> None:
    """In place: a fixed batch of ``batch`` becomes symbolic (probes stack ablations on the
    batch axis, evaluation runs whole test sets), and with ``reshapes`` Reshape targets that
    hard-code a batch of 1 copy it instead."""
    for value in list(graph_inputs(model)) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = "N"
    del model.graph.value_info[:]
    if not reshapes:
        return
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]])
            if shape.size and shape[0] == 1:
                fixed = shape.copy()
                fixed[0] = 0 if -1 in shape[1:] else -1
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(fixed, node.input[1]))


def fix_input_dims(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """In place: each input named in ``shapes`` takes its dims after the first from there (the
    batch stays as declared), so that shape inference knows every spatial size of a model
    declared with symbolic height and width."""
    for value in graph_inputs(model):
        shape = shapes.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if shape is None or len(shape) != len(dims):
            continue
        for dim, size in list(zip(dims, shape))[1:]:
            if isinstance(size, int) and size > 0:
                dim.dim_value = size


def toposort_nodes(nodes: list[onnx.NodeProto], ready: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is ready before it is read (``ready`` holds the
    names available from the start: graph inputs, initializers)."""
    ready = set(ready) | {""}
    pending, ordered = list(nodes), []
    while pending:
        progressed = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                progressed.append(node)
        if len(progressed) == len(pending):
            raise RuntimeError("the nodes have a cycle")
        pending = progressed
    return ordered


def signature(model: onnx.ModelProto) -> list[tuple]:
    """Names, element types and static dimensions of the model's inputs and outputs."""
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
            for v in list(graph_inputs(model)) + list(model.graph.output)]


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on a pruned model: a failure is our bug. A large model's big weights are
    checked as typed inputs (numpy made them, from arrays of their shape): the checker would
    otherwise serialise the model, a copy of every weight, twice."""
    big = lean_weights(model)
    try:
        onnx.checker.check_model(weights_as_inputs(model, big) if big else model)
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the pruned model fails onnx.checker (a bug): {str(exc).splitlines()[0]}") from None
