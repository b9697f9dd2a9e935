"""Exact input gradients of an ONNX classifier, emitted as an ONNX graph.

onnxruntime only runs forward graphs, yet adversarial evaluation (FGSM, PGD) needs
d loss / d input. Rather than depending on a deep-learning framework, we write the
reverse-mode derivative of the model *as more ONNX nodes* appended to the model itself:
the result is an ordinary model (inputs: the original input plus int64 ``labels``;
outputs: per-sample cross-entropy ``loss`` and ``input_grad``) that any onnxruntime runs
at forward speed.

Each op type has one backward rule in :data:`GRADIENT_RULES`. A rule receives the
gradients flowing into the node's outputs and emits the nodes that compute the gradients
of its inputs, using only standard ops of the model's own opset (9 to 21), so the backward
graph is valid wherever the forward one is. Only the path from the input to the output is
differentiated: weights, constants and shape computations (Shape, Gather on shapes, ...)
carry no gradient. When a node on that path has no rule, or a rule lacks static
information it needs, :class:`GradientUnsupported` is raised so that the caller can fall
back to finite differences.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

LABELS = "labels"
LOSS = "loss"
INPUT_GRAD = "input_grad"

_INT_MAX = 2**63 - 1
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# Ops whose outputs carry no gradient even when an input depends on the data input.
_NON_DIFFERENTIABLE = frozenset(
    "Shape Size Equal Greater Less GreaterOrEqual LessOrEqual Not And Or Xor ArgMax ArgMin "
    "NonZero Sign Floor Ceil Round IsNaN IsInf ConstantOfShape EyeLike RandomNormalLike "
    "RandomUniformLike Bernoulli Multinomial NonMaxSuppression".split()
)
_NON_DIFFERENTIABLE_OUTPUTS = {"MaxPool": (1,), "Dropout": (1,), "TopK": (1,)}
_NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                      "Bernoulli", "Multinomial", "If", "Loop", "Scan"})


class GradientUnsupported(Exception):
    """The gradient graph cannot be built for this model (an op without a backward rule on
    the input->output path, or missing static shape information a rule needs).

    Not a :class:`~onnxprune.errors.UserError`: the model is fine, the evaluator simply
    falls back to finite differences. ``ops`` lists the op types lacking a rule.
    """

    def __init__(self, message: str, ops: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.ops = tuple(ops)


Rule = Callable[["_Builder", onnx.NodeProto, list], list]
GRADIENT_RULES: dict[str, Rule] = {}


def _rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            GRADIENT_RULES[op] = fn
        return fn

    return register


def input_gradient_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` extended with a ``labels`` input and ``loss``/``input_grad`` outputs.

    ``loss`` is the per-sample cross-entropy of the first output against ``labels`` (if
    the output is already a Softmax/LogSoftmax over classes, the logits before it are used,
    which is -log(prob) computed stably); ``input_grad`` is d loss / d input, shaped like the
    input. Raises :class:`GradientUnsupported` when a rule is missing.
    """
    return _Builder(model).build()


_PASS_THROUGH = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})


def _final_softmax(graph: onnx.GraphProto, producer: dict) -> onnx.NodeProto | None:
    """The Softmax/LogSoftmax the first output comes from, through reshapes, if any."""
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type in ("Softmax", "LogSoftmax") else None


def output_kind(model: onnx.ModelProto) -> str:
    """'probs' if the model's first output is a Softmax (probabilities), else 'logits'.

    LogSoftmax outputs count as logits: cross-entropy on them is -log(prob) already.
    """
    node = _final_softmax(model.graph, {o: n for n in model.graph.node for o in n.output})
    return "probs" if node is not None and node.op_type == "Softmax" else "logits"


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _graph_refs(graph: onnx.GraphProto) -> set[str]:
    """Every name a (sub)graph reads, so that pruning keeps outer-scope producers."""
    refs = set()
    for n in graph.node:
        refs.update(i for i in n.input if i)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                refs |= _graph_refs(sub)
    return refs


class _Builder:
    """State of one gradient-graph construction: shape info, constants, emitted nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        if len(m.functions):
            try:
                from onnx import inliner

                m = inliner.inline_local_functions(m)
            except Exception as exc:  # noqa: BLE001 - keep going, rules will say what lacks
                logger.debug("could not inline local functions: %s", exc)
        self.model = m
        g = m.graph
        self.opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
        if not 9 <= self.opset:
            raise GradientUnsupported(f"opset {self.opset} is older than 9")
        self.init = {t.name: t for t in g.initializer}
        data_inputs = [i for i in g.input if i.name not in self.init]
        if not data_inputs or not g.output:
            raise GradientUnsupported("model has no data input or no output")
        self.x = data_inputs[0].name
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.names = {t.name for t in g.initializer} | {v.name for v in g.input} | {
            v.name for v in g.output} | {o for n in g.node for o in list(n.input) + list(n.output)}
        self.node_names = {n.name for n in g.node}
        self.info: dict[str, tuple[int, list | None]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
            vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        except Exception as exc:  # noqa: BLE001 - shape inference is best effort
            logger.debug("shape inference failed: %s", exc)
            vis = list(g.value_info) + list(g.input) + list(g.output)
        for v in vis:
            if not v.type.HasField("tensor_type"):
                continue
            tt = v.type.tensor_type
            dims = None
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            self.info[v.name] = (tt.elem_type, dims)
        self.x_elem = self.info.get(self.x, (TensorProto.FLOAT, None))[0] or TensorProto.FLOAT
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self._const_cache: dict = {}
        self._values: dict[str, np.ndarray | None] = {}
        self._counter = 0
        self.active: set[str] = set()
        self.needed: set[str] = set()

    # ----------------------------------------------------------------- naming / emission
    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"grad/{hint}_{self._counter}"
            if name not in self.names:
                self.names.add(name)
                return name

    def add(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        outs = [self.fresh(op_type) for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.new_nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0] + "/node", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, hint: str = "const") -> str:
        arr = np.asarray(value)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = self.fresh(hint)
            self.new_inits.append(numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def i64(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1))

    def ints(self, values) -> str:
        return values if isinstance(values, str) else self.i64(values)

    def elem(self, name: str) -> int:
        if name in self.info and self.info[name][0]:
            return self.info[name][0]
        if name in self.init:
            return self.init[name].data_type
        return self.x_elem

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem(name)))

    def scalar(self, value: float, like: str) -> str:
        return self.const(np.array(value, dtype=self.np_dtype(like)))

    # ----------------------------------------------------------------- static information
    def shape(self, name: str) -> list | None:
        if name in self.init:
            return list(self.init[name].dims)
        if name in self.info and self.info[name][1] is not None:
            return list(self.info[name][1])
        v = self.const_value(name)
        return None if v is None else list(v.shape)

    def rank(self, name: str) -> int:
        s = self.shape(name)
        if s is None:
            raise GradientUnsupported(f"the rank of {name!r} is unknown (shape inference failed)")
        return len(s)

    def spatial(self, name: str) -> list[int] | None:
        s = self.shape(name)
        if s is None or len(s) < 3 or not all(isinstance(d, int) and d > 0 for d in s[1:]):
            return None
        return s[2:]

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
            value = numpy_helper.to_array(self.init[name])
        elif (node := self.producer.get(name)) is not None and name != self.x:
            if node.op_type == "Constant":
                value = _constant_value(node)
            elif node.op_type in ("Gather", "Slice") and getattr(self.producer.get(node.input[0]), "op_type",
                                                                 None) == "Shape":
                value = self._static_dims(node, self.producer[node.input[0]])
            elif node.op_type not in _NO_FOLD and node.domain in ("", "ai.onnx") and all(
                self.const_value(i) is not None for i in node.input if i
            ):
                try:
                    from onnx.reference import ReferenceEvaluator

                    ev = ReferenceEvaluator(node, opsets={"": self.opset})
                    outs = ev.run(None, {i: self.const_value(i) for i in node.input if i})
                    for o, v in zip(node.output, outs):
                        self._values[o] = np.asarray(v)
                    value = self._values.get(name)
                except Exception as exc:  # noqa: BLE001 - folding is best effort
                    logger.debug("could not fold %s: %s", node.op_type, exc)
        self._values[name] = value
        return value

    def _static_dims(self, node: onnx.NodeProto, shape_node: onnx.NodeProto) -> np.ndarray | None:
        """Fold Gather/Slice of Shape(t) when the picked dims of t are static, although others
        (the batch) are not: exporters compute reshape/slice sizes exactly this way."""
        dims = self.shape(shape_node.input[0])
        if dims is None:
            return None
        a = _attrs(shape_node)
        dims = dims[a.get("start", 0):a.get("end", len(dims))]
        if node.op_type == "Gather":
            idx = self.const_value(node.input[1])
            if idx is None:
                return None
            picked = np.asarray(dims, dtype=object)[idx.astype(np.int64)]
        else:
            if self.opset < 10:
                a = _attrs(node)
                starts, ends, axes, steps = a.get("starts"), a.get("ends"), a.get("axes", [0]), [1]
            else:
                vals = [self.const_value(i) if i else None for i in (list(node.input[1:]) + [""] * 4)[:4]]
                if vals[0] is None or vals[1] is None or any(i and v is None for i, v in zip(node.input[1:], vals)):
                    return None
                starts, ends, axes, steps = (None if v is None else [int(e) for e in v.reshape(-1)] for v in vals)
            if list(axes or [0]) not in ([0], [-1]) or not starts:
                return None
            step = (steps or [1])[0]
            big = 2**62
            stop = None if abs(ends[0]) >= big else ends[0]
            picked = np.asarray(dims[starts[0]:stop:step], dtype=object)
        if not all(isinstance(d, int) for d in np.asarray(picked).reshape(-1)):
            return None
        return np.asarray(picked, dtype=np.int64)

    def needs(self, name: str) -> bool:
        return bool(name) and name in self.needed

    # ----------------------------------------------------------------- opset-aware emitters
    def reduce_sum(self, x: str, axes, keepdims: int = 1) -> str:
        if self.opset >= 13:
            return self.add("ReduceSum", [x, self.ints(axes)], keepdims=keepdims)
        return self.add("ReduceSum", [x], axes=list(axes), keepdims=keepdims)

    def reduce_mean(self, x: str, axes, keepdims: int = 1) -> str:
        if self.opset >= 18:
            return self.add("ReduceMean", [x, self.i64(axes)], keepdims=keepdims)
        return self.add("ReduceMean", [x], axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes) -> str:
        if self.opset >= 13:
            return self.add("Unsqueeze", [x, self.i64(axes)])
        return self.add("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x: str, axes) -> str:
        if self.opset >= 13:
            return self.add("Squeeze", [x, self.i64(axes)])
        return self.add("Squeeze", [x], axes=list(axes))

    def slice(self, x: str, starts, ends, axes, steps=None) -> str:
        if self.opset < 10:
            if steps is not None or isinstance(starts, str) or isinstance(ends, str):
                raise GradientUnsupported("strided or dynamic Slice needs opset >= 10")
            return self.add("Slice", [x], starts=list(starts), ends=list(ends), axes=list(axes))
        ins = [x, self.ints(starts), self.ints(ends), self.i64(axes)]
        return self.add("Slice", ins + ([self.i64(steps)] if steps is not None else []))

    def pad(self, x: str, pads) -> str:
        if self.opset < 11:
            return self.add("Pad", [x], pads=list(pads), mode="constant", value=0.0)
        return self.add("Pad", [x, self.i64(pads)], mode="constant")

    def zeros_like(self, x: str) -> str:
        zero = numpy_helper.from_array(np.zeros(1, self.np_dtype(x)))
        return self.add("ConstantOfShape", [self.add("Shape", [x])], value=zero)

    def reshape_like(self, g: str, x: str) -> str:
        return self.add("Reshape", [g, self.add("Shape", [x])])

    def where(self, cond: str, a: str, b: str) -> str:
        return self.add("Where", [cond, a, b])

    def reduce_to(self, g: str, target: str, gshape: list | None) -> str:
        """Sum ``g`` (of shape ``gshape``) over the axes along which ``target`` was broadcast."""
        ts = self.shape(target)
        if ts is None or gshape is None:
            raise GradientUnsupported(f"broadcast reduction to {target!r}: shapes unknown")
        lead = len(gshape) - len(ts)
        if lead < 0:
            raise GradientUnsupported(f"broadcast reduction to {target!r}: rank mismatch")
        axes, ambiguous = list(range(lead)), False
        for i, d in enumerate(ts):
            od = gshape[lead + i]
            if d == 1:
                if od != 1:
                    axes.append(lead + i)
            elif not (isinstance(d, int) or (d is not None and d == od) or od == 1):
                ambiguous = True
        if ambiguous:
            if self.opset < 13:
                raise GradientUnsupported(f"broadcast reduction to {target!r}: dims unknown")
            return self._reduce_to_dynamic(g, target, lead)
        if not axes:
            return g
        r = self.reduce_sum(g, axes, keepdims=1)
        return self.reshape_like(r, target) if lead else r

    def _reduce_to_dynamic(self, g: str, target: str, lead: int) -> str:
        st = self.add("Shape", [target])
        full = self.add("Concat", [self.i64([1] * lead), st], axis=0) if lead else st
        one = self.i64([1])
        mask = self.add("And", [self.add("Equal", [full, one]),
                                self.add("Not", [self.add("Equal", [self.add("Shape", [g]), one])])])
        axes = self.add("Reshape", [self.add("NonZero", [mask]), self.i64([-1])])
        r = self.add("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
        return self.add("Reshape", [r, st])

    # ----------------------------------------------------------------- the construction
    def _loss_target(self) -> tuple[str, str]:
        """(tensor the loss is computed from, 'logits' | 'probs')."""
        out = self.model.graph.output[0].name
        node = _final_softmax(self.model.graph, self.producer)
        if node is not None:
            axis = _attrs(node).get("axis", 1 if self.opset < 13 else -1)
            s = self.shape(node.input[0])
            r = len(s) if s is not None else None
            over_classes = (axis == 1 or (r is not None and axis % r == 1)) and (
                self.opset < 13 or (r is not None and all(d == 1 for d in s[2:])))
            if over_classes:
                return node.input[0], "logits"
            return out, "probs" if node.op_type == "Softmax" else "logits"
        return out, "logits"

    def _analyze(self, target: str) -> list[onnx.NodeProto]:
        active = {self.x}
        for node in self.model.graph.node:
            if node.op_type in _NON_DIFFERENTIABLE or not any(i in active for i in node.input if i):
                continue
            if node.op_type == "Cast" and _attrs(node).get("to") not in _FLOAT_TYPES:
                continue
            skip = _NON_DIFFERENTIABLE_OUTPUTS.get(node.op_type, ())
            for k, o in enumerate(node.output):
                elem = self.info.get(o, (0, None))[0]
                if o and k not in skip and (not elem or elem in _FLOAT_TYPES):
                    active.add(o)
        if target not in active:
            raise GradientUnsupported("the model output does not depend on its input")
        needed, nodes = {target}, []
        for node in reversed(self.model.graph.node):
            if any(o in needed for o in node.output):
                nodes.append(node)
                needed.update(i for i in node.input if i in active)
        self.active, self.needed = active, needed
        return nodes

    def build(self) -> onnx.ModelProto:
        for name in (LABELS, LOSS, INPUT_GRAD):
            if name in self.names:
                raise GradientUnsupported(f"the model already uses the tensor name {name!r}")
        self.names.update((LABELS, LOSS, INPUT_GRAD))
        if self._has_shape_gaps():
            self._probe_shapes()
        target, kind = self._loss_target()
        nodes = self._analyze(target)
        missing = sorted({_key(n) for n in nodes if _key(n) not in GRADIENT_RULES})
        if missing:
            raise GradientUnsupported(
                f"no backward rule for {', '.join(missing)} on the input->output path", tuple(missing))

        seed = self._loss(target, kind)
        grads: dict[str, list[str]] = {target: [seed]}
        for node in nodes:
            gout = [self._total(grads, o) if o in self.needed else None for o in node.output]
            if all(x is None for x in gout):
                continue
            gin = list(GRADIENT_RULES[_key(node)](self, node, gout))
            gin += [None] * (len(node.input) - len(gin))
            for i, (name, gi) in enumerate(zip(node.input, gin)):
                if not self.needs(name):
                    continue
                if gi is None:
                    raise GradientUnsupported(f"{node.op_type} {node.name!r}: no gradient for input {i}")
                grads.setdefault(name, []).append(gi)
        gx = self._total(grads, self.x)
        if gx is None:
            raise GradientUnsupported("no gradient reached the input")
        self.new_nodes.append(helper.make_node("Identity", [gx], [INPUT_GRAD], name=self.fresh("out")))
        return self._assemble()

    def _batch_symbol(self) -> str:
        dims = self.info.get(self.x, (0, None))[1]
        return dims[0] if dims and isinstance(dims[0], str) else "N"

    def _has_shape_gaps(self) -> bool:
        sym = self._batch_symbol()
        for node in self.model.graph.node:
            for o in node.output:
                dims = self.info.get(o, (0, None))[1] if o else []
                if dims is None or any(d is None or (isinstance(d, str) and d != sym) for d in dims):
                    return True
        return False

    def _probe_shapes(self) -> None:
        """Fill the gaps shape inference left (shapes computed at run time, as exporters
        emit them) by running the model on dummy inputs with every tensor exposed: batch 2
        and 3 tell batch-proportional dims from fixed ones."""
        dims = self.info.get(self.x, (0, None))[1]
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            return
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        present = {o.name for o in m.graph.output}
        for node in m.graph.node:
            for o in node.output:
                if o and o not in present:
                    m.graph.output.append(onnx.ValueInfoProto(name=o))
                    present.add(o)
        dynamic = not isinstance(dims[0], int)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(self.x_elem))
        rng = np.random.default_rng(0)
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            sess = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            runs = []
            for batch in ((2, 3) if dynamic else (dims[0],)):
                feed = rng.uniform(0, 1, [batch] + dims[1:]).astype(dtype)
                runs.append(dict(zip(names, sess.run(names, {self.x: feed}))))
        except Exception as exc:  # noqa: BLE001 - probing is best effort
            logger.debug("shape probe failed: %s", exc)
            return
        sym = self._batch_symbol()
        for name in names:
            a = np.asarray(runs[0][name])
            shape = list(a.shape)
            if dynamic:
                other = np.asarray(runs[1][name]).shape
                if len(other) != len(shape):
                    continue
                shape = [d if d == e else (sym if d == 2 else f"{sym}*{d // 2}") if d * 3 == e * 2 else None
                         for d, e in zip(shape, other)]
            old = self.info.get(name, (0, None))
            if old[1] is None or len(old[1]) != len(shape) or any(
                    d is None or (isinstance(d, str) and d != sym) for d in old[1]):
                self.info[name] = (old[0] or helper.np_dtype_to_tensor_dtype(a.dtype), shape)

    def _total(self, grads: dict[str, list[str]], name: str) -> str | None:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            grads[name] = [self.add("Sum", parts)]
        return grads[name][0]

    def _loss(self, t: str, kind: str) -> str:
        """Emit the per-sample cross-entropy (named LOSS) and return d loss / d t."""
        z = self.add("Flatten", [t], axis=1)
        s = self.shape(t)
        k = math.prod(s[1:]) if s is not None and all(isinstance(d, int) and d > 0 for d in s[1:]) else None
        if k is not None:
            classes = self.i64(np.arange(k))
        elif self.opset >= 11:
            n_cls = self.add("Gather", [self.add("Shape", [z]), self.const(np.array(1, np.int64))], axis=0)
            classes = self.add("Range", [self.const(np.array(0, np.int64)), n_cls, self.const(np.array(1, np.int64))])
        else:
            raise GradientUnsupported("number of classes unknown")
        onehot_b = self.add("Equal", [self.unsqueeze(LABELS, [1]), classes])
        onehot = self.add("Cast", [onehot_b], to=self.elem(t))
        if kind == "logits":
            logp = self.add("LogSoftmax", [z], axis=1)
            dz = self.add("Sub", [self.add("Exp", [logp]), onehot])
        else:
            logp = self.add("Log", [z])
            dz = self.add("Div", [self.add("Neg", [onehot]), z])
        picked = self.where(onehot_b, logp, self.scalar(0.0, t))
        summed = self.reduce_sum(picked, [1], keepdims=0)
        self.new_nodes.append(helper.make_node("Neg", [summed], [LOSS], name=self.fresh("loss")))
        return self.reshape_like(dz, t)

    def _assemble(self) -> onnx.ModelProto:
        g = self.model.graph
        all_nodes = list(g.node) + self.new_nodes
        need, keep = {LOSS, INPUT_GRAD}, []
        for n in reversed(all_nodes):
            if any(o in need for o in n.output):
                keep.append(n)
                need.update(i for i in n.input if i)
                for a in n.attribute:
                    for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        need |= _graph_refs(sub)
        keep.reverse()
        x_vi = next(v for v in g.input if v.name == self.x)
        dims = x_vi.type.tensor_type.shape.dim if x_vi.type.tensor_type.HasField("shape") else []
        batch = (dims[0].dim_value or dims[0].dim_param or "N") if len(dims) else "N"
        labels = helper.make_tensor_value_info(LABELS, TensorProto.INT64, [batch])
        loss = helper.make_tensor_value_info(LOSS, self.elem(self.model.graph.output[0].name), [batch])
        grad = onnx.ValueInfoProto()
        grad.CopyFrom(x_vi)
        grad.name = INPUT_GRAD
        inputs = [v for v in g.input if v.name == self.x or v.name in need] + [labels]
        inits = [t for t in list(g.initializer) + self.new_inits if t.name in need]
        value_info = [v for v in g.value_info if v.name in need]
        graph = helper.make_graph(keep, g.name or "gradient", inputs, [loss, grad], inits, value_info=value_info)
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        out.graph.CopyFrom(graph)
        return out


def _key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None

# ==================================================================================== rules
# A rule gets (builder, node, output gradients) and returns one gradient per node input,
# None where no gradient is needed: only inputs with b.needs(name) must get one. Weights,
# shape tensors and everything else off the input->output path are constants.


def _req_shape(b: _Builder, name: str) -> list:
    s = b.shape(name)
    if s is None:
        raise GradientUnsupported(f"the shape of {name!r} is unknown (shape inference failed)")
    return s


@_rule("Identity", "Dropout")
def _identity(b, n, g):
    return [g[0]]


@_rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(b, n, g):
    return [b.reshape_like(g[0], n.input[0])]


@_rule("Cast")
def _cast(b, n, g):
    return [b.add("Cast", [g[0]], to=b.elem(n.input[0]))]


def _positive(b, x):
    return b.add("Greater", [x, b.scalar(0.0, x)])


@_rule("Relu")
def _relu(b, n, g):
    x = n.input[0]  # g * (x > 0): a multiply by the cast mask runs twice as fast as Where
    return [b.add("Mul", [g[0], b.add("Cast", [_positive(b, x)], to=b.elem(x))])]


@_rule("LeakyRelu")
def _leaky_relu(b, n, g):
    x = n.input[0]
    slope = b.add("Mul", [g[0], b.scalar(_attrs(n).get("alpha", 0.01), x)])
    return [b.where(_positive(b, x), g[0], slope)]


@_rule("PRelu")
def _prelu(b, n, g):
    x = n.input[0]
    return [b.where(_positive(b, x), g[0], b.add("Mul", [g[0], n.input[1]]))]


@_rule("Elu")
def _elu(b, n, g):
    x, y = n.input[0], n.output[0]
    neg = b.add("Mul", [g[0], b.add("Add", [y, b.scalar(_attrs(n).get("alpha", 1.0), x)])])
    return [b.where(_positive(b, x), g[0], neg)]


@_rule("Selu")
def _selu(b, n, g):
    x, y, a = n.input[0], n.output[0], _attrs(n)
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    pos = b.add("Mul", [g[0], b.scalar(gamma, x)])
    neg = b.add("Mul", [g[0], b.add("Add", [y, b.scalar(alpha * gamma, x)])])
    return [b.where(_positive(b, x), pos, neg)]


def _unary(fn):
    """Rule for y = f(x) given ``fn(b, x, y) -> f'(x)``: dx = g * f'(x)."""

    def rule(b, n, g):
        return [b.add("Mul", [g[0], fn(b, n.input[0], n.output[0])])]

    return rule


def _one_minus(b, v):
    return b.add("Sub", [b.scalar(1.0, v), v])


GRADIENT_RULES["Sigmoid"] = _unary(lambda b, x, y: b.add("Mul", [y, _one_minus(b, y)]))
GRADIENT_RULES["Tanh"] = _unary(lambda b, x, y: _one_minus(b, b.add("Mul", [y, y])))
GRADIENT_RULES["Exp"] = _unary(lambda b, x, y: y)
GRADIENT_RULES["Log"] = _unary(lambda b, x, y: b.add("Reciprocal", [x]))
GRADIENT_RULES["Neg"] = _unary(lambda b, x, y: b.scalar(-1.0, x))
GRADIENT_RULES["Reciprocal"] = _unary(lambda b, x, y: b.add("Neg", [b.add("Mul", [y, y])]))
GRADIENT_RULES["Abs"] = _unary(lambda b, x, y: b.add("Sign", [x]))
GRADIENT_RULES["Sqrt"] = _unary(lambda b, x, y: b.add("Div", [b.scalar(0.5, x), y]))
GRADIENT_RULES["Softplus"] = _unary(lambda b, x, y: b.add("Sigmoid", [x]))
GRADIENT_RULES["Erf"] = _unary(lambda b, x, y: b.add("Mul", [
    b.scalar(2.0 / math.sqrt(math.pi), x), b.add("Exp", [b.add("Neg", [b.add("Mul", [x, x])])])]))


@_rule("Gelu")
def _gelu(b, n, g):
    x = n.input[0]

    def s(v):
        return b.scalar(v, x)

    def mul(*vs):
        out = vs[0]
        for v in vs[1:]:
            out = b.add("Mul", [out, v])
        return out

    x2 = mul(x, x)
    if _attrs(n).get("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = b.add("Tanh", [mul(x, b.add("Add", [mul(x2, s(0.044715)), s(1.0)]), s(c))])
        du = mul(b.add("Add", [mul(x2, s(3 * 0.044715)), s(1.0)]), s(c))
        d = b.add("Add", [mul(b.add("Add", [t, s(1.0)]), s(0.5)), mul(x, s(0.5), _one_minus(b, mul(t, t)), du)])
    else:
        cdf = mul(b.add("Add", [b.add("Erf", [mul(x, s(1 / math.sqrt(2.0)))]), s(1.0)]), s(0.5))
        pdf = mul(b.add("Exp", [mul(x2, s(-0.5))]), s(1 / math.sqrt(2 * math.pi)))
        d = b.add("Add", [cdf, mul(x, pdf)])
    return [b.add("Mul", [g[0], d])]


@_rule("HardSigmoid")
def _hard_sigmoid(b, n, g):
    x, y = n.input[0], n.output[0]
    inside = b.add("And", [b.add("Greater", [y, b.scalar(0.0, y)]), b.add("Less", [y, b.scalar(1.0, y)])])
    slope = b.add("Mul", [g[0], b.scalar(_attrs(n).get("alpha", 0.2), x)])
    return [b.where(inside, slope, b.scalar(0.0, x))]


@_rule("HardSwish")
def _hard_swish(b, n, g):
    x = n.input[0]
    mid = b.add("Mul", [g[0], b.add("Add", [b.add("Div", [x, b.scalar(3.0, x)]), b.scalar(0.5, x)])])
    upper = b.where(b.add("Greater", [x, b.scalar(3.0, x)]), g[0], mid)
    return [b.where(b.add("Less", [x, b.scalar(-3.0, x)]), b.scalar(0.0, x), upper)]


@_rule("Clip")
def _clip(b, n, g):
    x = n.input[0]
    if b.opset < 11:
        a = _attrs(n)
        lo = b.scalar(a["min"], x) if "min" in a else None
        hi = b.scalar(a["max"], x) if "max" in a else None
    else:
        lo = n.input[1] if len(n.input) > 1 and n.input[1] else None
        hi = n.input[2] if len(n.input) > 2 and n.input[2] else None
    mask = None
    if lo:
        mask = b.add("Not", [b.add("Less", [x, lo])])
    if hi:
        upper = b.add("Not", [b.add("Greater", [x, hi])])
        mask = b.add("And", [mask, upper]) if mask else upper
    return [b.where(mask, g[0], b.scalar(0.0, x)) if mask else g[0]]


def _softmax_axes(b, n) -> list[int]:
    axis = _attrs(n).get("axis", -1 if b.opset >= 13 else 1)
    if b.opset >= 13:
        return [axis]
    r = b.rank(n.input[0])  # opsets < 13 normalise over all trailing dims from axis on
    return list(range(axis % r, r))


@_rule("Softmax")
def _softmax(b, n, g):
    y = n.output[0]
    dot = b.reduce_sum(b.add("Mul", [g[0], y]), _softmax_axes(b, n), keepdims=1)
    return [b.add("Mul", [y, b.add("Sub", [g[0], dot])])]


@_rule("LogSoftmax")
def _log_softmax(b, n, g):
    y = n.output[0]
    total = b.reduce_sum(g[0], _softmax_axes(b, n), keepdims=1)
    return [b.add("Sub", [g[0], b.add("Mul", [b.add("Exp", [y]), total])])]


# ----------------------------------------------------------------------------- broadcasting
@_rule("Add", "Sum")
def _add(b, n, g):
    ys = b.shape(n.output[0])
    return [b.reduce_to(g[0], i, ys) if b.needs(i) else None for i in n.input]


@_rule("Mean")
def _mean(b, n, g):
    ys, gm = b.shape(n.output[0]), b.add("Div", [g[0], b.scalar(len(n.input), n.output[0])])
    return [b.reduce_to(gm, i, ys) if b.needs(i) else None for i in n.input]


@_rule("Sub")
def _sub(b, n, g):
    (a, c), ys = n.input, b.shape(n.output[0])
    return [b.reduce_to(g[0], a, ys) if b.needs(a) else None,
            b.add("Neg", [b.reduce_to(g[0], c, ys)]) if b.needs(c) else None]


@_rule("Mul")
def _mul(b, n, g):
    (a, c), ys = n.input, b.shape(n.output[0])
    return [b.reduce_to(b.add("Mul", [g[0], c]), a, ys) if b.needs(a) else None,
            b.reduce_to(b.add("Mul", [g[0], a]), c, ys) if b.needs(c) else None]


@_rule("Div")
def _div(b, n, g):
    (a, c), y, ys = n.input, n.output[0], b.shape(n.output[0])
    dc = b.add("Neg", [b.add("Div", [b.add("Mul", [g[0], y]), c])]) if b.needs(c) else None
    return [b.reduce_to(b.add("Div", [g[0], c]), a, ys) if b.needs(a) else None,
            b.reduce_to(dc, c, ys) if dc else None]


@_rule("Max", "Min")
def _max_min(b, n, g):
    if len(n.input) == 1:
        return [g[0]]
    if len(n.input) != 2:
        raise GradientUnsupported(f"{n.op_type} with {len(n.input)} inputs")
    (a, c), y, ys = n.input, n.output[0], b.shape(n.output[0])
    a_wins = b.add("Not", [b.add("Less" if n.op_type == "Max" else "Greater", [a, c])])
    zero = b.scalar(0.0, y)
    return [b.reduce_to(b.where(a_wins, g[0], zero), a, ys) if b.needs(a) else None,
            b.reduce_to(b.where(a_wins, zero, g[0]), c, ys) if b.needs(c) else None]


@_rule("Where")
def _where(b, n, g):
    (c, p, q), y, ys = n.input, n.output[0], b.shape(n.output[0])
    zero = b.scalar(0.0, y)
    return [None, b.reduce_to(b.where(c, g[0], zero), p, ys) if b.needs(p) else None,
            b.reduce_to(b.where(c, zero, g[0]), q, ys) if b.needs(q) else None]


@_rule("Expand")
def _expand(b, n, g):
    return [b.reduce_to(g[0], n.input[0], b.shape(n.output[0]))]


@_rule("Pow")
def _pow(b, n, g):
    (x, p), y, ys = n.input, n.output[0], b.shape(n.output[0])
    out = [None, None]
    if b.needs(x):
        pv = b.const_value(p)
        if pv is not None:
            pv = pv.astype(b.np_dtype(x))
            coef = b.add("Mul", [b.const(pv), b.add("Pow", [x, b.const(pv - 1)])])
        else:
            pc = b.add("Cast", [p], to=b.elem(x))
            coef = b.add("Mul", [pc, b.add("Pow", [x, b.add("Sub", [pc, b.scalar(1.0, x)])])])
        out[0] = b.reduce_to(b.add("Mul", [g[0], coef]), x, ys)
    if b.needs(p):
        out[1] = b.reduce_to(b.add("Mul", [g[0], b.add("Mul", [y, b.add("Log", [x])])]), p, ys)
    return out


# ------------------------------------------------------------------------------ linear ops
@_rule("MatMul")
def _matmul(b, n, g):
    (a, c), G = n.input, g[0]
    ys, sa, sc = _req_shape(b, n.output[0]), _req_shape(b, a), _req_shape(b, c)
    ra, rc = len(sa), len(sc)
    need_a, need_c = b.needs(a), b.needs(c)

    def t(v, r):
        return b.add("Transpose", [v], perm=list(range(r - 2)) + [r - 1, r - 2])

    if ra == 1 and rc == 1:
        return [b.add("Mul", [G, c]) if need_a else None, b.add("Mul", [G, a]) if need_c else None]
    if rc == 1:  # [..., M, K] @ [K] -> [..., M]
        gu = b.unsqueeze(G, [len(ys)])
        return [b.reduce_to(b.add("Mul", [gu, c]), a, ys + [sc[0]]) if need_a else None,
                b.reduce_to(b.add("Mul", [a, gu]), c, ys + [sa[-1]]) if need_c else None]
    if ra == 1:  # [K] @ [..., K, M] -> [..., M]
        da = dc = None
        if need_a:
            d = b.add("MatMul", [c, b.unsqueeze(G, [len(ys)])])
            da = b.reduce_to(b.squeeze(d, [rc - 1]), a, ys[:-1] + [sa[0]])
        if need_c:
            outer = b.add("Mul", [b.unsqueeze(a, [1]), b.unsqueeze(G, [len(ys) - 1])])
            dc = b.reduce_to(outer, c, ys[:-1] + [sa[0], ys[-1]])
        return [da, dc]
    return [b.reduce_to(b.add("MatMul", [G, t(c, rc)]), a, ys[:-2] + sa[-2:]) if need_a else None,
            b.reduce_to(b.add("MatMul", [t(a, ra), G]), c, ys[:-2] + sc[-2:]) if need_c else None]


@_rule("Gemm")
def _gemm(b, n, g):
    at, G = _attrs(n), g[0]
    a, w = n.input[0], n.input[1]
    c = n.input[2] if len(n.input) > 2 else ""
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = at.get("transA", 0), at.get("transB", 0)

    def gemm(p, q, t_p, t_q):
        ins = [p, q] + ([b.scalar(0.0, a)] if b.opset < 11 else [])
        return b.add("Gemm", ins, alpha=alpha, transA=t_p, transB=t_q)

    out = [None] * len(n.input)
    if b.needs(a):
        out[0] = gemm(w, G, tb, 1) if ta else gemm(G, w, 0, 1 - tb)
    if b.needs(w):
        out[1] = gemm(G, a, 1, ta) if tb else gemm(a, G, 1 - ta, 0)
    if c and b.needs(c):
        out[2] = b.reduce_to(b.add("Mul", [G, b.scalar(beta, c)]), c, b.shape(n.output[0]))
    return out


# ----------------------------------------------------------------------- windowed ops
def _kernel(b, n, w: str | None = None) -> list[int]:
    k = _attrs(n).get("kernel_shape")
    if not k and w is not None:
        ws = b.shape(w)
        k = ws[2:] if ws else None
    if not k or not all(isinstance(v, int) and v > 0 for v in k):
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: kernel shape unknown")
    return list(k)


def _window(b, n, x: str, y: str, kernel: list[int]):
    """Explicit (pads_begin, pads_end, strides, dilations) of a Conv/pool node."""
    a, nd = _attrs(n), len(kernel)
    s, d = list(a.get("strides") or [1] * nd), list(a.get("dilations") or [1] * nd)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        xs, ys = b.spatial(x), b.spatial(y)
        if xs is None or ys is None:
            raise GradientUnsupported(f"{n.op_type} {n.name!r}: auto_pad needs static spatial shapes")
        total = [max((o - 1) * st + (k - 1) * dl + 1 - i, 0) for i, o, k, st, dl in zip(xs, ys, kernel, s, d)]
        lo, hi = [t // 2 for t in total], [t - t // 2 for t in total]
        pb, pe = (lo, hi) if auto == "SAME_UPPER" else (hi, lo)
    elif auto == "VALID":
        pb, pe = [0] * nd, [0] * nd
    else:
        pads = list(a.get("pads") or [0] * (2 * nd))
        pb, pe = pads[:nd], pads[nd:]
    return pb, pe, s, d


def _scatter_windows(b, g, w, x, y, kernel, group, pb, pe, s, d) -> str:
    """ConvTranspose that sends each output window's gradient back onto the input grid,
    with the output size made exactly the input's (output_padding, or a crop)."""
    nd, xs, ys = len(kernel), b.spatial(x), b.spatial(y)
    common = dict(group=group, strides=s, dilations=d, kernel_shape=list(kernel))
    if xs is not None and ys is not None:
        op = [i + p0 + p1 - ((k - 1) * dl + 1) - st * (o - 1)
              for i, o, k, st, dl, p0, p1 in zip(xs, ys, kernel, s, d, pb, pe)]
        pe = [p1 - min(v, 0) for p1, v in zip(pe, op)]  # ceil_mode windows past the end: crop
        return b.add("ConvTranspose", [g, w], pads=pb + pe, output_padding=[max(v, 0) for v in op], **common)
    if b.opset < 10:
        raise GradientUnsupported("windowed op with dynamic spatial shape needs opset >= 10")
    ct = b.add("ConvTranspose", [g, w], pads=pb + pe, output_padding=[st - 1 for st in s], **common)
    ends = b.slice(b.add("Shape", [x]), [2], [_INT_MAX], [0])
    return b.slice(ct, [0] * nd, ends, list(range(2, 2 + nd)))


@_rule("Conv")
def _conv(b, n, g):
    x, w, y = n.input[0], n.input[1], n.output[0]
    kernel = _kernel(b, n, w)
    pb, pe, s, d = _window(b, n, x, y, kernel)
    group = _attrs(n).get("group", 1)
    wv = b.const_value(w)
    span = [(k - 1) * dl for k, dl in zip(kernel, d)]
    if wv is not None and all(v == 1 for v in s) and all(p <= sp for p, sp in zip(pb + pe, span + span)):
        # Stride 1: the input gradient is a plain Conv with the weights flipped spatially and
        # in/out channels swapped per group; onnxruntime's Conv beats its ConvTranspose.
        m, cg = wv.shape[0], wv.shape[1]
        flipped = wv.reshape((group, m // group, cg) + wv.shape[2:]).swapaxes(1, 2)
        flipped = flipped.reshape((group * cg, m // group) + wv.shape[2:])
        flipped = flipped[(slice(None),) * 2 + (slice(None, None, -1),) * len(kernel)]
        pads = [sp - p for sp, p in zip(span + span, pb + pe)]
        return [b.add("Conv", [g[0], b.const(np.ascontiguousarray(flipped))], group=group, kernel_shape=kernel,
                      pads=pads, dilations=d, strides=s)]
    return [_scatter_windows(b, g[0], w, x, y, kernel, group, pb, pe, s, d)]


@_rule("ConvTranspose")
def _conv_transpose(b, n, g):
    a, w = _attrs(n), n.input[1]
    if a.get("output_shape") or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise GradientUnsupported(f"ConvTranspose {n.name!r} with output_shape/auto_pad SAME")
    kernel = _kernel(b, n, w)
    nd = len(kernel)
    pads = list(a.get("pads") or [0] * (2 * nd)) if a.get("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * nd)
    return [b.add("Conv", [g[0], w], group=a.get("group", 1), kernel_shape=kernel, pads=pads,
                  strides=list(a.get("strides") or [1] * nd), dilations=list(a.get("dilations") or [1] * nd))]


@_rule("MaxPool")
def _maxpool(b, n, g):
    x, y, a = n.input[0], n.output[0], _attrs(n)
    if a.get("storage_order", 0):
        raise GradientUnsupported(f"MaxPool {n.name!r} with storage_order=1")
    if len(n.output) < 2:
        n.output.append(b.fresh("maxpool_indices"))
    elif not n.output[1]:
        n.output[1] = b.fresh("maxpool_indices")
    ind = n.output[1]
    kernel = _kernel(b, n)
    dil = list(a.get("dilations") or [1] * len(kernel))
    xs, ys = b.spatial(x), b.spatial(y)
    strides = list(a.get("strides") or [1] * len(kernel))
    if all((k - 1) * dl + 1 <= st for k, dl, st in zip(kernel, dil, strides)) and (
            xs is not None or (a.get("auto_pad", "NOTSET") == "NOTSET" and not a.get("ceil_mode", 0))):
        # Windows do not overlap, so no input is picked twice: MaxUnpool puts each output's
        # gradient back where its max came from (any opset). Its pads only serve to check
        # output_shape: widen them for windows that run past the end (ceil_mode).
        pb, pe, _, _ = _window(b, n, x, y, kernel)
        if xs is not None:
            pe = [max(p1, (o - 1) * st + k - p0 - i) for p0, p1, o, st, k, i in zip(pb, pe, ys, strides, kernel, xs)]
        return [b.add("MaxUnpool", [g[0], ind, b.add("Shape", [x])], kernel_shape=kernel, strides=strides,
                      pads=pb + pe)]
    if b.opset >= 16:  # scatter-add the gradients to the argmax positions (flat indices)
        size = b.add("Reshape", [b.add("Size", [x]), b.i64([1])])
        zeros = b.add("ConstantOfShape", [size], value=numpy_helper.from_array(np.zeros(1, b.np_dtype(x))))
        flat = [b.add("Reshape", [t, b.i64([-1])]) for t in (ind, g[0])]
        return [b.reshape_like(b.add("ScatterElements", [zeros] + flat, axis=0, reduction="add"), x)]
    # Older opsets have no scatter-add, and overlapping windows may pick the same input
    # twice. Exact alternative: one-hot the argmax's offset within its window (K offsets),
    # then a depthwise ConvTranspose with one-hot kernels adds every window's share back.
    if xs is None or ys is None:
        raise GradientUnsupported(f"MaxPool {n.name!r}: spatial shapes unknown (opset < 16)")
    channels, nd, k = b.shape(x)[1], len(kernel), math.prod(kernel)
    pb, pe, s, d = _window(b, n, x, y, kernel)
    pos = np.full([k] + ys, -1, np.int64)
    grids = np.meshgrid(*[np.arange(o) for o in ys], indexing="ij")
    for ai, off in enumerate(np.ndindex(*kernel)):
        coords = [grids[i] * s[i] - pb[i] + off[i] * d[i] for i in range(nd)]
        valid = np.logical_and.reduce([(c >= 0) & (c < xs[i]) for i, c in enumerate(coords)])
        flat = np.ravel_multi_index([np.clip(c, 0, xs[i] - 1) for i, c in enumerate(coords)], xs)
        pos[ai] = np.where(valid, flat, -1)
    plane = b.const(np.array(math.prod(xs), np.int64))
    in_plane = b.add("Sub", [ind, b.add("Mul", [b.add("Div", [ind, plane]), plane])])
    hit = b.add("Equal", [b.unsqueeze(in_plane, [2]), b.const(pos)])
    per_offset = b.where(hit, b.unsqueeze(g[0], [2]), b.scalar(0.0, x))
    stacked = b.add("Reshape", [per_offset, b.i64([0, channels * k] + ys)])
    onehot = np.zeros([channels * k, 1] + kernel, b.np_dtype(x))
    for c in range(channels):
        for ai, off in enumerate(np.ndindex(*kernel)):
            onehot[(c * k + ai, 0) + off] = 1
    return [_scatter_windows(b, stacked, b.const(onehot), x, y, kernel, channels, pb, pe, s, d)]


@_rule("AveragePool")
def _avgpool(b, n, g):
    x, y = n.input[0], n.output[0]
    kernel, xs, ys = _kernel(b, n), b.spatial(x), b.spatial(y)
    if xs is None or ys is None:
        raise GradientUnsupported(f"AveragePool {n.name!r}: spatial shapes unknown")
    pb, pe, s, d = _window(b, n, x, y, kernel)
    counts = np.ones(ys)
    for i in range(len(kernel)):  # in-bounds elements of each window
        p = np.arange(ys[i])[:, None] * s[i] - pb[i] + np.arange(kernel[i])[None, :] * d[i]
        counts = counts * ((p >= 0) & (p < xs[i])).sum(1).reshape([-1 if j == i else 1 for j in range(len(ys))])
    dt = b.np_dtype(x)
    # 1/divisor per window, whatever the count_include_pad/ceil_mode convention: the pool
    # of ones gives in_bounds/divisor (a constant subgraph, folded by onnxruntime).
    ones = b.const(np.ones([1, 1] + xs, dt))
    pooled = b.add("AveragePool", [ones], **_attrs(n))
    scale = b.add("Div", [pooled, b.const(np.maximum(counts, 1).reshape([1, 1] + ys).astype(dt))])
    channels = b.shape(x)[1]
    ones_k = b.const(np.ones([channels, 1] + kernel, dt))
    return [_scatter_windows(b, b.add("Mul", [g[0], scale]), ones_k, x, y, kernel, channels, pb, pe, s, d)]


@_rule("GlobalAveragePool")
def _global_avgpool(b, n, g):
    x, y = n.input[0], n.output[0]
    count = b.add("Cast", [b.add("Div", [b.add("Size", [x]), b.add("Size", [y])])], to=b.elem(x))
    return [b.add("Div", [b.add("Expand", [g[0], b.add("Shape", [x])]), count])]


@_rule("LRN")
def _lrn(b, n, g):
    x, y, a = n.input[0], n.output[0], _attrs(n)
    size, alpha, beta, bias = a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    r = b.rank(x)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    ones = b.const(np.ones([1, 1, size] + [1] * (r - 2), b.np_dtype(x)))

    def channel_window_sum(t, before, after):
        conv = b.add("Conv", [b.unsqueeze(t, [1]), ones], kernel_shape=[size] + [1] * (r - 2),
                     pads=[before] + [0] * (r - 2) + [after] + [0] * (r - 2))
        return b.squeeze(conv, [1])

    def s(v):
        return b.scalar(v, x)

    den = b.add("Add", [s(bias), b.add("Mul", [channel_window_sum(b.add("Mul", [x, x]), lo, hi), s(alpha / size)])])
    direct = b.add("Mul", [g[0], b.add("Pow", [den, s(-beta)])])
    spread = channel_window_sum(b.add("Div", [b.add("Mul", [g[0], y]), den]), hi, lo)
    cross = b.add("Mul", [x, b.add("Mul", [spread, s(2 * alpha * beta / size)])])
    return [b.add("Sub", [direct, cross])]


# --------------------------------------------------------------------------- normalisation
@_rule("BatchNormalization")
def _batchnorm(b, n, g):
    a = _attrs(n)
    if a.get("training_mode", 0) or any(gi is not None for gi in g[1:]):
        raise GradientUnsupported(f"BatchNormalization {n.name!r} in training mode")
    x, scale, var = n.input[0], n.input[1], n.input[4]
    coef = b.add("Div", [scale, b.add("Sqrt", [b.add("Add", [var, b.scalar(a.get("epsilon", 1e-5), var)])])])
    r = b.rank(x)
    if r > 2:
        coef = b.add("Reshape", [coef, b.i64([-1] + [1] * (r - 2))])
    return [b.add("Mul", [g[0], coef])]


def _normalization_grad(b, x, G, scale, axes, eps) -> str:
    """d/dx of scale * (x - mean) / sqrt(var + eps), statistics over ``axes``."""
    xc = b.add("Sub", [x, b.reduce_mean(x, axes)])
    var = b.reduce_mean(b.add("Mul", [xc, xc]), axes)
    inv = b.add("Reciprocal", [b.add("Sqrt", [b.add("Add", [var, b.scalar(eps, x)])])])
    xhat = b.add("Mul", [xc, inv])
    gs = b.add("Mul", [G, scale])
    proj = b.add("Mul", [xhat, b.reduce_mean(b.add("Mul", [gs, xhat]), axes)])
    return b.add("Mul", [inv, b.add("Sub", [b.add("Sub", [gs, b.reduce_mean(gs, axes)]), proj])])


@_rule("LayerNormalization")
def _layernorm(b, n, g):
    if any(gi is not None for gi in g[1:]):
        raise GradientUnsupported(f"LayerNormalization {n.name!r}: Mean/InvStdDev outputs used")
    a, x = _attrs(n), n.input[0]
    r = b.rank(x)
    axes = list(range(a.get("axis", -1) % r, r))
    return [_normalization_grad(b, x, g[0], n.input[1], axes, a.get("epsilon", 1e-5))]


@_rule("InstanceNormalization")
def _instancenorm(b, n, g):
    x = n.input[0]
    r = b.rank(x)
    scale = b.add("Reshape", [n.input[1], b.i64([-1] + [1] * (r - 2))])
    return [_normalization_grad(b, x, g[0], scale, list(range(2, r)), _attrs(n).get("epsilon", 1e-5))]


@_rule("ReduceMean", "ReduceSum")
def _reduce(b, n, g):
    x, y, a, G = n.input[0], n.output[0], _attrs(n), g[0]
    if b.opset >= (13 if n.op_type == "ReduceSum" else 18):
        axes = b.const_value(n.input[1]) if len(n.input) > 1 and n.input[1] else np.zeros(0)
        if axes is None:
            raise GradientUnsupported(f"{n.op_type} {n.name!r}: dynamic axes")
        axes = [int(v) for v in axes.reshape(-1)]
    else:
        axes = list(a.get("axes") or [])
    if not axes and a.get("noop_with_empty_axes", 0):
        return [G]
    if axes and not a.get("keepdims", 1):
        r = b.rank(x)
        G = b.unsqueeze(G, sorted(v % r for v in axes))
    out = b.add("Expand", [G, b.add("Shape", [x])])
    if n.op_type == "ReduceMean":
        count = b.add("Cast", [b.add("Div", [b.add("Size", [x]), b.add("Size", [y])])], to=b.elem(x))
        out = b.add("Div", [out, count])
    return [out]


# ---------------------------------------------------------------------------- data movement
@_rule("Transpose")
def _transpose(b, n, g):
    perm = _attrs(n).get("perm") or list(reversed(range(b.rank(n.input[0]))))
    return [b.add("Transpose", [g[0]], perm=[int(v) for v in np.argsort(perm)])]


@_rule("Concat")
def _concat(b, n, g):
    y = n.output[0]
    axis = _attrs(n)["axis"] % b.rank(y)
    sizes = []
    for i in n.input:
        s = b.shape(i)
        sizes.append(s[axis] if s is not None and isinstance(s[axis], int) else None)
    if all(v is not None for v in sizes):
        out, offset = [], 0
        for i, size in zip(n.input, sizes):
            out.append(b.slice(g[0], [offset], [offset + size], [axis]) if b.needs(i) else None)
            offset += size
        return out
    if b.opset < 13:
        raise GradientUnsupported(f"Concat {n.name!r}: sizes unknown (opset < 13)")
    split = b.add("Concat", [b.slice(b.add("Shape", [i]), [axis], [axis + 1], [0]) for i in n.input], axis=0)
    parts = b.add("Split", [g[0], split], n_out=len(n.input), axis=axis)
    parts = [parts] if isinstance(parts, str) else parts
    return [p if b.needs(i) else None for p, i in zip(parts, n.input)]


@_rule("Split")
def _split(b, n, g):
    axis = _attrs(n).get("axis", 0) % b.rank(n.input[0])
    parts = [gi if gi is not None else b.zeros_like(o) for gi, o in zip(g, n.output)]
    return [b.add("Concat", parts, axis=axis)]


def _scatter_back(b, n, G, repeats: bool, blank: tuple[int, ...] = ()) -> str:
    """Gradient of a pure data-movement op (Slice, Gather, Pad reflect/edge...): replay it
    on the flat element indices of its input, then scatter(-add) G to those positions."""
    if b.opset < 11 or (repeats and b.opset < 16):
        raise GradientUnsupported(f"{n.op_type} {n.name!r}: needs opset >= {16 if repeats else 11}")
    x = n.input[0]
    size = b.add("Size", [x])
    flat_ids = b.add("Range", [b.const(np.array(0, np.int64)), size, b.const(np.array(1, np.int64))])
    ins = list(n.input)
    ins[0] = b.reshape_like(flat_ids, x)
    for i in blank:
        if i < len(ins):
            ins[i] = ""
    outs = [b.fresh("replay") for _ in n.output]
    replay = helper.make_node(n.op_type, ins, outs, name=outs[0] + "/node", domain=n.domain)
    replay.attribute.extend(n.attribute)
    b.new_nodes.append(replay)
    zeros = b.add("ConstantOfShape", [b.add("Reshape", [size, b.i64([1])])],
                  value=numpy_helper.from_array(np.zeros(1, b.np_dtype(x))))
    flat = [b.add("Reshape", [t, b.i64([-1])]) for t in (outs[0], G)]
    scattered = b.add("ScatterElements", [zeros] + flat, axis=0, reduction="add" if repeats else None)
    return b.reshape_like(scattered, x)


@_rule("Slice")
def _slice(b, n, g):
    x, G = n.input[0], g[0]
    if b.opset < 10:
        a = _attrs(n)
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        params = [b.const_value(i) if i else None for i in (list(n.input[1:]) + [""] * 4)[:4]]
        dynamic = any(i and v is None for i, v in zip(n.input[1:], params))
        if dynamic:
            return [_scatter_back(b, n, G, repeats=False)]
        starts, ends, axes, steps = (None if v is None else [int(e) for e in v.reshape(-1)] for v in params)
    xs = b.shape(x)
    axes = axes if axes is not None else list(range(len(starts)))
    if xs is not None and all(v == 1 for v in (steps or [1])) and all(isinstance(xs[ax], int) for ax in axes):
        r = len(xs)
        pads = [0] * (2 * r)
        for st, en, ax in zip(starts, ends, axes):
            dim, ax = xs[ax], ax % r
            st = min(max(st + dim if st < 0 else st, 0), dim)
            en = max(min(max(en + dim if en < 0 else en, 0), dim), st)
            pads[ax], pads[r + ax] = st, dim - en
        return [b.pad(G, pads)]
    return [_scatter_back(b, n, G, repeats=False)]


@_rule("Gather")
def _gather(b, n, g):
    x, ind = n.input[0], b.const_value(n.input[1])
    s = b.shape(x)
    if ind is not None and ind.ndim == 0 and s is not None:  # x[..., i, ...]: pad the slice back
        axis = _attrs(n).get("axis", 0) % len(s)
        if isinstance(s[axis], int):
            i = int(ind) % s[axis]
            pads = [0] * (2 * len(s))
            pads[axis], pads[len(s) + axis] = i, s[axis] - 1 - i
            return [b.pad(b.unsqueeze(g[0], [axis]), pads)]
    repeats = True
    if ind is not None:
        dim = s[_attrs(n).get("axis", 0) % len(s)] if s is not None else None
        if isinstance(dim, int):
            repeats = len(np.unique(ind % dim)) != ind.size
        elif (ind >= 0).all():
            repeats = len(np.unique(ind)) != ind.size
    return [_scatter_back(b, n, g[0], repeats)]


@_rule("Pad")
def _pad(b, n, g):
    a, x, G = _attrs(n), n.input[0], g[0]
    if a.get("mode", "constant") != "constant":
        return [_scatter_back(b, n, G, repeats=True, blank=(2,))]
    axes = None
    if b.opset < 11:
        pads = a["pads"]
    else:
        pads = b.const_value(n.input[1])
        if pads is None:
            raise GradientUnsupported(f"Pad {n.name!r}: dynamic pads")
        if len(n.input) > 3 and n.input[3]:
            axes = b.const_value(n.input[3])
            if axes is None:
                raise GradientUnsupported(f"Pad {n.name!r}: dynamic axes")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    k = len(pads) // 2
    if axes is None:
        axes = list(range(k))
    else:
        axes = [int(v) % b.rank(x) for v in np.asarray(axes).reshape(-1)]
    crop = [(ax, max(p0, 0), max(p1, 0)) for ax, p0, p1 in zip(axes, pads[:k], pads[k:]) if p0 > 0 or p1 > 0]
    out = G
    if crop:  # what the forward padded: slice it off
        out = b.slice(out, [c[1] for c in crop], [-c[2] if c[2] else _INT_MAX for c in crop], [c[0] for c in crop])
    if any(p < 0 for p in pads):  # what the forward cropped: zero-pad it back
        r = b.rank(x)
        back = [0] * (2 * r)
        for ax, p0, p1 in zip(axes, pads[:k], pads[k:]):
            back[ax], back[r + ax] = max(-p0, 0), max(-p1, 0)
        out = b.pad(out, back)
    return [out]
