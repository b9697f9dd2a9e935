"""onnxruntime sessions: the one place they are made (and where their time is counted)."""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxprune.ir import held
from onnxprune.ir.held import header, held_array, is_held
from onnxprune.profiling import stage

#: What onnxruntime raises about a model or its inputs (anything else is not its word).
ORT_ERRORS = (RuntimeError, ValueError, *(c for c in vars(ort.capi.onnxruntime_pybind11_state).values()
                                           if isinstance(c, type) and issubclass(c, Exception)))
#: An onnxruntime session; modules outside ``ir`` name the type through this alias.
Session = ort.InferenceSession
#: Models whose large initializers weigh more than this get lean sessions (see :func:`session`).
LEAN_SESSION_BYTES = 2**27
#: In a lean session, initializers from this size on are fed as inputs.
LEAN_TENSOR_BYTES = 2**20


class LeanSession:
    """A session over a model whose large weights are graph inputs fed on every run from arrays
    over the weights' bytes: onnxruntime reads them in place, so the session holds no copy of
    its own, and making it serialises only the model's skeleton. Behaves like the session
    for ``run``, ``get_inputs`` (the real inputs only) and everything else.

    It runs without onnxruntime's memory arena: a large model's activations go back to the
    system after each run instead of staying with the session (resnet50 at 224x224: the
    inversion's reverse pass over 4 inputs held 0.6 GB more in the arena), so there is no
    arena to shrink either (:data:`SHRINK_ARENA` is dropped)."""

    def __init__(self, sess: ort.InferenceSession, weights: dict[str, np.ndarray]):
        self._sess, self._weights = sess, weights

    def run(self, output_names, input_feed, run_options=None):
        options = None if run_options is SHRINK_ARENA else run_options
        return self._sess.run(output_names, {**input_feed, **self._weights}, options)

    def get_inputs(self):
        return [i for i in self._sess.get_inputs() if i.name not in self._weights]

    def __getattr__(self, name):
        return getattr(self._sess, name)


class _ProfiledSession(ort.InferenceSession):
    """A session whose runs count as the ``run`` stage of whatever stage called them."""

    def run(self, output_names, input_feed, run_options=None):
        with stage("run"):
            return super().run(output_names, input_feed, run_options)


def session(model: onnx.ModelProto, threads: int = 0, once: bool = False,
            outside: list[onnx.TensorProto] | tuple = ()) -> ort.InferenceSession:
    """A CPU session over ``model``, quiet; ``threads`` intra-op threads (0: onnxruntime's choice).

    ``once``: the session runs once (a gradient taken once per step), so onnxruntime's graph
    rewrites cost more than they save: off. On the digits MobileNet's first-order sessions
    (3.7k nodes) making one took 0.27 s with every rewrite, 0.10 s without, and the run
    took the same 0.02 s.

    A model whose large initializers weigh more than ``LEAN_SESSION_BYTES`` gets a
    :class:`LeanSession` (a plain session would cost a serialised copy of the model while it
    is made, onnxruntime's own copy, and a third for prepacked weights). Smaller models, the
    tests' and most users', take the plain path, so their numbers do not change.

    ``outside``: large initializers of ``model`` the caller kept out of its proto (a sub-model
    of a large model: :meth:`~onnxprune.ir.slicing.Slicer.sub_model`), so that they are not
    copied into it only to be taken out again; the session treats them as if they were in."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if once:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    big = lean_weights(model, outside)
    fed = {id(t) for t in big}
    model.graph.initializer.extend(t for t in outside if id(t) not in fed)  # not lean after all: in, as if never out
    with stage("session"):
        if not big:
            return _ProfiledSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        weights = {t.name: held_array(t) if is_held(t) else
                   np.frombuffer(t.raw_data, helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))
                   for t in big}
        lean = weights_as_inputs(model, big)
        options.enable_cpu_mem_arena = False  # see LeanSession
        sess = _ProfiledSession(lean.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return LeanSession(sess, weights)


#: Run options that hand a session's arena back once the run is done (onnxruntime keeps what a
#: run grew its arena to until the session dies): for the last of a series of large runs.
SHRINK_ARENA = ort.RunOptions()
SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def _trimmer():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_malloc_trim = _trimmer()


def release_memory() -> None:
    """Return the heap freed since the last call to the system (glibc's ``malloc_trim``; a no-op
    elsewhere). Sessions and arrays freed within a progressive step leave their pages with the
    allocator, which keeps them: on resnet50 at 224x224 the process held 1.8 GB after planning
    where 1.1 GB was live."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's shape and type call for (0 for strings and unknown types), read
    off its dims: protobuf's ByteSize() would encode the tensor to count them."""
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return 0 if tensor.data_type == onnx.TensorProto.STRING else math.prod(tensor.dims) * itemsize


def large_initializers(model: onnx.ModelProto, least: int | None = None) -> list[onnx.TensorProto]:
    """The main graph's raw-data initializers of at least ``least`` (``LEAN_TENSOR_BYTES``)
    bytes, and its held ones (:mod:`onnxprune.ir.held`), whatever their size."""
    return [t for t in model.graph.initializer if is_large(t, least)]


def is_large(tensor: onnx.TensorProto, least: int | None = None) -> bool:
    """Whether :func:`large_initializers` counts ``tensor``."""
    least = LEAN_TENSOR_BYTES if least is None else least
    return (tensor.HasField("raw_data") and tensor_nbytes(tensor) >= least) or is_held(tensor)


def lean_weights(model: onnx.ModelProto, outside: list[onnx.TensorProto] | tuple = ()) -> list[onnx.TensorProto]:
    """The initializers a large model's sessions and checks take as typed inputs instead of
    data: those of ``LEAN_TENSOR_BYTES`` or more, when they add up to ``LEAN_SESSION_BYTES``
    (none for a smaller model, whose handling stays exactly as it was); held ones always (their
    bytes are not in the protobuf). ``outside``: large initializers of the model kept out of
    its protobuf (see :func:`session`), counted as if they were in."""
    big = [*large_initializers(model), *outside]
    if sum(tensor_nbytes(t) for t in big) >= LEAN_SESSION_BYTES:
        return big
    return [t for t in big if is_held(t)]


def hold_lean(model: onnx.ModelProto) -> bool:
    """In place, inside a :func:`~onnxprune.ir.held.holding` block: the big initializers of a
    model whose sessions are lean anyway (:func:`lean_weights`) held as arrays, each read out of
    the protobuf once. Every copy of the model made afterwards (an editor's, a gradient model's)
    carries no weight bytes, and every session over one feeds the same arrays: on resnet50 at
    224x224 a probe step's models copied its 173 MB of weights and estimates seven times over.
    A smaller model, or no open block: nothing changes (False)."""
    if not held.active() or not lean_weights(model):
        return False
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and held.holdable(tensor.data_type) and tensor_nbytes(tensor) >= LEAN_TENSOR_BYTES:
            array = np.frombuffer(tensor.raw_data, helper.tensor_dtype_to_np_dtype(tensor.data_type))
            held.hold(tensor, array.reshape(tuple(tensor.dims)))
    return True


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``, exactly, without its cost: protobuf (upb) encodes the whole model
    to count its bytes, a transient copy of every weight. Large initializers are counted from
    their dims (their data was checked against them on load) around a skeleton's size; a held
    one as the tensor it stands for, its bytes in the protobuf."""
    big = large_initializers(model)
    if not big:
        return model.ByteSize()
    skeleton = without_initializers(model, {t.name for t in big})
    graph = skeleton.graph.ByteSize()
    for tensor in big:
        data = len(tensor.raw_data) if tensor_nbytes(tensor) == 0 else tensor_nbytes(tensor)
        size = (header(tensor) if is_held(tensor) else copy_without(tensor, "raw_data")).ByteSize()
        size += 1 + _varint_size(data) + data
        graph += 1 + _varint_size(size) + size
    outer = skeleton.ByteSize() - (1 + _varint_size(skeleton.graph.ByteSize()) + skeleton.graph.ByteSize())
    return outer + 1 + _varint_size(graph) + graph


def weights_as_inputs(model: onnx.ModelProto, tensors: list[onnx.TensorProto]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``tensors`` (main-graph initializers) are typed graph inputs
    instead: its skeleton, made without copying their bytes."""
    lean = without_initializers(model, {t.name for t in tensors})
    listed = {v.name for v in lean.graph.input}
    lean.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                            for t in tensors if t.name not in listed)
    return lean


def copy_without(message, skip: str):
    """A new message with every field of ``message`` but ``skip`` (copied field by field)."""
    new = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(new, field.name).extend(value)
        elif field.message_type is not None:
            getattr(new, field.name).CopyFrom(value)
        else:
            setattr(new, field.name, value)
    return new


def without_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` without the main graph's initializers in ``names``, made without
    copying them (protobuf keeps a cleared field's bytes until the whole message goes, so
    emptying tensors in place and filling them back would grow the model, not spare it)."""
    lean = copy_without(model, "graph")
    lean.graph.CopyFrom(copy_without(model.graph, "initializer"))
    lean.graph.initializer.extend(t for t in model.graph.initializer if t.name not in names)
    return lean
