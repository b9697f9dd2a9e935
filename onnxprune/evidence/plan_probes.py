"""Plan probes: score whole pruning plans (every group at once), one plan per batch row.

:class:`~onnxprune.evidence.probes.ProbeModel` scores one removal (and one merge) per group per
row. A plan that removes many units with pair merges is, at every consumer input, a
substitution channel by channel: channel ``c`` reads ``gain_c * x[index_c] + offset_c``.
Kept channels read themselves (index ``c``, gain 1, offset 0); a removed channel merged into
kept ``v`` with scale ``s`` reads ``s * x_v + mean_c - s * mean_v`` (what the consumer computes
once its weights for ``v`` absorbed ``s`` times those for ``c`` and its bias the rest); a removed
channel without a merge reads its mean. Each consumer space gets three inputs ``[N, C]``
(index, gain, offset) and a GatherElements over its channel axis, so one session, built once,
runs any number of plans side by side: row ``r`` is probe sample ``r % P`` under plan ``r // P``.

With least-squares reconstruction a removed channel reads the estimate from every kept channel,
``mu_r + B_r (x_K - mu_K)``: the ``estimated`` spaces (channels on axis 1 or last) get one
``[C, C]`` matrix ``M`` and an offset ``c`` per plan (not per sample: ``x' = M x + c`` over the
plan's probe samples, a batched MatMul), kept channels reading themselves.

Variance compensation lowers the running variance of a BatchNorm downstream of a consumer
(:mod:`onnxprune.passes.reconstruct`), which scales that BatchNorm's output around its shift:
``y' = beta + (y - beta) sqrt((var + eps) / (var' + eps))``. Every BatchNorm output named in
``rescaled`` gets a gain and an offset input ``[N, C]`` for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.depgraph import ChannelGroup
from onnxprune.evidence.probes import consumer_nodes, probe_output
from onnxprune.ir import Model, ModelEditor, make_batch_dynamic, session

#: GatherElements, what a plan row needs, came with opset 11.
MIN_OPSET = 11
#: Bytes of mixing matrices one run may feed: a wide model's [C, C] per estimated space per
#: plan adds up (resnet50: about 200 MB a plan), so its runs take fewer plans.
MIX_BYTES = 2**28

Space = tuple[str, int]


@dataclass
class Substitution:
    """What every channel of one space reads: ``gain * x[index] + offset`` (see the module
    docstring; BatchNorm outputs use gain and offset only)."""

    index: np.ndarray   # int64 [C]
    gain: np.ndarray    # [C]
    offset: np.ndarray  # [C]

    @classmethod
    def identity(cls, channels: int) -> Substitution:
        return cls(np.arange(channels, dtype=np.int64), np.ones(channels), np.zeros(channels))


@dataclass
class Mixing:
    """What the channels of an estimated space read: ``matrix @ x + offset``."""

    matrix: np.ndarray  # [C, C]
    offset: np.ndarray  # [C]

    @classmethod
    def identity(cls, channels: int) -> Mixing:
        return cls(np.eye(channels), np.zeros(channels))


def estimable(axis: int, rank: int) -> bool:
    """Whether a space can take a mixing matrix: channels on axis 1, or last."""
    return rank >= 2 and (axis == 1 or axis == rank - 1)


class PlanProbe:
    """A session over the model with a substitution in front of every consumer of ``groups``."""

    def __init__(self, graph: gs.Graph, template: Model, groups: list[ChannelGroup], shapes: dict,
                 inputs: dict[str, np.ndarray], max_batch: int = 2048, rescaled: list[str] = (),
                 estimated: list[Space] = ()):
        consumers: dict[Space, set[str]] = {}
        for g in groups:
            for space, names in consumer_nodes(g).items():
                consumers.setdefault(space, set()).update(names)
        self.estimated = sorted(s for s in estimated if s in consumers and estimable(s[1], len(shapes[s[0]])))
        self.gathered = sorted(set(consumers) - set(self.estimated))
        self.rescaled = [(t, 1) for t in sorted(rescaled)]
        self.spaces = sorted(set(consumers) | set(self.rescaled))
        self.channels = {s: int(shapes[s[0]][s[1]]) for s in self.spaces}
        self.probes = len(next(iter(inputs.values())))
        edit = ModelEditor.from_graph(graph.copy(), template)
        self.output = probe_output(edit)
        b = edit.emitter("onnxprune_plan_{n}")
        renamed = {}
        for tensor, _ in self.rescaled:  # first: a consumer may read a rescaled output
            users = [n.name for n in edit.nodes() if tensor in n.inputs]
            gain, offset = self._inputs(edit, b, (tensor, 1), len(shapes[tensor]), "norm")
            renamed[tensor] = b.add("Add", [b.add("Mul", [tensor, gain]), offset])
            for node in users:
                edit.replace_input(node, tensor, renamed[tensor])
        for space in self.gathered + self.estimated:
            source = renamed.get(space[0], space[0])
            if space in self.estimated:
                x = self._mix(edit, b, space, source, shapes[space[0]])
            else:
                index, gain, offset = self._inputs(edit, b, space, len(shapes[space[0]]), "consumer")
                index = b.add("Expand", [index, b.add("Shape", [source])])
                x = b.add("Add", [b.add("Mul", [b.add("GatherElements", [source, index], axis=space[1]), gain]), offset])
            for node in consumers[space]:
                edit.replace_input(node, source, x)
        edit.extend(b)
        if self.output not in edit.outputs:
            edit.add_output(self.output)
        model = edit.finish(toposort=True)
        make_batch_dynamic(model)
        self.session = session(model)
        self.inputs = inputs
        self.max_batch = max_batch
        self.base = self.run([{}])[0]

    def _mix(self, edit: ModelEditor, b, space: Space, source: str, shape: tuple) -> str:
        """``M x + c`` over the channel axis, one ``M`` per plan of ``probes`` samples."""
        axis, size = space[1], self.channels[space]
        first = axis == 1
        positions = int(np.prod(shape[2:] if first else shape[1:-1]))
        (_, matrix), (_, offset) = self._names(space, "estimate")
        edit.add_input(matrix, np.float32, ["R", 1, size, size])
        edit.add_input(offset, np.float32, ["R", 1, size, 1] if first else ["R", 1, 1, size])
        view = [-1, self.probes, size, positions] if first else [-1, self.probes, positions, size]
        x4 = b.add("Reshape", [source, b.const(np.array(view, np.int64))])
        mixed = b.add("MatMul", [matrix, x4] if first else [x4, b.add("Transpose", [matrix], perm=[0, 1, 3, 2])])
        return b.add("Reshape", [b.add("Add", [mixed, offset]), b.add("Shape", [source])])

    def _inputs(self, edit: ModelEditor, b, space: Space, rank: int, kind: str) -> list[str]:
        """The space's per-sample inputs (see :meth:`_names`), shaped to broadcast over its tensor."""
        tensor, axis = space
        size = self.channels[space]
        shape = b.const(np.array([-1] + [1] * (axis - 1) + [size] + [1] * (rank - axis - 1), np.int64))
        names = []
        for part, name in self._names(space, kind):
            edit.add_input(name, np.int64 if part == "index" else np.float32, ["N", size])
            names.append(b.add("Reshape", [name, shape]))
        return names

    def _names(self, space: Space, kind: str) -> list[tuple[str, str]]:
        """(part, input name) of a consumer space (index, gain, offset), an estimated one
        (matrix, offset) or a BatchNorm output (gain, offset); a BatchNorm output a consumer
        reads has both its own and the consumer's."""
        k = self.spaces.index(space)
        parts = {"consumer": ("index", "gain", "offset"), "estimate": ("matrix", "offset")}.get(kind, ("gain", "offset"))
        return [(part, f"onnxprune_plan_{kind}_{part}_{k}") for part in parts]

    def run(self, plans: list[dict]) -> np.ndarray:
        """Outputs [R, P, O] of the R ``plans``, each keyed by (kind, space): a
        :class:`Substitution` for "consumer" and "norm" spaces, a :class:`Mixing` for
        "estimate" ones (a space a plan leaves out reads itself); in onnxruntime runs of at
        most ``max_batch`` samples."""
        per_plan = sum(4 * self.channels[s] ** 2 for s in self.estimated)
        per_run = max(1, min(self.max_batch // self.probes, MIX_BYTES // max(per_plan, 1)))
        results = []
        for start in range(0, len(plans), per_run):
            chunk = plans[start:start + per_run]
            feeds = {name: np.concatenate([x] * len(chunk)) for name, x in self.inputs.items()}
            for kind, spaces in (("norm", self.rescaled), ("consumer", self.gathered)):
                for space in spaces:
                    rows = [p.get((kind, space)) or Substitution.identity(self.channels[space]) for p in chunk]
                    for part, name in self._names(space, kind):
                        block = np.stack([getattr(r, part) for r in rows])
                        feeds[name] = np.repeat(block.astype(np.int64 if part == "index" else np.float32),
                                                self.probes, axis=0)
            for space in self.estimated:
                rows = [p.get(("estimate", space)) or Mixing.identity(self.channels[space]) for p in chunk]
                (_, matrix), (_, offset) = self._names(space, "estimate")
                feeds[matrix] = np.stack([r.matrix for r in rows])[:, None].astype(np.float32)
                shape = (len(rows), 1, -1, 1) if space[1] == 1 else (len(rows), 1, 1, -1)
                feeds[offset] = np.stack([r.offset for r in rows]).reshape(shape).astype(np.float32)
            (y,) = self.session.run([self.output], feeds)
            results.append(y.reshape(len(chunk), self.probes, -1).astype(np.float64))
        return np.concatenate(results)

    def cosine_distance(self, outputs: np.ndarray) -> np.ndarray:
        """Per plan, the mean over probes of ``1 - cos`` between its outputs and the model's."""
        dot = (outputs * self.base[None]).sum(-1)
        norms = np.linalg.norm(outputs, axis=-1) * np.linalg.norm(self.base, axis=-1)[None] + 1e-12
        return 1.0 - (dot / norms).mean(axis=1)
