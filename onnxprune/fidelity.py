"""Fidelity of a pruned model to its original on seeded synthetic inputs, and relative latency."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.ir import Model, Session, Shape, random_inputs, session

if TYPE_CHECKING:
    from onnxprune.analysis import SyntheticInputs


@dataclass
class Fidelity:
    probes: int
    cosine: float      # mean cosine similarity of output vectors (worst output)
    rel_l2: float      # mean ||pruned - original|| / ||original|| (worst output)
    top1: float | None  # share of probes whose argmax agrees (classification-like outputs)
    inputs: str = ""   # what the probes were: how they were made, whether planning saw them
    #: Inputs on which the original's outputs are one-hot (a saturated softmax: one entry 1,
    #: the rest exactly 0) or not finite: the cosine and relL2 say little there.
    saturated: int = 0
    #: Inputs on which the pruned model's outputs are not finite where the original's are.
    broken: int = 0
    #: Samples compared (``probes`` counts runs; a run may stack several samples).
    samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _per_sample(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)


def _degenerate(a2: np.ndarray) -> np.ndarray:
    """Per sample: the output is not finite, or one-hot (a saturated softmax)."""
    finite = np.isfinite(a2).all(axis=1)
    one_hot = (a2.shape[1] > 1) & ((a2 != 0).sum(axis=1) <= 1)
    return ~finite | one_hot


def compare_outputs(ref: list[np.ndarray], new: list[np.ndarray]) -> Fidelity:
    """Cosine, relL2 and top-1 of ``new`` against ``ref`` (worst output), and the samples on
    which those say little: where an output of the original is one-hot or not finite
    (``saturated``: there the cosine is 0 or 1 as the top class moves or not), where the
    pruned model's is not finite and the original's is (``broken``)."""
    cosines, errors, agree = [], [], []
    saturated = broken = samples = 0
    for a, b in zip(ref, new):
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            continue
        a2, b2 = _per_sample(a), _per_sample(b)
        saturated, samples = max(saturated, int(_degenerate(a2).sum())), max(samples, len(a2))
        broken = max(broken, int((np.isfinite(a2).all(axis=1) & ~np.isfinite(b2).all(axis=1)).sum()))
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
        saturated=saturated, broken=broken, samples=samples,
    )


def _run_batched(sess: Session, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    runs = [sess.run(None, f) for f in feeds]
    return [np.concatenate([r[i] for r in runs], axis=0) if np.ndim(runs[0][i]) else np.stack([r[i] for r in runs])
            for i in range(len(runs[0]))]


def split_feeds(inputs: dict[str, np.ndarray], batch: int,
                axes: dict[str, int | None] | None = None) -> list[dict[str, np.ndarray]]:
    """Inputs stacked on the batch axis as feeds of ``batch`` rows (models may fix their batch).
    ``axes``: each input's sample axis when it is not the first (None: the same to every feed)."""
    axes = axes or {}
    stacked = [(v, axes.get(k, 0)) for k, v in inputs.items() if axes.get(k, 0) is not None]
    count = np.shape(stacked[0][0])[stacked[0][1]] if stacked else batch
    return [{k: v if axes.get(k, 0) is None else np.take(v, np.arange(i, i + batch), axis=axes.get(k, 0))
             for k, v in inputs.items()} for i in range(0, count - batch + 1, batch)]


def fidelity_on(original: Model, pruned: Model, feeds: list[dict[str, np.ndarray]], inputs: str) -> Fidelity:
    """Fidelity of ``pruned`` to ``original`` on the given feeds, described by ``inputs``."""
    found = compare_outputs(_run_batched(session(original), feeds), _run_batched(session(pruned), feeds))
    found.probes, found.inputs = len(feeds), inputs
    return found


#: What a warning about noise inputs ends with.
_NOISE = ("planning and the fidelity row used noise from the input prior, which can read near 1 while real inputs "
          "disagree; give --calibration, or check the result with onnxprune eval")


def evidence_warnings(held_out: SyntheticInputs) -> list[str]:
    """What the fidelity row cannot vouch for, given the inputs it was measured on."""
    if held_out.kind != "synthetic":
        return []
    if "the inversion failed" in held_out.source:
        return [f"the inversion of the model's statistics failed ({held_out.source.split('the inversion failed: ')[1]}): "
                + _NOISE]
    if "not inverted: " in held_out.source:
        return [f"no inputs were distilled: the model is too large to invert "
                f"({held_out.source.split('not inverted: ')[1]}): " + _NOISE]
    if not held_out.source.startswith("distilled"):
        return ["no inputs were distilled (no BatchNorm statistics, and nothing else to invert or a model too large "
                "to invert without them): " + _NOISE]
    warnings = []
    if "centred pre-activations" in held_out.source:
        warnings.append("the model has no BatchNorm statistics (folded into its convolutions?): inputs were "
                        "inverted to centre every channel before its activation, as BatchNorm training leaves "
                        "them, which says nothing of their scale; the fidelity row can read higher than real "
                        "inputs would (digits nets with folded BatchNorm: up to 0.25 higher); give --calibration, "
                        "or check the result with onnxprune eval")
    elif "BatchNorm" not in held_out.source:
        warnings.append("inputs were inverted from the class logits alone (no BatchNorm statistics to match): "
                        "they exercise what the classifier responds to, not everything real inputs do; the "
                        "fidelity row can read higher than real inputs would")
    if held_out.capped:
        warnings.append("the model is large: the evidence budget bought fewer held-out inputs than --check asked for")
    return warnings


def output_warnings(fidelity: Fidelity) -> list[str]:
    """What the fidelity row's numbers cannot mean: outputs of the original with nothing to
    compare against, outputs the pruned model lost."""
    warnings = []
    if fidelity.saturated:
        every = fidelity.saturated >= fidelity.samples
        where = "every held-out input" if every else f"{fidelity.saturated} of {fidelity.samples} held-out inputs"
        warnings.append(f"the original model's outputs are one-hot or not finite on {where} (a saturated softmax: "
                        "random weights, or inputs unlike the ones it expects): there the cosine only says whether "
                        "the top class moved" + ("; the fidelity row shows top-1 alone" if every else ""))
    if fidelity.broken:
        warnings.append(f"the pruned model's outputs are not finite on {fidelity.broken} held-out inputs where "
                        "the original's are")
    return warnings


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
