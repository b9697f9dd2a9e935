"""BatchNorm statistics re-estimated on the pruned model.

Pruning moves what every BatchNorm sees: removed channels take their share of a layer's
output variance with them, compensation adds back a regression's smaller share, and the
normalised outputs shrink and drift, layer after layer. The planning inputs were distilled
to give the *original* model its running statistics at every BatchNorm (or are the user's
``--calibration`` samples); re-estimating each BatchNorm's mean and variance on the pruned
model's own activations for those inputs puts its outputs back on the scale the layers
after it were trained for. EagleEye (Li et al., 2020) re-estimates on training batches to
rank pruned candidates; here it is the last step of the rewrite, on the inversion's inputs.

Only where those inputs do stand for real ones at the BatchNorms: a calibration set, or an
inversion that gives the original model about its running statistics (:data:`MAX_MISMATCH`);
a short inversion of a large model does not, and re-estimating on it mis-scales the model.

BatchNorms are updated in dependency order, a *level* at a time (a level: the BatchNorms
whose upstream BatchNorms are all updated), each level measured in one pass over the
inputs through one session, the statistics as its inputs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ir import Model, make_batch_dynamic, session, to_model

logger = logging.getLogger(__name__)

#: Samples per run.
CHUNK = 32
#: Re-estimate only where the planning inputs give the original model about its running
#: statistics (:func:`mismatch`): the digits nets' converged inversions measure 0.005-0.016,
#: a 224x224 page classifier's 20-step one 0.155 (re-estimated, it went from 8/8 pages right
#: to 5/8), a text-line classifier's 0.031 (output cosine 0.740 -> 0.721).
MAX_MISMATCH = 0.02


def batchnorms(graph: gs.Graph) -> list[gs.Node]:
    """The inference BatchNorms whose statistics are constants."""
    return [n for n in graph.nodes if n.op == "BatchNormalization" and len(n.inputs) >= 5
            and all(isinstance(t, gs.Constant) for t in n.inputs[1:5]) and not n.attrs.get("training_mode", 0)]


def dependency_levels(graph: gs.Graph, nodes: list[gs.Node]) -> list[list[gs.Node]]:
    """``nodes`` by level: 1 + the highest level among the ``nodes`` upstream of each
    (``graph`` toposorted, as the analysis and the rewrite leave it)."""
    wanted = {id(n) for n in nodes}
    level: dict[str, int] = {}
    out: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        up = max((level.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in wanted:
            up += 1
            out.setdefault(up, []).append(node)
        for t in node.outputs:
            level[t.name] = up
    return [out[k] for k in sorted(out)]


class _Reader:
    """One session over a copy of ``graph`` that returns the inputs of its BatchNorms
    ``nodes``, their statistics fed as inputs (:attr:`stats`, the graph's own to begin
    with), and the per-channel moments of those inputs over ``inputs``, in runs of a
    multiple of ``batch`` samples."""

    def __init__(self, graph: gs.Graph, template: Model, nodes: list[gs.Node], inputs: dict[str, np.ndarray],
                 batch: int):
        g = graph.copy()
        by_name = {n.name: n for n in g.nodes}
        self.stats: dict[str, np.ndarray] = {}
        self.reads: dict[str, str] = {}
        for k, node in enumerate(nodes):
            twin = by_name[node.name]
            for slot, kind in ((3, "mean"), (4, "var")):
                values = node.inputs[slot].values
                twin.inputs[slot] = gs.Variable(_stat_name(kind, k), dtype=values.dtype, shape=list(values.shape))
                g.inputs.append(twin.inputs[slot])
                self.stats[_stat_name(kind, k)] = values
            self.reads[node.name] = twin.inputs[0].name
        self.session = reading_session(g, template, sorted(set(self.reads.values())))
        self.inputs, self.batch = inputs, batch

    def moments(self, nodes: list[gs.Node]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each node's input mean and (biased) variance per channel (axis 1), by node name."""
        names = sorted({self.reads[n.name] for n in nodes})
        sums: dict[str, tuple] = {}
        for run in in_runs(self.inputs, self.batch):
            for name, v in zip(names, self.session.run(names, {**run, **self.stats})):
                x = v.astype(np.float64)
                axes = (0, *range(2, x.ndim))
                found = (x.sum(axis=axes), (x * x).sum(axis=axes), x.size / x.shape[1])
                sums[name] = found if name not in sums else tuple(a + b for a, b in zip(sums[name], found))
        out = {}
        for node in nodes:
            s, ss, n = sums[self.reads[node.name]]
            mean = s / n
            out[node.name] = (mean, np.maximum(ss / n - mean**2, 0.0))
        return out


def reading_session(graph: gs.Graph, template: Model, names: list[str]):
    """A session over ``graph`` (changed: its outputs), batch left open, that also returns the
    tensors ``names``."""
    tensors = graph.tensors()
    extra = []
    for name in dict.fromkeys(names):
        t = tensors[name]
        t.dtype = t.dtype or np.float32
        if t not in graph.outputs:
            extra.append(t)
    graph.outputs = list(graph.outputs) + extra
    model = to_model(graph, template, hold=True)  # a large model's weights are not copied again
    make_batch_dynamic(model)
    return session(model)


def in_runs(inputs: dict[str, np.ndarray], batch: int):
    """``inputs`` (samples stacked on the first axis) in runs of CHUNK samples, a multiple of
    ``batch`` (all of them in one run where there are fewer)."""
    count = len(next(iter(inputs.values())))
    chunk = max(batch, batch * (CHUNK // max(batch, 1)))
    for start in range(0, count - chunk + 1 if count >= chunk else 1, chunk):
        yield {k: v[start:start + chunk] for k, v in inputs.items()}


def _stat_name(kind: str, k: int) -> str:
    return f"onnxprune_recal_{kind}_{k}"


def mismatch(graph: gs.Graph, template: Model, inputs: dict[str, np.ndarray], batch: int = 1) -> float | None:
    """How far ``graph``'s BatchNorm inputs on ``inputs`` are from its running statistics: the
    mean over BatchNorms of the inversion's own measure, ``((m - rm)^2 + (s - sqrt(rv))^2) / rv``
    averaged over channels. None without BatchNorms, or where the model does not run the inputs
    in chunks."""
    nodes = batchnorms(graph)
    if not nodes:
        return None
    try:
        found = _Reader(graph, template, nodes, inputs, batch).moments(nodes)
    except Exception as exc:  # noqa: BLE001 - a model that does not run the inputs in chunks
        logger.info("BatchNorm statistics not compared: %s", str(exc).splitlines()[0])
        return None
    terms = []
    for node in nodes:
        m, var = found[node.name]
        rm, rv = node.inputs[3].values.astype(np.float64), np.maximum(node.inputs[4].values.astype(np.float64), 1e-6)
        terms.append(float(np.mean(((m - rm) ** 2 + (np.sqrt(var) - np.sqrt(rv)) ** 2) / rv)))
    return float(np.mean(terms))


#: Ops with weights: what reaches a BatchNorm through one of them is that layer's doing.
_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def refitted_inputs(graph: gs.Graph, fitted: set[str]) -> set[str]:
    """The BatchNorms of ``graph`` whose input comes from layers re-fitted to the original's
    outputs (``fitted``, node names; :mod:`onnxprune.evidence.refit`) and the graph's inputs
    alone, through ops without weights (activations, pooling, Add, Concat...): they see
    about what the original's saw, so their statistics stand."""
    settled: dict[str, bool] = {}  # by tensor; graph inputs and constants are
    for node in graph.nodes:  # toposorted
        reads = [t.name for t in node.inputs if isinstance(t, gs.Variable)]
        if node.op == "BatchNormalization":
            ok = settled.get(reads[0], True) if reads else True
        elif node.op in _LAYERS and not any(isinstance(t, gs.Variable) for t in node.inputs[1:]):
            ok = node.name in fitted
        else:
            ok = all(settled.get(name, True) for name in reads)
        for t in node.outputs:
            settled[t.name] = ok
    return {n.name for n in batchnorms(graph) if settled.get(n.inputs[0].name, True)}


def recalibrate(graph: gs.Graph, template: Model, inputs: dict[str, np.ndarray], batch: int = 1,
                skip: set[str] = frozenset()) -> int:
    """In place: each BatchNorm of ``graph`` (toposorted) but those named in ``skip`` takes the
    mean and variance its input has on ``inputs`` (samples stacked on the first axis, runs a
    multiple of ``batch`` samples), those upstream of it already updated. Returns how many were
    updated; 0 (and ``graph`` untouched) where the model cannot run the inputs in chunks."""
    nodes = [n for n in batchnorms(graph) if n.name not in skip]
    if not nodes or len({n.name for n in nodes}) < len(nodes):
        return 0
    try:
        reader = _Reader(graph, template, nodes, inputs, batch)
        index = {id(n): k for k, n in enumerate(nodes)}
        for level in dependency_levels(graph, nodes):  # one pass measures a level; its statistics feed the next
            found = reader.moments(level)
            for node in level:
                mean, var = found[node.name]
                k = index[id(node)]
                reader.stats[_stat_name("mean", k)] = mean.astype(node.inputs[3].values.dtype)
                reader.stats[_stat_name("var", k)] = var.astype(node.inputs[4].values.dtype)
    except Exception as exc:  # noqa: BLE001 - a model that does not run the inputs in chunks: leave it
        logger.info("BatchNorm statistics not re-estimated: %s", str(exc).splitlines()[0])
        return 0
    for k, node in enumerate(nodes):  # new constants: the rewrite may share equal ones between nodes
        node.inputs[3] = gs.Constant(f"{node.name}_recalibrated_mean", reader.stats[_stat_name("mean", k)])
        node.inputs[4] = gs.Constant(f"{node.name}_recalibrated_var", reader.stats[_stat_name("var", k)])
    return len(nodes)
