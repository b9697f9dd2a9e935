"""What is known about the forward model's tensors without running it on data: element
types and shapes (shape inference, completed by :mod:`~onnxprune.gradient.probe` where it
left gaps) and the values of tensors that do not depend on the data input.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.gradient.errors import GradientUnsupported
from onnxprune.gradient.protos import attrs, constant_value
from onnxprune.ir import Opset
from onnxprune.ir.held import array_of
from onnxprune.ir.shapes import infer_shapes

logger = logging.getLogger(__name__)

# Ops never folded to constants: random, or with subgraphs.
_NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                      "Bernoulli", "Multinomial", "If", "Loop", "Scan"})


def inferred_types(model: onnx.ModelProto) -> dict[str, tuple[int, list | None]]:
    """Element type and dims (int, symbol or None) of every tensor shape inference knows."""
    g = model.graph
    try:
        inferred = infer_shapes(model)
        vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    except Exception as exc:  # noqa: BLE001 - shape inference is best effort
        logger.debug("shape inference failed: %s", exc)
        vis = list(g.value_info) + list(g.input) + list(g.output)
    types: dict[str, tuple[int, list | None]] = {}
    for v in vis:
        if not v.type.HasField("tensor_type"):
            continue
        tt = v.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        types[v.name] = (tt.elem_type, dims)
    return types


class StaticInfo:
    """Types, shapes and constant values of one model's tensors; ``x`` is its data input.

    ``types`` maps a tensor name to (element type, dims or None); the probe may complete it.
    """

    def __init__(self, model: onnx.ModelProto, opset: Opset) -> None:
        g = model.graph
        self.model, self.opset = model, opset
        self.init = {t.name: t for t in g.initializer}
        data_inputs = [i for i in g.input if i.name not in self.init]
        if not data_inputs or not g.output:
            raise GradientUnsupported("model has no data input or no output")
        self.x = data_inputs[0].name
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.types = inferred_types(model)
        self.x_elem = self.types.get(self.x, (TensorProto.FLOAT, None))[0] or TensorProto.FLOAT
        self._values: dict[str, np.ndarray | None] = {}

    # ------------------------------------------------------------------ types and shapes
    def elem(self, name: str) -> int:
        """The ONNX element type of ``name`` (the data input's when unknown)."""
        if name in self.types and self.types[name][0]:
            return self.types[name][0]
        if name in self.init:
            return self.init[name].data_type
        return self.x_elem

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem(name)))

    def shape(self, name: str) -> list | None:
        """Dims of ``name`` (ints, symbols or None), or None when even the rank is unknown."""
        if name in self.init:
            return list(self.init[name].dims)
        if name in self.types and self.types[name][1] is not None:
            return list(self.types[name][1])
        v = self.const_value(name)
        return None if v is None else list(v.shape)

    def required_shape(self, name: str) -> list:
        s = self.shape(name)
        if s is None:
            raise GradientUnsupported(f"the shape of {name!r} is unknown (shape inference failed)")
        return s

    def rank(self, name: str) -> int:
        s = self.shape(name)
        if s is None:
            raise GradientUnsupported(f"the rank of {name!r} is unknown (shape inference failed)")
        return len(s)

    def spatial(self, name: str) -> list[int] | None:
        """The static spatial dims (after batch and channels) of ``name``, else None."""
        s = self.shape(name)
        if s is None or len(s) < 3 or not all(isinstance(d, int) and d > 0 for d in s[1:]):
            return None
        return s[2:]

    # ------------------------------------------------------------------ constant values
    def const_value(self, name: str) -> np.ndarray | None:
        """Value of a tensor computable without the data input (initializer, Constant, or a
        small constant subgraph folded with onnx's reference evaluator), else None."""
        if not name:
            return None
        if name in self._values:
            return self._values[name]
        self._values[name] = None
        value = None
        if name in self.init:
            value = array_of(self.init[name])
        elif (node := self.producer.get(name)) is not None and name != self.x:
            if node.op_type == "Constant":
                value = constant_value(node)
            elif node.op_type in ("Gather", "Slice") and getattr(self.producer.get(node.input[0]), "op_type",
                                                                 None) == "Shape":
                value = self._static_dims(node, self.producer[node.input[0]])
            elif node.op_type not in _NO_FOLD and node.domain in ("", "ai.onnx") and all(
                self.const_value(i) is not None for i in node.input if i
            ):
                value = self._fold(node, name)
        self._values[name] = value
        return value

    def _fold(self, node: onnx.NodeProto, name: str) -> np.ndarray | None:
        """Run a node whose inputs are all constant; remember every output's value."""
        try:
            from onnx.reference import ReferenceEvaluator

            ev = ReferenceEvaluator(node, opsets={"": self.opset.version})
            outs = ev.run(None, {i: self.const_value(i) for i in node.input if i})
            for o, v in zip(node.output, outs):
                self._values[o] = np.asarray(v)
            return self._values.get(name)
        except Exception as exc:  # noqa: BLE001 - folding is best effort
            logger.debug("could not fold %s: %s", node.op_type, exc)
            return None

    def _static_dims(self, node: onnx.NodeProto, shape_node: onnx.NodeProto) -> np.ndarray | None:
        """Fold Gather/Slice of Shape(t) when the picked dims of t are static, although others
        (the batch) are not: exporters compute reshape/slice sizes exactly this way."""
        dims = self.shape(shape_node.input[0])
        if dims is None:
            return None
        a = attrs(shape_node)
        dims = dims[a.get("start", 0):a.get("end", len(dims))]
        if node.op_type == "Gather":
            idx = self.const_value(node.input[1])
            if idx is None:
                return None
            picked = np.asarray(dims, dtype=object)[idx.astype(np.int64)]
        else:
            params = self._slice_params(node)
            if params is None:
                return None
            starts, ends, axes, steps = params
            if list(axes or [0]) not in ([0], [-1]) or not starts:
                return None
            step = (steps or [1])[0]
            big = 2**62
            stop = None if abs(ends[0]) >= big else ends[0]
            picked = np.asarray(dims[starts[0]:stop:step], dtype=object)
        if not all(isinstance(d, int) for d in np.asarray(picked).reshape(-1)):
            return None
        return np.asarray(picked, dtype=np.int64)

    def _slice_params(self, node: onnx.NodeProto) -> tuple | None:
        """(starts, ends, axes, steps) of a Slice on a shape, None where one is not constant."""
        if not self.opset.params_as_inputs("Slice"):
            a = attrs(node)
            return a.get("starts"), a.get("ends"), a.get("axes", [0]), [1]
        vals = [self.const_value(i) if i else None for i in (list(node.input[1:]) + [""] * 4)[:4]]
        if vals[0] is None or vals[1] is None or any(i and v is None for i, v in zip(node.input[1:], vals)):
            return None
        return tuple(None if v is None else [int(e) for e in v.reshape(-1)] for v in vals)
