"""A latency model of onnxruntime's CPU provider on this machine, calibrated in seconds.

A run of a model costs ``session + per_io_element * (elements of its inputs and outputs)``
(the run call, and copying what goes in and out) plus, for every node onnxruntime still
executes, ``overhead + per_mac * MACs + per_element * elements + per_weight * weights`` of its
class, where ``elements`` counts the activations the node reads and writes and ``weights``
the elements of its constant operands (a batch-1 Gemm is bound by reading them). The
coefficients come from timing chains of one op (Conv, depthwise Conv, Gemm, pooling,
normalisation, elementwise, reshape) at a few widths on this machine, fitted by non-negative
least squares on relative error; the fit describes the machine, not a model, so it is made
once per process and thread count (:func:`calibrate`) and kept in memory only.

What onnxruntime does not execute costs nothing: constant subgraphs (it folds them when the
session is made) and the ops it fuses into the Conv or Gemm before them (BatchNorm, the
common activations, and a residual Add into an NCHWc convolution, see :data:`FUSES_INTO`).
Every coefficient is non-negative, so the cost of a node never falls as a channel count grows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ir import (
    Model,
    OpChain,
    Shape,
    import_graph,
    interleaved_medians,
    node_macs,
    resolve_shapes,
    session,
)

logger = logging.getLogger(__name__)

CLASSES = ("conv", "grouped", "gemm", "pool", "norm", "elementwise", "view")
#: Ops that only relabel their input's memory (no elements are moved).
VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum"}
NORMS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax",
         "LogSoftmax", "LRN", "SkipLayerNormalization", "SimplifiedLayerNormalization"}
#: The ops onnxruntime's CPU provider fuses into a producer of these types whose output they
#: alone read (its graph optimisations, checked against the optimised models of models/).
FUSES_INTO = {
    "BatchNormalization": {"Conv"},
    "Relu": {"Conv", "Gemm"}, "LeakyRelu": {"Conv", "Gemm"}, "Clip": {"Conv"}, "Sigmoid": {"Conv"},
    "Tanh": {"Conv"}, "HardSigmoid": {"Conv"}, "HardSwish": {"Conv"},
    "Add": {"Conv"},  # an NCHWc convolution sums the residual into its output
}
#: Seconds of interleaved runs the calibration chains share.
CALIBRATION_SECONDS = 2.0
#: Chains timed together (interleaved), so that load on the machine falls on them alike.
CALIBRATION_BATCH = 8
#: Seconds of interleaved runs of the original and the pruned model, per thread count.
MEASURE_SECONDS = 1.0


@dataclass
class NodeFeatures:
    """What one executed node costs in: its class, its MACs, the activations it moves."""

    node: gs.Node
    kind: str
    macs: int
    #: (tensor name, elements) of every activation it reads or writes (views move none).
    tensors: list[tuple[str, int]] = field(default_factory=list)
    #: Elements of its constant operands (Conv, Gemm and MatMul only).
    weights: int = 0


@dataclass
class OpCost:
    """Microseconds: per executed node, per multiply-accumulate, per activation element, per
    weight element."""

    overhead: float
    per_mac: float
    per_element: float
    per_weight: float


@dataclass
class LatencyCalibration:
    """The fitted cost of a run at ``threads`` intra-op threads (0: onnxruntime's default, all
    cores), and how well the fit explains the chains it was fitted on."""

    threads: int
    session_us: float
    per_io_element: float
    ops: dict[str, OpCost]
    chains: int
    #: Median and worst |predicted - measured| / measured over the calibration chains.
    median_error: float
    worst_error: float
    seconds: float

    def node_us(self, f: NodeFeatures) -> float:
        c = self.ops[f.kind]
        return c.overhead + c.per_mac * f.macs + c.per_element * sum(n for _, n in f.tensors) + c.per_weight * f.weights

    def run_us(self, graph: gs.Graph, shapes: dict[str, Shape]) -> float:
        """The cost of the run call itself: the session's, and copying inputs and outputs."""
        io = sum(_numel(shapes.get(t.name)) for t in (*graph.inputs, *graph.outputs))
        return self.session_us + self.per_io_element * io

    def to_dict(self) -> dict:
        return asdict(self)


def node_class(node: gs.Node) -> str:
    if node.op in ("Conv", "ConvTranspose"):
        return "grouped" if int(node.attrs.get("group", 1)) > 1 else "conv"
    if node.op in ("Gemm", "MatMul"):
        return "gemm"
    for kind, ops in (("view", VIEWS), ("pool", POOLS), ("norm", NORMS)):
        if node.op in ops:
            return kind
    return "elementwise"


def _numel(shape: Shape | None) -> int:
    return int(np.prod(shape)) if shape and all(isinstance(d, int) for d in shape) else 0


def _folded(graph: gs.Graph, shapes: dict[str, Shape]) -> set[str]:
    """Tensors onnxruntime computes once, when the session is made: constants, what is
    computed from them alone, and the shapes of tensors whose shape is static."""
    done = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant) or not name}
    for node in graph.nodes:
        static = node.op == "Shape" and node.inputs and _numel(shapes.get(node.inputs[0].name)) > 0
        if static or (node.inputs and all(t.name in done for t in node.inputs)) or node.op == "Constant":
            done.update(t.name for t in node.outputs)
    return done


def _fused(graph: gs.Graph) -> set[int]:
    """ids of the nodes that ride on the Conv or Gemm before them (:data:`FUSES_INTO`)."""
    root: dict[int, str] = {}  # node id -> the op type it is fused into
    for node in graph.nodes:
        into = FUSES_INTO.get(node.op)
        if not into:
            continue
        for t in node.inputs:
            producer = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
            if producer is None or len(t.outputs) != 1:
                continue
            kind = root.get(id(producer), producer.op)
            if kind in into:
                root[id(node)] = kind
                break
    return set(root)


def node_features(graph: gs.Graph, shapes: dict[str, Shape]) -> list[NodeFeatures]:
    """The features of every node onnxruntime executes (folded and fused nodes left out)."""
    folded, fused = _folded(graph, shapes), _fused(graph)
    out = []
    for node in graph.nodes:
        if id(node) in fused or all(t.name in folded for t in node.outputs):
            continue
        kind = node_class(node)
        macs = weights = 0
        if kind in ("conv", "grouped", "gemm"):
            trans_a = bool(node.op == "Gemm" and node.attrs.get("transA", 0))
            macs = node_macs(node.op, [shapes.get(t.name) for t in node.inputs[:2]],
                             shapes.get(node.outputs[0].name), trans_a) or 0
            weights = sum(_numel(shapes.get(t.name) or t.shape) for t in node.inputs[1:2] if t.name in folded)
        tensors = [] if kind == "view" else [
            (t.name, _numel(shapes.get(t.name))) for t in (*node.inputs, *node.outputs)
            if t.name and t.name not in folded]
        out.append(NodeFeatures(node, kind, macs, tensors, weights))
    return out


def predict_us(graph: gs.Graph, shapes: dict[str, Shape], calibration: LatencyCalibration) -> float:
    """Predicted microseconds of one run of ``graph`` at ``shapes``."""
    return calibration.run_us(graph, shapes) + sum(calibration.node_us(f) for f in node_features(graph, shapes))


def _chains() -> list[OpChain]:
    """Chains of one op at the widths small and mid-sized CNNs and transformers use; lengths
    1 and 3 of the same op separate the run's cost from the node's."""
    chains = []
    for c, hw, k in ((8, 8, 3), (16, 16, 3), (32, 16, 3), (64, 16, 3), (32, 32, 3), (128, 8, 3), (64, 28, 3),
                     (16, 16, 1), (64, 16, 1), (256, 8, 1), (128, 28, 1)):
        for length in (1, 3):
            chains.append(OpChain("Conv", (1, c, hw, hw), length, (c, c, k, k), attrs={"pads": [k // 2] * 4}))
    for c, hw in ((16, 16), (64, 16), (256, 8), (32, 32), (128, 28)):
        for length in (1, 3):
            chains.append(OpChain("Conv", (1, c, hw, hw), length, (c, 1, 3, 3), attrs={"pads": [1] * 4, "group": c}))
    for rows, k in ((1, 64), (1, 256), (1, 1024), (16, 64), (64, 128), (196, 256)):
        for length in (1, 3):
            chains.append(OpChain("MatMul", (rows, k), length, (k, k)))
    for elems in ((1, 16), (16, 1024), (64, 4096), (64, 16384)):
        chains.append(OpChain("Relu", elems, 1))
        chains.append(OpChain("Relu", elems, 8))
        chains.append(OpChain("Add", elems, 3, binary=True))
        chains.append(OpChain("Flatten", elems, 8, attrs={"axis": 1}))
    for c, hw in ((16, 16), (64, 16), (64, 32)):
        chains.append(OpChain("MaxPool", (1, c, hw, hw), 3, attrs={"kernel_shape": [3, 3], "pads": [1] * 4}))
        chains.append(OpChain("BatchNormalization", (1, c, hw, hw), 3, (c,), extra=((c,), (c,), (c,))))
        chains.append(OpChain("GlobalAveragePool", (1, c, hw, hw), 1))
    for rows, k in ((16, 64), (64, 128), (196, 256)):
        chains.append(OpChain("LayerNormalization", (rows, k), 3, (k,), extra=((k,),), attrs={"axis": -1}))
        chains.append(OpChain("Softmax", (rows, k), 3, attrs={"axis": -1}))
    return chains


#: Columns of the regression before the per-class ones: the run, its input and output elements.
_RUN_COLUMNS = 2


def _design(graph: gs.Graph, shapes: dict[str, Shape]) -> np.ndarray:
    """One row of the regression: the run and what it copies in and out, then per class its
    nodes, MACs, activation elements and weight elements."""
    row = np.zeros(_RUN_COLUMNS + 4 * len(CLASSES))
    row[0] = 1.0
    row[1] = sum(_numel(shapes.get(t.name)) for t in (*graph.inputs, *graph.outputs))
    for f in node_features(graph, shapes):
        i = _RUN_COLUMNS + 4 * CLASSES.index(f.kind)
        row[i:i + 4] += (1.0, f.macs, sum(n for _, n in f.tensors), f.weights)
    return row


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson and Hanson's active set)."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(3 * n):
        w = a.T @ (b - a @ x)
        if passive.all() or np.max(np.where(passive, -np.inf, w)) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > tol):
                break
            neg = passive & (z <= tol)
            alpha = float(np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300)))
            x = x + alpha * (z - x)
            passive &= x > tol
        x = z
    return x


@lru_cache(maxsize=4)
def calibrate(threads: int = 0, seconds: float = CALIBRATION_SECONDS) -> LatencyCalibration:
    """Time the calibration chains (interleaved, medians) and fit the cost of each class."""
    t0 = time.perf_counter()
    chains, rows, measured = _chains(), [], []
    models = [chain.model() for chain in chains]
    for chain, (model, _) in zip(chains, models):
        rows.append(_design(import_graph(model), resolve_shapes(model, {"x": chain.shape})))
    # a few sessions at a time: every live session of several threads keeps a pool of workers
    for i in range(0, len(models), CALIBRATION_BATCH):
        batch = models[i:i + CALIBRATION_BATCH]
        runs = [(session(model, threads), feed) for model, feed in batch]
        measured.extend(interleaved_medians(runs, seconds * len(batch) / len(models)))
    measured = np.array(measured) * 1e6
    design = np.array(rows)
    weighted = design / measured[:, None]  # relative error: a 10 us chain counts as much as a 1 ms one
    scale = np.maximum(np.abs(weighted).max(axis=0), 1e-30)
    coef = nnls(weighted / scale, np.ones(len(measured))) / scale
    errors = np.abs(design @ coef - measured) / measured
    ops = {kind: OpCost(*map(float, coef[_RUN_COLUMNS + 4 * i: _RUN_COLUMNS + 4 * i + 4]))
           for i, kind in enumerate(CLASSES)}
    found = LatencyCalibration(threads, float(coef[0]), float(coef[1]), ops, len(chains), float(np.median(errors)),
                               float(errors.max()), time.perf_counter() - t0)
    logger.info("latency calibration (%d threads): %d chains, median error %.1f%%, worst %.1f%%, %.1f s",
                threads, len(chains), 100 * found.median_error, 100 * found.worst_error, found.seconds)
    return found


def channel_block() -> int:
    """The channel block onnxruntime's NCHWc convolutions compute in on this CPU: 16 with
    AVX-512, else 8. A convolution whose channel counts are off the block runs in plain NCHW
    with reorders around it, which can be slower than the unpruned model (bench/latency.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


@dataclass
class MeasuredLatency:
    """Medians of interleaved runs of the original and the pruned model, in milliseconds."""

    threads: int
    before_ms: float
    after_ms: float

    @property
    def share(self) -> float:
        return self.after_ms / self.before_ms


def measure(original: Model, pruned: Model, feed: dict[str, np.ndarray], threads: int,
            seconds: float = MEASURE_SECONDS) -> MeasuredLatency:
    """Time both models on the same feed, interleaved."""
    before, after = interleaved_medians([(session(original, threads), feed), (session(pruned, threads), feed)], seconds)
    return MeasuredLatency(threads, before * 1e3, after * 1e3)


@dataclass
class LatencyCheck:
    """A latency target checked: the share the plan's cost model predicted, and the shares
    measured at one thread, at all threads, and at the threads planned for."""

    threads: int
    predicted_share: float | None
    measured: list[MeasuredLatency]
    #: How the cost model was made (passes.latency.LatencyFit as a dict), when it was.
    fit: dict | None = None

    @property
    def share(self) -> float:
        """The measured share at the threads planned for."""
        return next(m.share for m in self.measured if m.threads == self.threads)

    def to_dict(self) -> dict:
        return {**asdict(self), "measured": [{**asdict(m), "share": m.share} for m in self.measured]}


__all__ = ["CLASSES", "LatencyCalibration", "LatencyCheck", "MeasuredLatency", "NodeFeatures", "OpCost", "calibrate",
           "channel_block", "measure", "nnls", "node_class", "node_features", "predict_us"]
