"""Accuracy and adversarial robustness of an ONNX classifier (``onnxprune eval``).

Robustness is measured the way PAODING's evaluator does: top-1 accuracy on labelled data,
then accuracy on adversarial examples from FGSM (one signed-gradient step of size eps) and
PGD (iterated signed-gradient steps projected onto the L-inf ball of radius eps). Epsilons
are relative to the data's value range: eps_abs = eps * (x.max() - x.min()), and every
adversarial example is clipped to [x.min(), x.max()].

Input gradients come from :func:`onnxprune.gradient.input_gradient_model` (exact, one
onnxruntime run per batch). If the model has an op without a backward rule, the evaluator
falls back to :func:`finite_difference_gradient` (central differences, many perturbed
copies per run): slower but model-agnostic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.errors import UserError
from onnxprune.gradient import INPUT_GRAD, LABELS, LOSS, GradientUnsupported, input_gradient_model, output_kind
from onnxprune.ir import (
    InputSpec,
    Model,
    Session,
    copy_model,
    input_specs,
    load_model,
    make_batch_dynamic,
    output_names,
    session,
)
from onnxprune.npz import check_shape, read_npz

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]
GradientFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

_X_KEYS = ("x", "X", "data")
_Y_KEYS = ("y", "Y", "labels")


@dataclass
class EvalReport:
    """Clean and adversarial top-1 accuracy of one model on one data set."""

    accuracy: float
    fgsm: dict[float, float]
    pgd: dict[float, float]
    n: int
    gradient: str  # 'graph' or 'finite-difference'
    seconds: float
    pgd_steps: int = 10
    pgd_step_size: float = 0.25  # fraction of eps per PGD step
    data_range: tuple[float, float] = (0.0, 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fgsm"] = {_fmt(k): v for k, v in self.fgsm.items()}
        d["pgd"] = {_fmt(k): v for k, v in self.pgd.items()}
        d["data_range"] = list(self.data_range)
        return d


@dataclass
class CompareReport:
    """Both models' reports, plus how closely the pruned model follows the original."""

    original: EvalReport
    pruned: EvalReport
    agreement: float  # fraction of samples where both predict the same class
    cosine: float  # mean cosine similarity of their outputs on clean data
    n: int
    seconds: float = field(default=0.0)

    def to_dict(self) -> dict:
        return {"original": self.original.to_dict(), "pruned": self.pruned.to_dict(),
                "agreement": self.agreement, "cosine": self.cosine, "n": self.n, "seconds": self.seconds}


def _fmt(eps: float) -> str:
    return format(eps, "g")


# ------------------------------------------------------------------------------------ data
def load_npz(path: str | Path, model: Model | str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read labelled data from an .npz archive: inputs as x (or X, data), integer class
    labels as y (or Y, labels). If ``model`` is given, x must match its input's rank and
    static dims. Raises UserError with what to fix."""
    p = Path(path)
    arrays = read_npz(p, "numpy.savez(path, x=inputs, y=labels)")
    xk = next((k for k in _X_KEYS if k in arrays), None)
    yk = next((k for k in _Y_KEYS if k in arrays), None)
    if xk is None or yk is None:
        raise UserError(f"{p} holds arrays {sorted(arrays)}; expected inputs named x (or X, data) "
                        "and labels named y (or Y, labels)")
    x, y = _check_xy(arrays[xk], arrays[yk], f"{p}")
    if model is not None:
        x = _check_x_for_model(_load_model(model), x)
    return x, y


def _check_xy(x, y, where: str = "data") -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{where}: inputs must be a numeric array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise UserError(f"{where}: inputs must be shaped [N, ...] (one row per sample), got shape {x.shape}")
    if y.ndim == 2 and y.shape[1] > 1:
        raise UserError(f"{where}: labels have shape {y.shape}, which looks one-hot; pass class indices "
                        "(e.g. y.argmax(axis=1))")
    if y.ndim == 2:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(f"{where}: labels must be a 1-D array of class indices, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise UserError(f"{where}: labels must be integer class indices, got non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: labels must be integer class indices, got dtype {y.dtype}")
    if len(x) != len(y):
        raise UserError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise UserError(f"{where}: the data set is empty")
    if (y < 0).any():
        raise UserError(f"{where}: labels must be non-negative class indices, found {int(y.min())}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x, y.astype(np.int64)


def _data_input(model: Model) -> InputSpec:
    inputs = input_specs(model)
    if len(inputs) != 1:
        raise UserError(f"eval needs a model with exactly one input; this one has {len(inputs)} "
                        f"({', '.join(i.name for i in inputs)})")
    return inputs[0]


def _check_x_for_model(model: Model, x: np.ndarray) -> np.ndarray:
    inp = _data_input(model)
    if inp.dims is not None:
        check_shape(inp.name, inp.dims, x.shape)
    if inp.dtype in (np.float32, np.float64, np.float16):
        x = x.astype(inp.dtype, copy=False)
    return x


def _load_model(model_or_path: Model | str | Path) -> Model:
    """The model, read (external data too) with the checks every onnxprune command makes."""
    if isinstance(model_or_path, Model):
        return model_or_path
    p = Path(model_or_path)
    if not p.is_file():
        raise UserError(f"model file {p} does not exist")
    return load_model(p)


# ------------------------------------------------------------------------------- gradients
def _cross_entropy(outputs: np.ndarray, labels: np.ndarray, kind: str) -> np.ndarray:
    """Per-row cross-entropy in float64 of logits (or probabilities if kind == 'probs')."""
    o = outputs.reshape(len(outputs), -1).astype(np.float64)
    rows = np.arange(len(o))
    if kind == "probs":
        return -np.log(np.maximum(o[rows, labels], 1e-300))
    z = o - o.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[rows, labels]


def _fixed_batch(session: Session) -> int | None:
    """The model's batch size if its input fixes it, else None (dynamic)."""
    shape = session.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def _run(session: Session, feeds: dict, outputs: list[str], fixed: int | None) -> list[np.ndarray]:
    """session.run, in chunks of exactly ``fixed`` rows when the batch is fixed (the last
    chunk padded by repeating its last row; samples are independent, so padding is inert)."""
    if fixed is None:
        return session.run(outputs, feeds)
    n = len(next(iter(feeds.values())))
    parts = []
    for start in range(0, n, fixed):
        chunk = {k: v[start:start + fixed] for k, v in feeds.items()}
        real = len(next(iter(chunk.values())))
        if real < fixed:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)]) for k, v in chunk.items()}
        parts.append([r[:real] for r in session.run(outputs, chunk)])
    return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]


def finite_difference_gradient(session: Session, x: np.ndarray, labels: np.ndarray, h: float,
                               *, output_kind: str = "auto", max_rows: int = 4096) -> np.ndarray:
    """Central-difference d cross-entropy / d input for any model onnxruntime runs.

    Each coordinate of each sample is perturbed by +-h; up to ``max_rows`` perturbed copies
    go through one run (in chunks of the model's batch when its input fixes one). The loss is
    computed in float64 from the outputs, dividing by the step actually taken after
    rounding to the input dtype. ``output_kind``: 'logits', 'probs' or 'auto' (outputs
    that are non-negative rows summing to 1 are treated as probabilities).
    """
    x = np.asarray(x)
    labels = np.asarray(labels, dtype=np.int64)
    inp, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    fixed = _fixed_batch(session)
    n = len(x)
    flat = x.reshape(n, -1)
    d = flat.shape[1]

    def forward(rows: np.ndarray) -> np.ndarray:
        res = _run(session, {inp: rows.reshape((-1,) + x.shape[1:])}, [out], fixed)[0]
        return res.reshape(len(rows), -1)

    if output_kind == "auto":
        probe = forward(flat[: min(n, 8)])
        output_kind = "probs" if probe.min() >= 0 and np.allclose(probe.sum(axis=1), 1, atol=1e-3) else "logits"
    grad = np.zeros((n, d), np.float64)
    chunk = max(1, max_rows // 2)
    step = np.asarray(h, dtype=x.dtype)
    for start in range(0, n * d, chunk):
        pairs = np.arange(start, min(start + chunk, n * d))
        s, c, rows = pairs // d, pairs % d, np.arange(len(pairs))
        plus, minus = flat[s].copy(), flat[s].copy()
        plus[rows, c] += step
        minus[rows, c] -= step
        taken = plus[rows, c].astype(np.float64) - minus[rows, c].astype(np.float64)
        losses = _cross_entropy(forward(np.concatenate([plus, minus])), np.concatenate([labels[s], labels[s]]),
                                output_kind)
        grad[s, c] = (losses[: len(pairs)] - losses[len(pairs):]) / taken
    return grad.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------------- attacks
def fgsm(x: np.ndarray, grad: np.ndarray, eps_abs: float, lo: float, hi: float) -> np.ndarray:
    """Fast gradient sign method: x + eps_abs * sign(grad), clipped to [lo, hi]."""
    return np.clip(x + eps_abs * np.sign(grad), lo, hi).astype(x.dtype)


def pgd(grad_fn: GradientFn, x: np.ndarray, y: np.ndarray, eps_abs: float, step_abs: float, steps: int,
        lo: float, hi: float, *, first_grad: np.ndarray | None = None, rng: np.random.Generator | None = None,
        on_step: Callable[[int], None] | None = None) -> np.ndarray:
    """Projected gradient descent (L-inf): ``steps`` signed steps of ``step_abs``, each
    followed by projection onto the eps ball around x and clipping to [lo, hi]. With
    ``rng``, starts from a uniform random point of the ball; ``first_grad`` (the gradient
    at x, when already known) saves one gradient computation."""
    adv = x.copy()
    if rng is not None:
        adv = np.clip(x + rng.uniform(-eps_abs, eps_abs, x.shape), lo, hi).astype(x.dtype)
        first_grad = None
    for t in range(steps):
        g = first_grad if t == 0 and first_grad is not None else grad_fn(adv, y)
        adv = np.clip(adv + step_abs * np.sign(g), x - eps_abs, x + eps_abs)
        adv = np.clip(adv, lo, hi).astype(x.dtype)
        if on_step is not None:
            on_step(t)
    return adv


# ------------------------------------------------------------------------------ classifier
class Classifier:
    """Sessions for one model, created once: outputs, predictions and input gradients."""

    def __init__(self, model: Model, sample: np.ndarray, *, gradient: str, fd_step: float) -> None:
        if gradient not in ("auto", "graph", "finite-difference"):
            raise UserError(f"gradient must be 'auto', 'graph' or 'finite-difference', not {gradient!r}")
        self.inp = _data_input(model).name
        self.out = output_names(model)[0]
        self.kind = "probs" if output_kind(model) == "probs" else "auto"
        self.fd_step = fd_step
        try:
            self.sess = session(model)
        except Exception as exc:  # noqa: BLE001 - onnxruntime reports bad models in many ways
            raise UserError(f"onnxruntime cannot load the model: {exc}") from None
        self.fixed = _fixed_batch(self.sess)
        if self.fixed is not None and len(sample) > self.fixed:
            batched = _dynamic_batch(model, self.sess, self.inp, self.out, sample[: self.fixed + 1], self.fixed)
            if batched is not None:
                logger.info("model has a fixed batch of %d; running it with a dynamic batch instead", self.fixed)
                model, self.sess, self.fixed = batched[0], batched[1], None
            else:
                logger.info("model has a fixed batch of %d; feeding it %d sample(s) at a time", self.fixed, self.fixed)
        self.grad_sess = None
        self.method = "finite-difference"
        if gradient != "finite-difference":
            try:
                self.grad_sess = session(input_gradient_model(model))
                self.method = "graph"
            except GradientUnsupported as exc:
                if gradient == "graph":
                    raise UserError(f"cannot build the gradient graph: {exc}") from None
                logger.warning("exact gradients unavailable (%s); falling back to finite differences", exc)
            except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime rejects an emitted node
                if gradient == "graph":
                    raise
                logger.warning("gradient graph failed to load (%s); falling back to finite differences", exc)
        if self.grad_sess is not None and gradient == "auto" and not self._gradient_checks_out(sample):
            logger.warning("gradient graph disagrees with finite differences; using finite differences")
            self.grad_sess, self.method = None, "finite-difference"

    def outputs(self, x: np.ndarray) -> np.ndarray:
        res = _run(self.sess, {self.inp: x}, [self.out], self.fixed)[0]
        return res.reshape(len(x), -1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x).argmax(axis=1)

    def loss_and_gradient(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loss, grad = _run(self.grad_sess, {self.inp: x, LABELS: y}, [LOSS, INPUT_GRAD], self.fixed)
        return loss, grad

    def gradient(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.grad_sess is not None:
            return self.loss_and_gradient(x, y)[1]
        return finite_difference_gradient(self.sess, x, y, self.fd_step, output_kind=self.kind)

    def _gradient_checks_out(self, sample: np.ndarray) -> bool:
        """Directional-derivative check of the graph gradient on a few samples: the safety
        net against a backward rule that is wrong for some unusual model."""
        x = sample[:16]
        try:
            y = self.predict(x)
            loss, g = self.loss_and_gradient(x, y)
            idx = np.argsort(-loss)[:4]  # least confident: largest, best-conditioned gradients
            x, y, g = x[idx], y[idx], g[idx].astype(np.float64)
            v = np.sign(g)
            h = self.fd_step
            lp = self.loss_and_gradient((x + h * v).astype(x.dtype), y)[0].astype(np.float64)
            lm = self.loss_and_gradient((x - h * v).astype(x.dtype), y)[0].astype(np.float64)
        except Exception as exc:  # noqa: BLE001 - a gradient graph that cannot run is not usable
            logger.warning("gradient graph failed to run: %s", exc)
            return False
        fd = (lp - lm) / (2 * h)
        analytic = np.abs(g).reshape(len(g), -1).sum(axis=1)
        tol = 0.25 * np.abs(analytic) + 1e-4 * (1 + np.abs(loss[idx])) / h  # gross errors only: kinks
        ok = np.abs(fd - analytic) <= tol
        logger.debug("gradient check: analytic %s, finite-difference %s", analytic, fd)
        return bool(ok.sum() * 2 >= len(ok))


def _dynamic_batch(model, fixed_session, inp, out, sample, fixed) -> tuple[Model, Session] | None:
    """Same model with a symbolic batch dim, if it computes the same per-sample outputs
    (a Reshape to a hard-coded [1, ...] inside the graph makes it fail, and we say no).
    Checked on one sample more than the fixed batch, a batch size it was not exported for."""
    m = copy_model(model)
    make_batch_dynamic(m, batch=fixed, reshapes=False)  # a Reshape to [1, ...] says no
    try:
        sess = session(m)
        batched = sess.run([out], {inp: sample})[0]
        single = _run(fixed_session, {inp: sample}, [out], fixed)[0]
        if batched.shape == single.shape and np.allclose(batched, single, rtol=1e-4, atol=1e-5):
            return m, sess
    except Exception as exc:  # noqa: BLE001 - any failure means: keep feeding one at a time
        logger.debug("dynamic batch rewrite rejected: %s", exc)
    return None


# ------------------------------------------------------------------------------ evaluation
def _prepare(model_or_path, x, y) -> tuple[Model, np.ndarray, np.ndarray]:
    model = _load_model(model_or_path)
    x, y = _check_xy(x, y)
    return model, _check_x_for_model(model, x), y


def _settings(epsilons, pgd_steps, pgd_epsilon, pgd_step_size, batch_size) -> tuple[list[float], list[float]]:
    eps = [float(e) for e in epsilons]
    if any(not np.isfinite(e) or e < 0 for e in eps):
        raise UserError(f"epsilons must be non-negative numbers, got {list(epsilons)}")
    if pgd_steps < 0 or batch_size < 1 or not pgd_step_size > 0:
        raise UserError("pgd_steps must be >= 0, pgd_step_size > 0 and batch_size >= 1")
    if pgd_epsilon is None:
        pgd_eps = [sorted(eps)[len(eps) // 2]] if eps and pgd_steps else []
    else:
        pgd_eps = [float(e) for e in np.atleast_1d(pgd_epsilon)] if pgd_steps else []
        if any(not np.isfinite(e) or e < 0 for e in pgd_eps):
            raise UserError(f"pgd_epsilon must be non-negative, got {pgd_epsilon}")
    return eps, pgd_eps


def _evaluate(clf: Classifier, x, y, eps, pgd_eps, *, pgd_steps, pgd_step_size, pgd_random_start, seed,
              batch_size, progress: ProgressFn | None, started: float) -> tuple[EvalReport, np.ndarray]:
    n = len(x)
    lo, hi = float(x.min()), float(x.max())
    scale = hi - lo
    units = 2 + len(eps) + len(pgd_eps) * (pgd_steps + 1)
    total, done = n * units, 0
    rng = np.random.default_rng(seed) if pgd_random_start else None

    def tick(count: int, label: str) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total, label)

    correct, fgsm_correct, pgd_correct, outs = 0, dict.fromkeys(eps, 0), dict.fromkeys(pgd_eps, 0), []
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        out = clf.outputs(xb)
        if start == 0 and y.max() >= out.shape[1]:
            raise UserError(f"labels go up to {int(y.max())} but the model has {out.shape[1]} outputs")
        outs.append(out)
        correct += int((out.argmax(axis=1) == yb).sum())
        tick(len(xb), "clean")
        g = clf.gradient(xb, yb)
        tick(len(xb), "gradient")
        for e in eps:
            fgsm_correct[e] += int((clf.predict(fgsm(xb, g, e * scale, lo, hi)) == yb).sum())
            tick(len(xb), f"fgsm eps={_fmt(e)}")
        for e in pgd_eps:
            adv = pgd(clf.gradient, xb, yb, e * scale, pgd_step_size * e * scale, pgd_steps, lo, hi,
                      first_grad=g, rng=rng,
                      on_step=_step_reporter(tick, len(xb), f"pgd eps={_fmt(e)} step {{}}/{pgd_steps}"))
            pgd_correct[e] += int((clf.predict(adv) == yb).sum())
            tick(len(xb), f"pgd eps={_fmt(e)}")
    report = EvalReport(accuracy=correct / n, fgsm={e: c / n for e, c in fgsm_correct.items()},
                        pgd={e: c / n for e, c in pgd_correct.items()}, n=n, gradient=clf.method,
                        seconds=time.perf_counter() - started, pgd_steps=pgd_steps,
                        pgd_step_size=pgd_step_size, data_range=(lo, hi))
    return report, np.concatenate(outs)


def _step_reporter(tick: Callable[[int, str], None], count: int, label: str) -> Callable[[int], None]:
    return lambda t: tick(count, label.format(t + 1))


def evaluate(model_or_path: Model | str | Path, x: np.ndarray, y: np.ndarray, *,
             epsilons: Sequence[float] = (0.01, 0.05, 0.1), pgd_steps: int = 10,
             pgd_epsilon: float | Sequence[float] | None = None, pgd_step_size: float = 0.25,
             pgd_random_start: bool = False, batch_size: int = 256, progress: ProgressFn | None = None,
             gradient: str = "auto", fd_step: float = 1e-3, seed: int = 0) -> EvalReport:
    """Top-1 accuracy, and accuracy under FGSM at each epsilon and under PGD.

    Epsilons are fractions of the data range (x.max() - x.min()). PGD runs ``pgd_steps``
    steps of ``pgd_step_size * eps`` at ``pgd_epsilon`` (default: the middle epsilon;
    a sequence runs several), from x itself or, with ``pgd_random_start``, from a random
    point of the ball. ``gradient``: 'auto' (graph, else finite differences), 'graph' or
    'finite-difference'; ``fd_step`` is the finite-difference step, relative to the range.
    ``progress(done, total, label)`` is called as work completes.
    """
    started = time.perf_counter()
    model, x, y = _prepare(model_or_path, x, y)
    eps, pgd_eps = _settings(epsilons, pgd_steps, pgd_epsilon, pgd_step_size, batch_size)
    h = fd_step * ((float(x.max()) - float(x.min())) or 1.0)
    clf = Classifier(model, x, gradient=gradient, fd_step=h)
    return _evaluate(clf, x, y, eps, pgd_eps, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size,
                     pgd_random_start=pgd_random_start, seed=seed, batch_size=batch_size, progress=progress,
                     started=started)[0]


def compare(original: Model | str | Path, pruned: Model | str | Path, x: np.ndarray,
            y: np.ndarray, **kwargs) -> CompareReport:
    """Evaluate both models (same keyword arguments as :func:`evaluate`) and measure how
    closely the pruned one follows the original on clean data: top-1 agreement and mean
    cosine similarity of the outputs. ``progress`` sees one bar over both models."""
    started = time.perf_counter()
    progress: ProgressFn | None = kwargs.pop("progress", None)
    settings = dict(pgd_steps=kwargs.pop("pgd_steps", 10), pgd_step_size=kwargs.pop("pgd_step_size", 0.25),
                    pgd_random_start=kwargs.pop("pgd_random_start", False), seed=kwargs.pop("seed", 0),
                    batch_size=kwargs.pop("batch_size", 256))
    eps_args = (kwargs.pop("epsilons", (0.01, 0.05, 0.1)), settings["pgd_steps"], kwargs.pop("pgd_epsilon", None),
                settings["pgd_step_size"], settings["batch_size"])
    gradient, fd_step = kwargs.pop("gradient", "auto"), kwargs.pop("fd_step", 1e-3)
    if kwargs:
        raise TypeError(f"compare() got unexpected keyword arguments {sorted(kwargs)}")
    eps, pgd_eps = _settings(*eps_args)
    reports, outputs = [], []
    for index, (name, m) in enumerate((("original", original), ("pruned", pruned))):
        model, xm, ym = _prepare(m, x, y)
        h = fd_step * ((float(xm.max()) - float(xm.min())) or 1.0)

        def sub_progress(done: int, total: int, label: str, index=index, name=name) -> None:
            if progress is not None:
                progress(done + index * total, 2 * total, f"{name}: {label}")

        clf = Classifier(model, xm, gradient=gradient, fd_step=h)
        report, out = _evaluate(clf, xm, ym, eps, pgd_eps, progress=sub_progress, started=time.perf_counter(),
                                **settings)
        reports.append(report)
        outputs.append(out)
    a, b = outputs
    if a.shape != b.shape:
        raise UserError(f"the models' outputs differ in shape: {list(a.shape[1:])} vs {list(b.shape[1:])}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cos = np.where(denom > 0, (a64 * b64).sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
    return CompareReport(original=reports[0], pruned=reports[1],
                         agreement=float((a.argmax(axis=1) == b.argmax(axis=1)).mean()), cosine=float(cos.mean()),
                         n=len(a), seconds=time.perf_counter() - started)
