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


def _levels(graph: gs.Graph, nodes: list[gs.Node]) -> list[list[gs.Node]]:
    """``nodes`` by level: 1 + the highest level among the BatchNorms upstream of each."""
    wanted = {id(n) for n in nodes}
    level: dict[str, int] = {}
    out: dict[int, list[gs.Node]] = {}
    for node in _ordered(graph):
        up = max((level.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in wanted:
            up += 1
            out.setdefault(up, []).append(node)
        for t in node.outputs:
            level[t.name] = up
    return [out[k] for k in sorted(out)]


def _ordered(graph: gs.Graph) -> list[gs.Node]:
    """The nodes, producers first (Kahn's order; the graph is left as it is)."""
    producer = {id(t): k for k, n in enumerate(graph.nodes) for t in n.outputs}
    waits = [{producer[id(t)] for t in n.inputs if id(t) in producer} - {k} for k, n in enumerate(graph.nodes)]
    users: dict[int, list[int]] = {}
    for k, deps in enumerate(waits):
        for d in deps:
            users.setdefault(d, []).append(k)
    ready = [k for k, deps in enumerate(waits) if not deps]
    order = []
    while ready:
        k = ready.pop()
        order.append(graph.nodes[k])
        for u in users.get(k, ()):
            waits[u].discard(k)
            if not waits[u]:
                ready.append(u)
    return order


def _chunks(count: int, batch: int) -> tuple[int, range]:
    chunk = max(batch, batch * (CHUNK // max(batch, 1)))
    return chunk, range(0, count - chunk + 1 if count >= chunk else 1, chunk)


def _accumulate(sums: dict, names: list[str], values: list[np.ndarray]) -> None:
    """Per-channel sum, sum of squares and count of each named tensor (channels on axis 1)."""
    for name, v in zip(names, values):
        axes = (0, *range(2, v.ndim))
        x = v.astype(np.float64)
        moments = (x.sum(axis=axes), (x * x).sum(axis=axes), x.size / x.shape[1])
        sums[name] = moments if sums.get(name) is None else tuple(a + b for a, b in zip(sums[name], moments))


def mismatch(graph: gs.Graph, template: Model, inputs: dict[str, np.ndarray], batch: int = 1) -> float | None:
    """How far ``graph``'s BatchNorm inputs on ``inputs`` are from its running statistics: the
    mean over BatchNorms of the inversion's own measure, ``((m - rm)^2 + (s - sqrt(rv))^2) / rv``
    averaged over channels. None without BatchNorms, or where the model does not run the inputs
    in chunks."""
    nodes = batchnorms(graph)
    if not nodes:
        return None
    g = graph.copy()
    reads = {n.name: n.inputs[0] for n in g.nodes if n.name in {m.name for m in nodes}}
    for t in reads.values():
        t.dtype = t.dtype or np.float32
    g.outputs = list(g.outputs) + list({id(t): t for t in reads.values()}.values())
    model = to_model(g, template, hold=True)
    make_batch_dynamic(model)
    names = sorted({t.name for t in reads.values()})
    sums: dict = {}
    try:
        sess = session(model)
        chunk, starts = _chunks(len(next(iter(inputs.values()))), batch)
        for start in starts:
            _accumulate(sums, names, sess.run(names, {k: v[start:start + chunk] for k, v in inputs.items()}))
    except Exception as exc:  # noqa: BLE001 - a model that does not run the inputs in chunks
        logger.info("BatchNorm statistics not compared: %s", str(exc).splitlines()[0])
        return None
    terms = []
    for node in nodes:
        s, ss, n = sums[node.inputs[0].name]
        m = s / n
        sd = np.sqrt(np.maximum(ss / n - m**2, 0.0))
        rm, rv = node.inputs[3].values.astype(np.float64), np.maximum(node.inputs[4].values.astype(np.float64), 1e-6)
        terms.append(float(np.mean(((m - rm) ** 2 + (sd - np.sqrt(rv)) ** 2) / rv)))
    return float(np.mean(terms))


def recalibrate(graph: gs.Graph, template: Model, inputs: dict[str, np.ndarray], batch: int = 1) -> int:
    """In place: each BatchNorm of ``graph`` takes the mean and variance its input has on
    ``inputs`` (samples stacked on the first axis, runs a multiple of ``batch`` samples).
    Returns how many were updated; 0 (and ``graph`` untouched) where the model cannot run the
    inputs in chunks."""
    nodes = batchnorms(graph)
    if not nodes or len({n.name for n in nodes}) < len(nodes):
        return 0
    chunk, starts = _chunks(len(next(iter(inputs.values()))), batch)
    g = graph.copy()
    by_name = {n.name: n for n in g.nodes}
    feeds, reads = {}, {}
    for k, node in enumerate(nodes):
        twin = by_name[node.name]
        for slot, kind in ((3, "mean"), (4, "var")):
            const = node.inputs[slot]
            name = f"onnxprune_recal_{kind}_{k}"
            twin.inputs[slot] = gs.Variable(name, dtype=const.values.dtype, shape=list(const.values.shape))
            g.inputs.append(twin.inputs[slot])
            feeds[name] = const.values
        x = twin.inputs[0]
        x.dtype = x.dtype or np.float32
        reads[node.name] = x
    g.outputs = list(g.outputs) + list({id(t): t for t in reads.values()}.values())
    model = to_model(g, template, hold=True)  # a large model's weights are not copied again
    make_batch_dynamic(model)
    try:
        sess = session(model)
        for level in _levels(graph, nodes):
            names = [reads[n.name].name for n in level]
            sums: dict = {}
            for start in starts:
                run = {k: v[start:start + chunk] for k, v in inputs.items()}
                _accumulate(sums, names, sess.run(names, {**run, **feeds}))
            for node in level:
                s, ss, n = sums[reads[node.name].name]
                mean = s / n
                var = np.maximum(ss / n - mean**2, 0.0)
                k = nodes.index(node)
                feeds[f"onnxprune_recal_mean_{k}"] = mean.astype(node.inputs[3].values.dtype)
                feeds[f"onnxprune_recal_var_{k}"] = var.astype(node.inputs[4].values.dtype)
    except Exception as exc:  # noqa: BLE001 - a model that does not run the inputs in chunks: leave it
        logger.info("BatchNorm statistics not re-estimated: %s", str(exc).splitlines()[0])
        return 0
    for k, node in enumerate(nodes):  # new constants: the rewrite may share equal ones between nodes
        node.inputs[3] = gs.Constant(f"{node.name}_recalibrated_mean", feeds[f"onnxprune_recal_mean_{k}"])
        node.inputs[4] = gs.Constant(f"{node.name}_recalibrated_var", feeds[f"onnxprune_recal_var_{k}"])
    return len(nodes)
