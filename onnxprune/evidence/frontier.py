"""Probe rows that run from where their ablation enters the model.

A row that ablates units of one group changes nothing upstream of that group's masks: every
tensor computed before them is the same in every row as in the unablated run. So the rows of
a *block* of groups run a sub-model of the probe model, the nodes downstream of the block's
mask inputs, fed the tensors those nodes read from upstream (*captures*: taken once, at the
probes' batch, from the unablated run; on large inputs each block's own, when it runs)
repeated over the rows. The outputs are the same computation on the same values; what is
saved is the upstream part of every row.

The slicing itself is :class:`onnxprune.ir.Slicer`'s (only tensors with the sample on their
first axis are captured; a shape tensor pulls its producer in instead). A block costs a
session per probe step, so blocks are chosen by :func:`plan_blocks`, a small dynamic
programme over the groups ordered by how much of the model lies downstream of them: a
block's session costs about its node count times the seconds per node the probe model's own
session took, its rows their samples times the block's downstream cost at the throughput
measured so far on the same model (:class:`Throughput`, kept by the planning run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from onnxprune.ir import Cut, Model, Slicer, sample_bytes, session

#: Bytes of captures a probe step holds at most (all cuts', for every probe): past it each
#: block takes its own when it runs, at the price of an unablated run of the probes (a layout
#: detector at 800x608 captured 88 MB a probe, 353 MB a step, a third of its peak).
CAPTURE_BYTES = 2.5e8


@dataclass
class Throughput:
    """Seconds per sample per unit of :class:`~onnxprune.ir.Slicer` cost, as measured by the runs so far
    (a property of the machine and the model's op mix: one per planning run, kept across its
    steps; a depthwise net's figure misled a DenseNet's blocks planned after it)."""

    seconds: float = 5e-11
    seen: int = 0

    def update(self, seconds: float, samples: int, cost: float) -> None:
        if samples <= 0 or cost <= 0:
            return
        observed = seconds / (samples * cost)
        self.seconds = observed if not self.seen else 0.7 * self.seconds + 0.3 * observed
        self.seen += 1


def sample_runs(rows: int, probes: int, max_batch: int) -> Iterator[tuple[slice, slice]]:
    """The runs of ``rows`` rows of ``probes`` samples, at most ``max_batch`` samples each, as
    ``(rows, probes)`` slices: whole rows together where a run holds one, else each row in
    parts of ``max_batch`` probes (a detector at 800x608 holds about 250 MB of activations a
    sample; its rows of 4 probes peaked at 1.9 GB). Samples are independent, so the outputs
    are the same either way."""
    if max_batch >= probes:
        per_run = max_batch // probes
        for start in range(0, rows, per_run):
            yield slice(start, min(rows, start + per_run)), slice(0, probes)
    else:
        for row in range(rows):
            for lo in range(0, probes, max(max_batch, 1)):
                yield slice(row, row + 1), slice(lo, min(probes, lo + max_batch))


def assemble(parts: list[tuple[slice, slice, np.ndarray]], rows: int, probes: int) -> np.ndarray:
    """``[rows, probes, O]`` from the outputs ``[n, width, O]`` of :func:`sample_runs`' runs."""
    if all(kept.stop - kept.start == probes for _, kept, _ in parts):
        return np.concatenate([y for _, _, y in parts])
    out = np.empty((rows, probes, parts[0][2].shape[-1]), parts[0][2].dtype)
    for part, kept, y in parts:
        out[part, kept] = y
    return out


def plan_blocks(groups: list[tuple[int, int, Cut | None]], probes: int, whole: float,
                session_seconds: float, throughput: float, capture: float = 0.0) -> list[tuple[list[int], bool]]:
    """Blocks of groups that share a sub-model: ``groups`` are ``(id, rows, cut)``; a block
    is ``(ids, cut)``, where ``cut`` False runs its rows through the whole probe model.

    Groups are ordered by their cut's cost, largest first; a block of consecutive ones costs
    its session (``session_seconds`` per node of its first group's cut) plus its rows'
    samples at that cut's cost times ``throughput`` (the first cut stands for the union:
    later ones mostly lie inside it), plus ``capture`` seconds where blocks take their own
    captures. The whole model costs no session (it has one)."""
    order = sorted(groups, key=lambda g: -(g[2].cost if g[2] is not None else whole))
    n = len(order)
    best = [0.0] + [math.inf] * n
    choice: list[tuple[int, bool]] = [(0, False)] * (n + 1)
    rows = np.cumsum([0] + [r for _, r, _ in order])
    for j in range(1, n + 1):
        for i in range(j):
            samples = (rows[j] - rows[i]) * probes
            full = best[i] + samples * whole * throughput
            if full < best[j]:
                best[j], choice[j] = full, (i, False)
            cut = order[i][2]
            if cut is not None:
                sub = best[i] + len(cut.nodes) * session_seconds + samples * cut.cost * throughput + capture
                if sub < best[j]:
                    best[j], choice[j] = sub, (i, True)
    blocks, j = [], n
    while j > 0:
        i, sub = choice[j]
        blocks.append(([gid for gid, _, _ in order[i:j]], sub))
        j = i
    return blocks[::-1]


class Frontier:
    """The cuts of one probe model: each group's (where it spares part of the model), the
    tensors they capture (made outputs of ``model`` here, before its session is made), and
    the block runs.

    ``inputs`` maps each group id to its mask inputs and the value of each that ablates
    nothing; ``sizes`` their widths; ``samples`` the probe inputs. Where every cut's captures
    for every probe pass CAPTURE_BYTES, :attr:`holds` is False: :meth:`capture` is not
    called, and each block takes its own when it runs (see :meth:`run`)."""

    def __init__(self, model: Model, shapes: dict, batch: int, samples: dict[str, np.ndarray],
                 inputs: dict[int, dict[str, float]], sizes: dict[int, int], output: str,
                 throughput: Throughput | None = None):
        self.slicer = Slicer(model, shapes, batch, set(samples))
        self.shapes, self.samples, self.inputs, self.sizes, self.output = shapes, samples, inputs, sizes, output
        self.throughput = throughput or Throughput()
        self.cuts = {}
        for gid, names in inputs.items():
            cut = self.slicer.cut(set(names), output)
            if cut is not None:
                self.cuts[gid] = cut
        self.wanted = sorted({c for cut in self.cuts.values() for c in cut.captures})
        self.slicer.expose(self.wanted)
        self.captured: dict[str, np.ndarray] = {}
        probes = len(next(iter(samples.values()))) if samples else 1
        self.holds = sample_bytes(shapes, self.wanted) * probes <= CAPTURE_BYTES
        self.session_seconds = 0.0  # per node: the probe model's own session, timed by the caller
        self.rows = 0  # rows run through cuts

    def capture(self, arrays: list[np.ndarray], probes: int) -> None:
        """The unablated run's values of :attr:`wanted`; a cut whose capture is not
        ``[probes, *analysed]`` after all (its first axis was not the batch) is dropped."""
        self.captured = self._checked(self.wanted, arrays, probes)
        self.cuts = {gid: cut for gid, cut in self.cuts.items() if all(c in self.captured for c in cut.captures)}

    def _checked(self, names: list[str], arrays: list[np.ndarray], probes: int) -> dict[str, np.ndarray]:
        return {n: a for n, a in zip(names, arrays)
                if a.shape[:1] == (probes,) and a.shape[1:] == tuple(self.shapes[n][1:])}

    def _captures(self, cut: Cut, probes: int, take) -> dict[str, np.ndarray] | None:
        """The cut's captures: held, or taken now (:attr:`holds` False); None where one is not
        what a capture must be."""
        if self.holds:
            captured = self.captured
        else:
            captured = self._checked(cut.captures, take(list(cut.captures)), probes)
        return captured if all(c in captured for c in cut.captures) else None

    def run(self, masks: dict[str, np.ndarray], probes: int, max_batch: int,
            whole: Callable[[dict[str, np.ndarray]], np.ndarray],
            take: Callable[[list[str]], list[np.ndarray]]) -> np.ndarray | None:
        """Outputs ``[R, P, O]`` of the rows of ``masks``: a row that ablates one group alone
        runs in its group's block, the others through ``whole`` (the probe model's own run);
        None where no block is worth a session. ``take`` runs the unablated probes for the
        named tensors (a block's captures, where the frontier does not hold them)."""
        rows = max(len(m) for m in masks.values())
        ids = list(self.inputs)
        active = np.zeros((len(ids), rows), bool)
        for k, gid in enumerate(ids):
            for name, default in self.inputs[gid].items():
                if name in masks:
                    active[k] |= np.any(masks[name] != default, axis=1)
        alone = active.sum(axis=0) == 1
        owner = np.where(alone, active.argmax(axis=0), -1)
        counts = [(gid, int(np.sum(owner == k)), self.cuts.get(gid)) for k, gid in enumerate(ids) if np.any(owner == k)]
        # a block that takes its captures pays an unablated run of the probes
        capture = 0.0 if self.holds else probes * self.slicer.total * self.throughput.seconds
        blocks = plan_blocks(counts, probes, self.slicer.total, self.session_seconds, self.throughput.seconds,
                             capture)
        if not any(sub for _, sub in blocks):
            return None
        out, rest = None, ~alone  # rows of no group or of several: the whole model
        for block, sub in blocks:
            picked = np.isin(owner, [ids.index(gid) for gid in block])
            names = {name for gid in block for name in self.inputs[gid]}
            # A block of one group runs that group's cut; a larger one the cut of its union.
            cut = None if not sub else self.cuts[block[0]] if len(block) == 1 else self.slicer.cut(names, self.output)
            captured = None if cut is None else self._captures(cut, probes, take)
            if captured is None:
                rest |= picked
                continue
            where = np.flatnonzero(picked)
            y = self._run_cut(cut, captured, {name: masks[name][where] for name in names if name in masks},
                              len(where), probes, max_batch)
            del captured
            if out is None:
                out = np.empty((rows, *y.shape[1:]), y.dtype)
            out[where] = y
        if rest.any():
            where = np.flatnonzero(rest)
            y = whole({name: m[where] for name, m in masks.items()})
            if out is None:
                out = np.empty((rows, *y.shape[1:]), y.dtype)
            out[where] = y
        return out

    def _run_cut(self, cut: Cut, captured: dict[str, np.ndarray], masks: dict[str, np.ndarray], rows: int,
                 probes: int, max_batch: int) -> np.ndarray:
        """``rows`` rows of ``masks`` through the cut's sub-model, the captures repeated."""
        model, weights = self.slicer.sub_model(cut, self.output, captured)
        sess = session(model, outside=weights)
        defaults = {name: (self.sizes[gid], default) for gid, names in self.inputs.items()
                    for name, default in names.items()}
        results = []
        for part, kept in sample_runs(rows, probes, max_batch):
            n, width = part.stop - part.start, kept.stop - kept.start
            feeds = {name: np.concatenate([captured[name][kept]] * n) for name in cut.captures}
            for name in cut.inputs:
                if name in self.samples:
                    feeds[name] = np.concatenate([self.samples[name][kept]] * n)
                elif name in masks:
                    feeds[name] = np.repeat(masks[name][part].astype(np.float32), width, axis=0)
                else:
                    size, default = defaults[name]
                    feeds[name] = np.full((n * width, size), default, np.float32)
            t0 = time.perf_counter()
            (y,) = sess.run([self.output], feeds)
            self.throughput.update(time.perf_counter() - t0, n * width, cut.cost)
            self.rows += n if kept.start == 0 else 0
            results.append((part, kept, y.reshape(n, width, -1)))
        return assemble(results, rows, probes)
