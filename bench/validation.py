"""The reference models and the validation zoo side by side: reported against real fidelity.

For each model of ``models/manifest.json`` (TorchScript files; their inputs are in [0, 1]) and of
``models/validation/manifest.json`` (never tuned on; input ranges from the manifest), at each
ratio and method: prune with onnxprune (``check=8`` probes), evaluate the pruned model on the
real test split, and measure the REAL fidelity on it: the mean over test samples of the cosine
between original and pruned logits, and the share of samples whose top-1 class agrees. The
table sets that beside what onnxprune's report claims (``report.fidelity``), and per set gives
the Spearman correlation of reported and real cosine across rows and the largest gap.
Writes bench/results/validation.json.

    python bench/validation.py [--sets models validation] [--models resnet vit] \\
        [--ratios 0.2 0.4] [--methods auto magnitude] [--fold-batchnorm]

``--fold-batchnorm``: every net with its BatchNorms folded into the convolutions before it (as
many exporters ship them: bench/folding.py); the same function with no running statistics to
invert. Its rows are the sets "models-folded" and "validation-folded".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from folding import fold_batchnorm
from rich.console import Console
from rich.table import Table

from onnxprune import profiling, prune
from onnxprune.evaluate import evaluate, load_npz
from onnxprune.evidence.calibration import load_calibration
from onnxprune.ir import input_specs, load_model, session

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SETS = {"models": ROOT / "models", "validation": ROOT / "models" / "validation"}
#: models/ takes pixel / 16: its range is part of the input's specification.
MODELS_RANGE = (0.0, 1.0)


def entries(sets: list[str], names: list[str]) -> list[dict]:
    out = []
    for set_name in sets:
        folder = SETS[set_name]
        for e in json.loads((folder / "manifest.json").read_text()):
            if e.get("exporter", "torchscript") != "torchscript" or (names and e["name"] not in names):
                continue
            out.append({**e, "set": set_name, "folder": folder,
                        "input_range": tuple(e.get("input_range", MODELS_RANGE))})
    return out


def logits(model, x: np.ndarray) -> np.ndarray:
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def real_fidelity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean per-sample cosine of the logits, and top-1 agreement."""
    a, b = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), 1.0)
    return float(cos.mean()), float((a.argmax(1) == b.argmax(1)).mean())


def accuracy(model, x: np.ndarray, y: np.ndarray, out: np.ndarray) -> float:
    """Accuracy only (no attacks). evaluate() computes one input gradient per batch even without
    attacks: gradient="auto" (the graph gradient) keeps that cheap, where "finite-difference"
    costs 2 runs per input element (~3 minutes for a 32x32 net on a busy 2-core machine)."""
    acc = evaluate(model, x, y, epsilons=(), pgd_steps=0).accuracy
    if acc != float((out.argmax(1) == y).mean()):
        raise AssertionError(f"evaluate() accuracy {acc} disagrees with the logits' argmax")
    return acc


def run(sets, names, budgets, methods, console: Console, calibrated: bool = False,
        folded: bool = False) -> tuple[list[dict], list[dict]]:
    """``budgets``: ratios (floats) and target shares ("macs=0.5"); each method at its default
    budget kind. ``calibrated``: with the manifest's 64 unlabelled calibration samples (models
    without one are skipped). ``folded``: each model with its BatchNorms folded away."""
    rows, failures = [], []
    for e in entries(sets, names):
        if calibrated and not e.get("calibration"):
            continue
        model = load_model(e["folder"] / e["file"])
        x, y = load_npz(e["folder"] / e["data"])
        base_logits = logits(model, x)
        if folded:
            original, model = base_logits, fold_batchnorm(model)
            base_logits = logits(model, x)
            drift = float(np.abs(base_logits - original).max() / np.abs(original).max())
            if drift > 1e-4:  # folding must not change the function
                raise AssertionError(f"{e['name']}: folding BatchNorm moved the logits by {drift:.1e}")
            e = {**e, "set": f"{e['set']}-folded"}
        calibration = load_calibration(e["folder"] / e["calibration"], input_specs(model)) if calibrated else None
        base_acc = accuracy(model, x, y, base_logits)
        for method in methods:
            for budget in budgets:
                ratio, target = (None, budget) if isinstance(budget, str) else (budget, None)
                t0 = time.perf_counter()
                profiling.reset()
                try:
                    pruned, report = prune(model, ratio, method=method, target=target, input_range=e["input_range"],
                                           check=8, calibration=calibration)
                except Exception as exc:  # a row that fails says so; the bench goes on
                    console.print(f"[red]{e['set']}/{e['name']} {method} {ratio}: {type(exc).__name__}: {exc}[/]")
                    failures.append({"set": e["set"], "model": e["name"], "method": method, "ratio": budget,
                                     "error": f"{type(exc).__name__}: {exc}"})
                    continue
                seconds = time.perf_counter() - t0
                pruned_logits = logits(pruned, x)
                cos, top1 = real_fidelity(base_logits, pruned_logits)
                fid = report.fidelity
                ran = f"{method}:{report.method}" if method == "auto" else method  # auto: what it picked
                row = {"set": e["set"], "model": e["name"], "method": ran + ("+cal" if calibrated else ""),
                       "ratio": report.ratio, "target": report.target,
                       "input_range": list(e["input_range"]),
                       "macs_kept": report.after.macs / report.before.macs,
                       "params_kept": report.after.params / report.before.params,
                       "accuracy": [base_acc, accuracy(pruned, x, y, pruned_logits)],
                       "reported_cosine": None if fid is None else fid.cosine,
                       "reported_top1": None if fid is None else fid.top1,
                       "real_cosine": cos, "real_top1": top1, "prune_seconds": seconds,
                       "evidence_seconds": evidence_seconds(profiling.reset())}
                rows.append(row)
                console.print(f"{e['set']:10s} {e['name']:10s} {method:10s} {budget} ({report.target}) "
                              f"macs {row['macs_kept']:.1%} "
                              f"acc {base_acc:.3f} -> {row['accuracy'][1]:.3f}  cos reported "
                              f"{_f(row['reported_cosine'])} real {cos:.4f}  {seconds:.1f}s")
    return rows, failures


def evidence_seconds(profile: profiling.Profile) -> float:
    """Seconds spent distilling synthetic inputs (planning's and the held-out ones)."""
    return sum(s for path, s in profile.seconds.items() if "distill" in path)


def _f(v, fmt="{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        tie = v == value
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def summary(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for set_name in dict.fromkeys(r["set"] for r in rows):
        pairs = [(r["reported_cosine"], r["real_cosine"], r) for r in rows
                 if r["set"] == set_name and r["reported_cosine"] is not None]
        if not pairs:
            continue
        gaps = [abs(p - q) for p, q, _ in pairs]
        worst = pairs[int(np.argmax(gaps))][2]
        out[set_name] = {
            "rows": len(pairs),
            "spearman_cosine": spearman([p for p, _, _ in pairs], [q for _, q, _ in pairs]),
            "max_cosine_gap": max(gaps),
            "max_gap_row": f"{worst['model']} {worst['method']} {worst['ratio']:.3g}",
            "mean_accuracy_drop": float(np.mean([r["accuracy"][0] - r["accuracy"][1] for r in rows
                                                 if r["set"] == set_name])),
        }
    return out


def table(rows: list[dict]) -> Table:
    t = Table(title="onnxprune: models/ vs the validation zoo (reported fidelity = 8 probes; real = test split)",
              title_justify="left")
    for col in ("set", "model", "method", "ratio", "MACs kept", "accuracy", "rep. cos", "rep. top1",
                "real cos", "real top1", "prune s", "evidence s"):
        t.add_column(col, justify="left" if col in ("set", "model", "method") else "right")
    for r in rows:
        t.add_row(r["set"], r["model"], r["method"], f"{r['ratio']:.3g}", f"{r['macs_kept']:.1%}",
                  f"{r['accuracy'][0]:.3f} → {r['accuracy'][1]:.3f}", _f(r["reported_cosine"]),
                  _f(r["reported_top1"], "{:.0%}"), f"{r['real_cosine']:.4f}", f"{r['real_top1']:.1%}",
                  f"{r['prune_seconds']:.1f}", f"{r['evidence_seconds']:.1f}")
    return t


def summary_table(stats: dict[str, dict]) -> Table:
    t = Table(title="reported vs real output cosine, per set", title_justify="left")
    for col in ("set", "rows", "Spearman", "max |rep - real|", "at", "mean accuracy drop"):
        t.add_column(col, justify="left" if col in ("set", "at") else "right")
    for name, s in stats.items():
        t.add_row(name, str(s["rows"]), _f(s["spearman_cosine"], "{:.3f}"), f"{s['max_cosine_gap']:.4f}",
                  s["max_gap_row"], f"{s['mean_accuracy_drop']:.3f}")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--models", nargs="*", default=[], help="model names (in either set)")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4])
    parser.add_argument("--targets", nargs="*", default=[], help="target shares, e.g. macs=0.5 macs=0.35")
    parser.add_argument("--calibration", action="store_true",
                        help="plan with the manifest's 64 unlabelled calibration samples (models that have them)")
    parser.add_argument("--methods", nargs="+", default=["auto", "magnitude"])
    parser.add_argument("--fold-batchnorm", action="store_true",
                        help="fold every BatchNorm into the layer before it first (no statistics left to invert)")
    parser.add_argument("--out", default=str(RESULTS / "validation.json"))
    args = parser.parse_args()
    console = Console(width=170, stderr=True)
    started = time.perf_counter()
    rows, failures = run(args.sets, args.models, [*args.ratios, *args.targets], args.methods, console, args.calibration,
                       args.fold_batchnorm)
    stats = summary(rows)
    out = Console(width=170)
    out.print(table(rows))
    out.print(summary_table(stats))
    for f in failures:
        out.print(f"[red]failed: {f['set']} {f['model']} {f['method']} {f['ratio']:g}: {f['error'].splitlines()[0]}[/]")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "summary": stats, "failures": failures}, indent=1))
    console.print(f"wrote {path} ({len(rows)} rows, {time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
