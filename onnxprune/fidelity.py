"""Fidelity of a pruned model to its original on seeded synthetic inputs, and relative latency."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from onnxprune.ir import Model, Session, Shape, random_inputs, session


@dataclass
class Fidelity:
    probes: int
    cosine: float      # mean cosine similarity of output vectors (worst output)
    rel_l2: float      # mean ||pruned - original|| / ||original|| (worst output)
    top1: float | None  # share of probes whose argmax agrees (classification-like outputs)
    inputs: str = ""   # what the probes were: how they were made, whether planning saw them

    def to_dict(self) -> dict:
        return asdict(self)


def _per_sample(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)


def compare_outputs(ref: list[np.ndarray], new: list[np.ndarray]) -> Fidelity:
    cosines, errors, agree = [], [], []
    for a, b in zip(ref, new):
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            continue
        a2, b2 = _per_sample(a), _per_sample(b)
        na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
        dot = (a2 * b2).sum(axis=1)
        cos = np.where((na > 0) & (nb > 0), dot / np.maximum(na * nb, 1e-30), (na == nb).astype(float))
        cosines.append(cos.mean())
        errors.append((np.linalg.norm(a2 - b2, axis=1) / np.maximum(na, 1e-12)).mean())
        if np.asarray(a).ndim >= 1 and np.asarray(a).shape[-1] > 1:
            agree.append((np.argmax(a, axis=-1) == np.argmax(b, axis=-1)).mean())
    return Fidelity(
        probes=int(np.asarray(ref[0]).shape[0]) if ref and np.asarray(ref[0]).ndim else 1,
        cosine=float(min(cosines)) if cosines else 1.0,
        rel_l2=float(max(errors)) if errors else 0.0,
        top1=float(min(agree)) if agree else None,
    )


def _run_batched(sess: Session, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    runs = [sess.run(None, f) for f in feeds]
    return [np.concatenate([r[i] for r in runs], axis=0) if np.ndim(runs[0][i]) else np.stack([r[i] for r in runs])
            for i in range(len(runs[0]))]


def split_feeds(inputs: dict[str, np.ndarray], batch: int, whole: set[str] | frozenset = frozenset()) \
        -> list[dict[str, np.ndarray]]:
    """Inputs stacked on the batch axis as feeds of ``batch`` rows (models may fix their batch);
    inputs named in ``whole`` (not batched: a recurrent state, a scalar) go whole into every feed."""
    count = len(next(v for k, v in inputs.items() if k not in whole)) if set(inputs) - set(whole) else batch
    return [{k: v if k in whole else v[i:i + batch] for k, v in inputs.items()}
            for i in range(0, count - batch + 1, batch)]


def fidelity_on(original: Model, pruned: Model, feeds: list[dict[str, np.ndarray]], inputs: str) -> Fidelity:
    """Fidelity of ``pruned`` to ``original`` on the given feeds, described by ``inputs``."""
    found = compare_outputs(_run_batched(session(original), feeds), _run_batched(session(pruned), feeds))
    found.probes, found.inputs = len(feeds), inputs
    return found


def latency_ratio(original: Model, pruned: Model, shapes: dict[str, Shape],
                  seconds: float = 2.0, threads: int = 1) -> tuple[float, float, float]:
    """(original ms, pruned ms, pruned/original): medians of interleaved runs on the same input."""
    a, b = session(original, threads), session(pruned, threads)
    feed = random_inputs(original, shapes, np.random.default_rng(0))
    for _ in range(3):
        a.run(None, feed), b.run(None, feed)
    times_a, times_b = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times_a) < 5:
        for sess, times in ((a, times_a), (b, times_b)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
    ta, tb = float(np.median(times_a)) * 1e3, float(np.median(times_b)) * 1e3
    return ta, tb, tb / ta
