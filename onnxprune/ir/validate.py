"""The input model, checked before any work: every way it can be malformed becomes a
:class:`UserError` that names the tensor or node at fault (exit code 2), so that an error
later in the pipeline can only be onnxprune's own bug.

:func:`check_structure` runs on load: IR version, tensors whose data disagrees with their
shape, names assigned twice, cycles, then onnx.checker (full where the model allows). It also
normalises what is valid but awkward: model-local functions are inlined, sparse initializers
made dense, duplicate node names made unique, nodes sorted when the file is not.
:func:`check_runs` then asks onnxruntime to load and run the model at the concrete shapes.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from onnxprune.errors import UserError, first_line
from onnxprune.ir.held import is_held
from onnxprune.ir.runtime import ORT_ERRORS, lean_weights, session, weights_as_inputs
from onnxprune.ir.shapes import Shape, concrete_input_shapes, graph_inputs, random_inputs

logger = logging.getLogger(__name__)

#: The oldest IR version the checker accepts (ONNX 1.0).
MIN_IR_VERSION = 3
#: Synthetic inputs larger than this are refused (they would not fit a probe batch anyway).
MAX_INPUT_BYTES = 2**31
_T = onnx.TensorProto
#: Where each element type keeps its values when not in raw_data, and values per element.
_FIELDS = {
    _T.FLOAT: ("float_data", 1), _T.DOUBLE: ("double_data", 1), _T.INT64: ("int64_data", 1),
    _T.UINT32: ("uint64_data", 1), _T.UINT64: ("uint64_data", 1), _T.COMPLEX64: ("float_data", 2),
    _T.COMPLEX128: ("double_data", 2), _T.STRING: ("string_data", 1),
}
_PACKED = {getattr(_T, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(_T, n)}


def all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph (If, Loop, Scan), also those inside functions."""
    pending = [model.graph]
    for function in model.functions:
        pending += subgraphs(function.node)
    while pending:
        graph = pending.pop()
        yield graph
        pending += subgraphs(graph.node)


def subgraphs(nodes) -> list[onnx.GraphProto]:
    """The graphs ``nodes`` hold as attributes (If branches, Loop and Scan bodies), one level."""
    found = []
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found.append(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                found.extend(attr.graphs)
    return found


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model holds: initializers (sparse ones' values and indices too) and
    tensor attributes, in the main graph, every subgraph and every function."""
    for graph in all_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from _attribute_tensors(graph.node)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def _attribute_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices


def _elements(tensor: onnx.TensorProto) -> int:
    negative = [d for d in tensor.dims if d < 0]
    if negative:
        raise UserError(f"tensor '{tensor.name}' has a negative dimension: shape {list(tensor.dims)}")
    return int(np.prod([int(d) for d in tensor.dims], dtype=object)) if tensor.dims else 1


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """How many raw bytes the tensor's shape and type need (None for strings and unknown types)."""
    elements = _elements(tensor)
    if tensor.data_type in _PACKED:
        return (elements + 1) // 2
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return None if tensor.data_type == _T.STRING else elements * itemsize


def check_tensor(tensor: onnx.TensorProto) -> None:
    """A tensor whose data disagrees with its shape or type is refused, by name."""
    if tensor.data_type == _T.UNDEFINED or tensor.data_type not in _T.DataType.values():
        raise UserError(f"tensor '{tensor.name}' has no valid element type (data_type {tensor.data_type})")
    elements = _elements(tensor)
    if is_held(tensor):  # its bytes were checked against its shape as they were read
        return
    if tensor.HasField("raw_data"):
        need, have = expected_bytes(tensor), len(tensor.raw_data)
        if need is not None and need != have:
            raise UserError(f"tensor '{tensor.name}' holds {have} bytes of data, its shape {list(tensor.dims)} "
                            f"and type {_T.DataType.Name(tensor.data_type)} need {need}")
        return
    field, per = _FIELDS.get(tensor.data_type, ("int32_data", 1))
    need = (elements + 1) // 2 if tensor.data_type in _PACKED else elements * per
    have = len(getattr(tensor, field))
    if need != have:
        raise UserError(f"tensor '{tensor.name}' holds {have} values, its shape {list(tensor.dims)} needs {need}")


def _check_ir_version(model: onnx.ModelProto, where: str) -> None:
    version = model.ir_version
    if version > onnx.IR_VERSION:
        raise UserError(f"{where}: IR version {version} is newer than this onnx package supports "
                        f"({onnx.IR_VERSION}); upgrade onnx, or is the file damaged?")
    if version < MIN_IR_VERSION:
        raise UserError(f"{where}: IR version {version} is not a valid ONNX IR version (ONNX 1.0 wrote 3)")


def densify_sparse_initializers(model: onnx.ModelProto) -> int:
    """Sparse initializers become dense ones (onnxruntime does the same); returns how many."""
    count = 0
    for graph in all_graphs(model):
        for sparse in list(graph.sparse_initializer):
            graph.initializer.append(_dense(sparse))
            count += 1
        del graph.sparse_initializer[:]
    return count


def _dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    name = sparse.values.name
    for tensor in (sparse.values, sparse.indices):
        check_tensor(tensor)
    dims = [int(d) for d in sparse.dims]
    if any(d < 0 for d in dims):
        raise UserError(f"sparse initializer '{name}' has a negative dimension: shape {dims}")
    values, indices = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices).astype(np.int64)
    size = int(np.prod(dims)) if dims else 1
    flat = indices if indices.ndim == 1 else (np.ravel_multi_index(indices.T, dims) if indices.size else indices[:, 0])
    if values.ndim != 1 or flat.shape != values.shape or (flat.size and (flat.min() < 0 or flat.max() >= size)):
        raise UserError(f"sparse initializer '{name}': its indices do not fit its values and shape {dims}")
    dense = np.zeros(size, values.dtype)
    dense[flat] = values
    return numpy_helper.from_array(dense.reshape(dims), name)


def _unique_node_names(graph: onnx.GraphProto) -> None:
    seen: set[str] = {n.name for n in graph.node}
    counts: dict[str, int] = {}
    for node in graph.node:
        if not node.name:
            continue
        counts[node.name] = counts.get(node.name, 0) + 1
        if counts[node.name] > 1:
            k = counts[node.name] - 1
            while f"{node.name}_{k}" in seen:
                k += 1
            node.name = f"{node.name}_{k}"
            seen.add(node.name)


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read (outer-scope values count as the node's inputs)."""
    reads = set()
    for graph in subgraphs([node]):
        for inner in graph.node:
            reads.update(inner.input)
            reads.update(_outer_reads(inner))
    return reads


def sort_graph(graph: onnx.GraphProto) -> bool:
    """Check that every name is assigned once and read after it exists; sort the nodes
    topologically (stable: a sorted file keeps its order). Returns whether it reordered."""
    nodes = list(graph.node)
    label = [n.name or f"#{k} ({n.op_type})" for k, n in enumerate(nodes)]
    producer: dict[str, int] = {}
    given = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for k, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in given:
                first = label[producer[name]] if name in producer else "a graph input or initializer"
                raise UserError(f"tensor '{name}' is assigned twice, by node '{first}' and by node '{label[k]}'; "
                                "an ONNX graph assigns each name once")
            producer[name] = k
    needs = [sorted({producer[i] for i in set(n.input) | _outer_reads(n) if i in producer} - {k})
             for k, n in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    for k, deps in enumerate(needs):
        for d in deps:
            users[d].append(k)
    waiting = [len(d) for d in needs]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        stuck = next(k for k in range(len(nodes)) if waiting[k])
        raise UserError(f"the graph has a cycle through node '{label[stuck]}' (it reads its own result, "
                        "directly or through other nodes)")
    if order == sorted(order) and order == list(range(len(nodes))):
        return False
    copies = [nodes[k].__deepcopy__() for k in order]
    del graph.node[:]
    graph.node.extend(copies)
    return True


def _check_reads(graph: onnx.GraphProto, outer: set[str]) -> None:
    """Every name a node reads exists (an input, an initializer, an earlier node, outer scope)."""
    known = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        for name in node.input:
            if name not in known:
                raise UserError(f"node '{node.name or node.op_type}' reads '{name}', which nothing produces")
        for sub in subgraphs([node]):
            _check_reads(sub, known)
        known.update(node.output)
    for out in graph.output:
        if out.name not in known:
            raise UserError(f"graph output '{out.name}' is not produced by any node")


def check_structure(model: onnx.ModelProto, where: str) -> None:
    """Refuse a malformed model with a UserError; normalise a valid but awkward one in place."""
    _check_ir_version(model, where)
    bad = next(_undecodable(model), None)
    if bad is not None:
        raise UserError(f"{where}: damaged: a text field holds bytes that are not UTF-8 ({bad[:40]!r}); "
                        "ONNX stores names and attributes as UTF-8")
    if model.functions:
        names = ", ".join(sorted({f.name for f in model.functions}))
        try:
            model.CopyFrom(onnx.inliner.inline_local_functions(model))
        except Exception as exc:
            raise UserError(f"{where}: cannot inline its model-local functions ({names}): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        logger.info("inlined model-local functions: %s", names)
    if densify_sparse_initializers(model):
        logger.info("sparse initializers made dense")
    for tensor in all_tensors(model):
        check_tensor(tensor)
    for graph in all_graphs(model):
        _unique_node_names(graph)
    if sort_graph(model.graph):
        logger.info("nodes were not in topological order: sorted")
    _check_reads(model.graph, set())
    _checker(model, where)


def _undecodable(message) -> Iterator[bytes]:
    """Every string field of ``message`` (and of the messages in it) that protobuf could not
    decode as UTF-8: it hands those back as bytes, and the first tool to set one as a name
    fails. Bytes fields (weights' data) are never read, so no weight is copied."""
    for desc in message.DESCRIPTOR.fields:
        if desc.type not in (desc.TYPE_STRING, desc.TYPE_MESSAGE):
            continue
        repeated = desc.label == desc.LABEL_REPEATED if hasattr(desc, "label") else desc.is_repeated
        if not repeated and not message.HasField(desc.name):
            continue
        value = getattr(message, desc.name)
        for item in value if repeated else [value]:
            if desc.type == desc.TYPE_MESSAGE:
                yield from _undecodable(item)
            elif isinstance(item, bytes):
                yield item


def _checker(model: onnx.ModelProto, where: str) -> None:
    """onnx.checker, with full shape inference unless the model uses ops of other domains
    (whose schemas onnx does not know); large weights are checked as typed inputs (their
    data was checked against their shapes already), so the check costs no copy of them."""
    big = lean_weights(model)
    subject = weights_as_inputs(model, big) if big else model  # weights are checked by check_tensor
    full = all(o.domain in ("", "ai.onnx") for o in model.opset_import) and subject.ByteSize() < 2**31 - 2**20
    try:
        onnx.checker.check_model(subject, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UserError(f"{where}: onnx.checker refuses it: {first_line(exc)}") from None
    except ValueError as exc:  # a model too large for one protobuf, or an unknown type
        raise UserError(f"{where}: onnx.checker cannot check it: {first_line(exc)}") from None


def check_runs(model: onnx.ModelProto, overrides: dict[str, Shape]) -> dict[str, Shape]:
    """onnxruntime loads the model and runs it once at the concrete input shapes (``--input-shape``
    over the model's own); a failure is the input's problem (UserError). Returns the shapes."""
    _check_overrides(model, overrides)
    for value in graph_inputs(model):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if 0 in dims and value.name not in overrides:
            raise UserError(f"input '{value.name}' has a dimension fixed at 0 (shape {dims}): the model takes no data")
    shapes = concrete_input_shapes(model, overrides)
    for value in graph_inputs(model):
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type) \
            if value.type.tensor_type.elem_type else None
        if dtype is None:
            raise UserError(f"input '{value.name}' is not a tensor with a known element type")
        size = int(np.prod(shapes[value.name], dtype=object)) * np.dtype(dtype).itemsize
        if size > MAX_INPUT_BYTES:
            raise UserError(f"input '{value.name}' at shape {list(shapes[value.name])} takes {size / 2**30:.3g} GiB; "
                            f"give a smaller one with --input-shape {value.name}:...")
    try:
        sess = session(model)
    except ORT_ERRORS as exc:
        raise UserError(f"onnxruntime cannot load the input model: {first_line(exc)}") from None
    feeds = random_inputs(model, shapes, np.random.default_rng(0))
    try:
        sess.run(None, feeds)
    except ORT_ERRORS as exc:
        shown = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in shapes.items())
        raise UserError(f"onnxruntime cannot run the input model at {shown}: {first_line(exc)}") from None
    return shapes


def _check_overrides(model: onnx.ModelProto, overrides: dict[str, Shape]) -> None:
    for value in graph_inputs(model):
        if value.name not in overrides or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        given = overrides[value.name]
        if len(dims) != len(given):
            raise UserError(f"--input-shape {value.name}: gives {len(given)} dimensions, the input has {len(dims)}")
        for k, (d, g) in enumerate(zip(dims, given)):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != g:
                raise UserError(f"--input-shape {value.name}: dimension {k} is {g}, the model fixes it at "
                                f"{d.dim_value}")


def runs_on(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str | None:
    """None when onnxruntime loads ``model`` and runs it on ``feeds``, else why not (one line)."""
    try:
        sess = session(model)
        sess.run(None, feeds)
    except ORT_ERRORS as exc:
        return first_line(exc)
    return None
