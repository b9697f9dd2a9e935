"""Writing nodes into a model without touching protobuf elsewhere.

:class:`NodeEmitter` appends nodes and initializers under fresh names and writes the ops whose
form changed between opsets (axes, pads) the way the model's opset wants them, from the one
table :data:`~onnxprune.ir.opsets.PARAMS_AS_INPUTS_SINCE`. :class:`ModelEditor` edits a copy of
a model (inputs, outputs, rewired node inputs) and takes in what an emitter wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from numpy.typing import ArrayLike, DTypeLike
from onnx import helper, numpy_helper

from onnxprune.ir import held, runtime
from onnxprune.ir.export import copy_model, to_model, toposort_nodes
from onnxprune.ir.opsets import Opset
from onnxprune.ir.shapes import graph_inputs

Ints = Sequence[int] | np.ndarray


class NodeEmitter:
    """Nodes and initializers for one model, in its ``opset``.

    Names follow ``scheme``, a format string of ``n`` (a counter) and ``hint`` (the op type,
    or what the caller names), skipping those in ``taken`` (the set is updated). Every
    constant is an initializer of its own; an emitter that wants equal constants shared
    overrides :meth:`const`, which every helper here goes through.
    """

    def __init__(self, opset: Opset | int, scheme: str, taken: set[str] | None = None) -> None:
        self.opset = opset if isinstance(opset, Opset) else Opset(opset)
        self.scheme = scheme
        self.names = set() if taken is None else taken
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._counter = 0
        #: Whether :meth:`const` holds large arrays (an emitter extending a model that holds its
        #: weights: a gradient graph's flipped convolution kernels are as large as the weights).
        self.hold_large = False

    # ----------------------------------------------------------------- naming / emission
    def fresh(self, hint: str = "") -> str:
        """A tensor name no other tensor of the model has."""
        while True:
            self._counter += 1
            name = self.scheme.format(n=self._counter, hint=hint)
            if name not in self.names:
                self.names.add(name)
                return name

    def add(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str | list[str]:
        """Emit one node (attributes given as None are left out); return its output name
        (a list of names if ``n_out`` > 1)."""
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.emit(op_type, inputs, outs, **attrs)
        return outs[0] if n_out == 1 else outs

    def emit(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs) -> None:
        """Emit one node writing the tensors the caller names."""
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=outputs[0] + "/node", **attrs))

    def const(self, value: ArrayLike, hint: str = "const") -> str:
        """An initializer holding ``value`` (its numpy dtype and shape); with :attr:`hold_large`,
        inside a holding block, a large one held (:mod:`onnxprune.ir.held`), not copied in."""
        name = self.fresh(hint)
        arr = np.asarray(value)
        data_type = helper.np_dtype_to_tensor_dtype(arr.dtype) if arr.dtype != object else None
        if self.hold_large and held.active() and arr.nbytes >= runtime.LEAN_TENSOR_BYTES and held.holdable(data_type):
            tensor = onnx.TensorProto(name=name, data_type=data_type, dims=arr.shape)
            held.hold(tensor, np.ascontiguousarray(arr))
            self.inits.append(tensor)
            return name
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def i64(self, values: Ints) -> str:
        """A 1-D int64 constant."""
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1))

    def ints(self, values: str | Ints) -> str:
        """A tensor name as is, or an int64 constant of ``values``."""
        return values if isinstance(values, str) else self.i64(values)

    # ----------------------------------------------------------------- opset-aware ops
    def _with_axes(self, op_type: str, x: str, axes: Ints, **attrs) -> str:
        """``op_type`` on ``x`` over ``axes``: an input from the opset where the op takes it
        so, else an attribute."""
        if self.opset.params_as_inputs(op_type):
            return self.add(op_type, [x, self.ints(axes)], **attrs)
        return self.add(op_type, [x], axes=list(axes), **attrs)

    def reduce_sum(self, x: str, axes: Ints, keepdims: int = 1) -> str:
        return self._with_axes("ReduceSum", x, axes, keepdims=keepdims)

    def reduce_mean(self, x: str, axes: Ints, keepdims: int = 1) -> str:
        return self._with_axes("ReduceMean", x, axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Ints) -> str:
        return self._with_axes("Unsqueeze", x, axes)

    def squeeze(self, x: str, axes: Ints) -> str:
        return self._with_axes("Squeeze", x, axes)

    def pad(self, x: str, pads: Ints, value: ArrayLike | None = None) -> str:
        """Pad ``x`` by ``pads`` (begins then ends, every axis) with ``value``, a scalar of
        ``x``'s element type (zero when None)."""
        if not self.opset.params_as_inputs("Pad"):
            return self.add("Pad", [x], pads=list(pads), mode="constant", value=0.0 if value is None else float(value))
        inputs = [x, self.i64(pads)] + ([] if value is None else [self.const(np.asarray(value))])
        return self.add("Pad", inputs, mode="constant")


@dataclass(frozen=True)
class NodeView:
    """What a builder reads of a node: its op, name and tensors."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class ModelEditor:
    """Edits a copy of a model: inputs, outputs, node inputs, and what emitters wrote.

    The model given is left alone (unless ``copy`` is False: then it is the one edited);
    :meth:`finish` returns the edited one.
    """

    def __init__(self, model: onnx.ModelProto, copy: bool = True) -> None:
        self.model = copy_model(model) if copy else model
        self._by_name: dict[str, onnx.NodeProto] | None = None

    @classmethod
    def from_graph(cls, graph: gs.Graph, template: onnx.ModelProto, hold_large: bool = False) -> ModelEditor:
        """An editor over ``graph`` exported with the template's opsets and metadata (its big
        constants held, with ``hold_large``: see :func:`~onnxprune.ir.export.to_model`)."""
        return cls(to_model(graph, template, hold_large=hold_large), copy=False)

    # ----------------------------------------------------------------- reading
    @property
    def opset(self) -> Opset:
        """The default-domain opset."""
        return Opset(next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")))

    @property
    def inputs(self) -> list[str]:
        """The real inputs' names (not initializers listed as inputs), in order."""
        return [v.name for v in graph_inputs(self.model)]

    @property
    def outputs(self) -> list[str]:
        return [v.name for v in self.model.graph.output]

    def nodes(self) -> list[NodeView]:
        """The nodes as they are now, in graph order."""
        return [NodeView(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in self.model.graph.node]

    def constant(self, name: str) -> np.ndarray | None:
        """The initializer ``name`` as an array, None if there is none."""
        tensor = next((t for t in self.model.graph.initializer if t.name == name), None)
        return None if tensor is None else held.array_of(tensor)

    def emitter(self, scheme: str) -> NodeEmitter:
        """A :class:`NodeEmitter` in this model's opset whose names clash with none of its own."""
        g = self.model.graph
        taken = {t.name for t in g.initializer} | {v.name for v in list(g.input) + list(g.output)} | {
            name for n in g.node for name in list(n.input) + list(n.output)}
        return NodeEmitter(self.opset, scheme, taken)

    # ----------------------------------------------------------------- editing
    def add_input(self, name: str, dtype: DTypeLike, dims: Sequence[int | str | None], first: bool = False) -> None:
        """A graph input of element type ``dtype`` and ``dims`` (a str is symbolic, None unknown),
        last or ``first``."""
        value = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(dims))
        if first:
            self.model.graph.input.insert(0, value)
        else:
            self.model.graph.input.append(value)

    def remove_inputs(self, names: Iterable[str]) -> None:
        names = set(names)
        kept = [v for v in self.model.graph.input if v.name not in names]
        del self.model.graph.input[:]
        self.model.graph.input.extend(kept)

    def declare(self, name: str, dtype: DTypeLike, dims: Sequence[int | str | None]) -> None:
        """Record what ``name`` holds (a value_info) where shape inference cannot work it out."""
        self.model.graph.value_info.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(dims)))

    def add_output(self, name: str, dtype: DTypeLike | None = None,
                   dims: Sequence[int | str | None] | None = None) -> None:
        """Make ``name`` an output, of element type ``dtype`` and ``dims`` if given (else untyped;
        declared dims stand where shape inference cannot reach)."""
        if dtype is None:
            value = helper.make_empty_tensor_value_info(name)
        else:
            value = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims)
        self.model.graph.output.append(value)

    def set_outputs(self, names: Sequence[str], dtype: DTypeLike | None = None,
                    dims: Sequence[int | str | None] | None = None) -> None:
        """Make ``names`` the only outputs (see :meth:`add_output`)."""
        del self.model.graph.output[:]
        for name in names:
            self.add_output(name, dtype, dims)

    def replace_input(self, node: str, old: str, new: str) -> None:
        """Make the node called ``node`` read ``new`` wherever it read ``old``."""
        if self._by_name is None:
            self._by_name = {n.name: n for n in self.model.graph.node}
        inputs = self._by_name[node].input
        for i, name in enumerate(inputs):
            if name == old:
                inputs[i] = new

    def extend(self, emitted: NodeEmitter, first: bool = False) -> None:
        """Take in what ``emitted`` wrote: its initializers, and its nodes after the model's
        (or before them, ``first``)."""
        g = self.model.graph
        g.initializer.extend(emitted.inits)
        if first:
            nodes = list(emitted.nodes) + list(g.node)
            del g.node[:]
            g.node.extend(nodes)
        else:
            g.node.extend(emitted.nodes)

    def finish(self, toposort: bool = False) -> onnx.ModelProto:
        """The edited model, its nodes topologically sorted if ``toposort`` (emitted nodes
        that feed the model's own need it)."""
        g = self.model.graph
        if toposort:
            ready = {v.name for v in g.input} | {t.name for t in g.initializer}
            nodes = toposort_nodes(list(g.node), ready)
            del g.node[:]
            g.node.extend(nodes)
        return self.model
