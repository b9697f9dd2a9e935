"""make bench: every registered method at equal MACs, on models/ and the validation zoo.

For each model of ``--sets`` (models/: TorchScript exports, inputs in [0, 1]; the validation
zoo, never tuned on: input ranges from its manifest), each budget (``--targets``, shares to
keep such as macs=0.5; ``--ratios``, uniform ratios at each method's default budget kind) and
each method (every one in onnxprune.passes.registry, so a method registered later runs too;
``NAME-raw`` (no compensation), ``NAME-ls`` / ``NAME-pair`` (reconstruction) and ``NAME-macs``
(a ratio's MACs) as variants): prune, evaluate on the test split, time.

Columns: MACs and parameters kept; latency kept (onnxruntime, the pruned model against the
original timed interleaved, medians, at one thread and at all threads); top-1 accuracy and
FGSM(0.05) accuracy before -> after; prune seconds, and their ratio to magnitude's on the same
model and budget. Latency follows widths, not MACs alone: at ``--round-to 1`` (the MACs targets'
default) widths off the CPU's channel block can run slower than the unpruned model; ``--round-to
16`` aligns them. Writes bench/results/bench.json and, when matplotlib is installed, one
Pareto plot per model (accuracy and FGSM accuracy against MACs kept, every method):
bench/results/pareto_<set>_<model>.png.

    python bench/run.py [--quick] [--sets models validation] [--models vgg resnet] \\
        [--targets macs=0.7 macs=0.5 macs=0.35] [--ratios 0.4] [--methods paoding magnitude] [--round-to 16] \\
        [--seeds 0 1 2] [--no-latency] [--prune-hidden] [--prune-head-dim]

``--seeds``: every row at each seed; the table and the plots give the mean accuracy and its
range over them (one seed's plan can move a net's accuracy by several points: a digits
ResNeXt at the uniform-0.4 MACs kept 0.773, 0.700 and 0.660 at seeds 0, 1, 2).

``--quick``: models/ vgg and resnet, magnitude and the default method, macs=0.5 (explicit
options override its parts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from onnxprune.passes.registry import METHODS
from rich.console import Console
from rich.table import Table

from onnxprune import prune
from onnxprune.evaluate import evaluate, load_npz
from onnxprune.ir import load_model, random_inputs
from onnxprune.latency import measure
from onnxprune.pipeline import DEFAULT_METHOD, analyse, choose_method

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SETS = {"models": ROOT / "models", "validation": ROOT / "models" / "validation"}
#: models/ takes pixel / 16: the range is part of the input's specification, not data.
MODELS_RANGE = (0.0, 1.0)
TARGETS = ["macs=0.7", "macs=0.5", "macs=0.35"]
QUICK = {"sets": ["models"], "models": ["vgg", "resnet"], "methods": ["magnitude", DEFAULT_METHOD],
         "targets": ["macs=0.5"]}
#: Seconds of interleaved runs per latency measurement (each thread setting).
LATENCY_SECONDS = 0.5
EPSILON = 0.05


def entries(sets: list[str], names: list[str], exporter: str = "torchscript") -> list[dict]:
    out = []
    for set_name in sets:
        folder = SETS[set_name]
        for e in json.loads((folder / "manifest.json").read_text()):
            if e.get("exporter", "torchscript") != exporter or (names and e["name"] not in names):
                continue
            out.append({**e, "set": set_name, "folder": folder,
                        "input_range": tuple(e.get("input_range", MODELS_RANGE))})
    return out


def _evaluate(model, x, y) -> tuple[float, float]:
    report = evaluate(model, x, y, epsilons=(EPSILON,), pgd_steps=0)
    return report.accuracy, report.fgsm[EPSILON]


def _prune(model, method: str, budget, input_range, round_to: int | None, seed: int = 0, options: dict | None = None):
    """One prune: ``budget`` a target ("macs=0.5") or a ratio; ``method`` NAME or NAME-variant."""
    name, _, variant = method.partition("-")
    ratio, target = (None, budget) if isinstance(budget, str) else (budget, "macs" if variant == "macs" else None)
    return prune(model, ratio, method=name, target=target, compensate=variant != "raw",
                 reconstruction={"ls": "least-squares", "pair": "pair"}.get(variant), input_range=input_range,
                 check=1, round_to=round_to, seed=seed, options=options)


def _latency(model, pruned, shapes) -> dict[str, float]:
    feed = random_inputs(model, shapes, np.random.default_rng(0))
    return {("all" if t == 0 else str(t)): measure(model, pruned, feed, t, LATENCY_SECONDS).share for t in (1, 0)}


def run(entries_: list[dict], budgets: list, methods: list[str], console: Console,
        round_to: int | None = None, seeds: tuple[int, ...] = (0,), latency: bool = True,
        options: dict | None = None) -> tuple[list[dict], list[dict]]:
    rows, failures = [], []
    for e in entries_:
        model = load_model(e["folder"] / e["file"])
        x, y = load_npz(e["folder"] / e["data"])
        base_acc, base_fgsm = _evaluate(model, x, y)
        default, _ = choose_method(analyse(model))  # what the default (auto) runs on this model
        for budget, seed in ((b, s) for b in budgets for s in seeds):
            for method in methods:
                t0 = time.perf_counter()
                try:
                    pruned, report = _prune(model, method, budget, e["input_range"], round_to, seed, options)
                except Exception as exc:  # a row that fails says so; the bench goes on
                    console.print(f"[red]{e['set']}/{e['name']} {method} {budget}: {type(exc).__name__}: {exc}[/]")
                    failures.append({"set": e["set"], "model": e["name"], "method": method, "budget": budget,
                                     "error": f"{type(exc).__name__}: {exc}"})
                    continue
                seconds = time.perf_counter() - t0
                acc, fgsm = _evaluate(pruned, x, y)
                row = {"set": e["set"], "model": e["name"], "method": method, "budget": budget, "seed": seed,
                       "target": report.target, "ratio": report.ratio,
                       "macs_kept": report.after.macs / report.before.macs,
                       "params_kept": report.after.params / report.before.params,
                       "latency_kept": _latency(model, pruned, report.input_shapes) if latency else None,
                       "accuracy": [base_acc, acc], f"fgsm_{EPSILON}": [base_fgsm, fgsm],
                       "prune_seconds": seconds, "warnings": report.warnings,
                       "digest": hashlib.sha256(pruned.SerializeToString()).hexdigest()[:16],
                       "ran": report.method, "default": default}
                rows.append(row)
                console.print(f"{e['set']:10s} {e['name']:10s} {method:10s} {budget} seed {seed} macs {row['macs_kept']:.1%} "
                              f"acc {base_acc:.3f} -> {acc:.3f} fgsm {base_fgsm:.3f} -> {fgsm:.3f} {seconds:.1f}s")
    _against_magnitude(rows)
    return rows, failures


def _against_magnitude(rows: list[dict]) -> None:
    """Each row's prune seconds over magnitude's on the same model and budget (None without it)."""
    base = {(r["set"], r["model"], str(r["budget"]), r["seed"]): r["prune_seconds"]
            for r in rows if r["method"] == "magnitude"}
    for r in rows:
        ref = base.get((r["set"], r["model"], str(r["budget"]), r["seed"]))
        r["seconds_vs_magnitude"] = r["prune_seconds"] / ref if ref else None


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per set, model, method and budget: means over its seeds, with the accuracy's
    range over them (``accuracy_range``) and how many seeds (``seeds``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["model"], r["method"], str(r["budget"])), []).append(r)
    out = []
    for group in groups.values():
        first = group[0]

        def mean(get, group=group):
            values = [get(r) for r in group]
            return None if any(v is None for v in values) else float(np.mean(values))

        row = {**first, "seeds": len(group),
               "macs_kept": mean(lambda r: r["macs_kept"]), "params_kept": mean(lambda r: r["params_kept"]),
               "accuracy": [first["accuracy"][0], mean(lambda r: r["accuracy"][1])],
               "accuracy_range": [min(r["accuracy"][1] for r in group), max(r["accuracy"][1] for r in group)],
               f"fgsm_{EPSILON}": [first[f"fgsm_{EPSILON}"][0], mean(lambda r: r[f"fgsm_{EPSILON}"][1])],
               "prune_seconds": mean(lambda r: r["prune_seconds"]),
               "seconds_vs_magnitude": mean(lambda r: r["seconds_vs_magnitude"])}
        if first["latency_kept"] is not None:
            row["latency_kept"] = {k: mean(lambda r, k=k: r["latency_kept"][k]) for k in first["latency_kept"]}
        out.append(row)
    return out


def _label(row: dict, method: str | None = None) -> str:
    """The method's name; "(default)" where it is what the default runs on this model (auto
    picks per model: a row of auto itself names the method it ran)."""
    method = method or row["method"]
    if method == DEFAULT_METHOD:
        return f"{method}: {row.get('ran', '?')} (default)"
    return f"{method} (default)" if method == row.get("default") else method


def table(rows: list[dict]) -> Table:
    t = Table(title="onnxprune bench: every method at equal budgets (test splits; latency: onnxruntime, "
              "interleaved medians)", title_justify="left")
    for col in ("set", "model", "method", "budget", "MACs", "params", "lat 1t", "lat all", "accuracy",
                f"FGSM({EPSILON})", "prune s", "x magn."):
        t.add_column(col, justify="left" if col in ("set", "model", "method") else "right")
    best = {}
    for r in rows:
        key = (r["set"], r["model"], str(r["budget"]))
        best[key] = max(best.get(key, 0.0), r["accuracy"][1])
    for r in rows:
        acc = f"{r['accuracy'][0]:.3f} → {r['accuracy'][1]:.3f}"
        if r.get("seeds", 1) > 1:
            acc += f" ({r['accuracy_range'][0]:.3f}–{r['accuracy_range'][1]:.3f}, {r['seeds']} seeds)"
        if r["accuracy"][1] == best[(r["set"], r["model"], str(r["budget"]))]:
            acc = f"[bold]{acc}[/]"
        lat = r["latency_kept"] or {"1": None, "all": None}
        fgsm = r[f"fgsm_{EPSILON}"]
        ratio = r["seconds_vs_magnitude"]
        t.add_row(r["set"], r["model"], _label(r), str(r["budget"]), f"{r['macs_kept']:.1%}",
                  f"{r['params_kept']:.1%}", *("-" if lat[k] is None else f"{lat[k]:.1%}" for k in ("1", "all")),
                  acc, f"{fgsm[0]:.3f} → {fgsm[1]:.3f}", f"{r['prune_seconds']:.1f}",
                  "-" if ratio is None else f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x")
    return t


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """One figure per model: accuracy and FGSM accuracy against MACs kept, a line per method
    through its budgets (the unpruned model at 1.0 starts every line)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for set_name, model in dict.fromkeys((r["set"], r["model"]) for r in rows):
        mine = [r for r in rows if r["set"] == set_name and r["model"] == model]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        for ax, key, label in ((axes[0], "accuracy", "top-1 accuracy"),
                               (axes[1], f"fgsm_{EPSILON}", f"FGSM({EPSILON}) accuracy")):
            for method in dict.fromkeys(r["method"] for r in mine):
                pts = sorted((r["macs_kept"], r[key][1]) for r in mine if r["method"] == method)
                xs, ys = zip(*([(1.0, mine[0][key][0])] + pts[::-1]))
                ax.plot(xs, ys, marker="o", label=_label(next(r for r in mine if r["method"] == method), method))
            ax.set_xlabel("MACs kept")
            ax.set_ylabel(label)
            ax.set_ylim(0, 1.02)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{set_name}/{model}")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"pareto_{set_name}_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="models/ vgg+resnet, magnitude and the default, macs=0.5")
    parser.add_argument("--sets", nargs="+", choices=list(SETS))
    parser.add_argument("--models", nargs="*", help="model names (in either set)")
    parser.add_argument("--targets", nargs="*", help=f"shares to keep (default {' '.join(TARGETS)})")
    parser.add_argument("--ratios", nargs="*", type=float, default=[], help="uniform ratios, besides the targets")
    parser.add_argument("--methods", nargs="*", help="registered methods and variants (default: every one registered)")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument("--round-to", type=int, help="keep channel counts multiples of N (default: each budget's)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0],
                        help="seeds per row (several: accuracy as the mean and range over them)")
    parser.add_argument("--no-latency", action="store_true", help="skip timing the pruned models")
    parser.add_argument("--prune-hidden", action="store_true",
                        help="transformers: prune the hidden width (residual stream) too, as the CLI's --prune-hidden")
    parser.add_argument("--prune-head-dim", action="store_true",
                        help="transformers: prune dimensions inside each head instead of whole heads (--prune-head-dim)")
    parser.add_argument("--out", default=str(RESULTS / "bench.json"))
    args = parser.parse_args()
    preset = QUICK if args.quick else {"sets": list(SETS), "models": [], "methods": list(METHODS), "targets": TARGETS}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    console = Console(width=170, stderr=True)
    started = time.perf_counter()
    rows, failures = run(entries(args.sets, args.models, args.exporter), [*args.targets, *args.ratios], args.methods,
                         console, args.round_to, tuple(args.seeds), not args.no_latency,
                         {k: True for k, on in (("prune_hidden", args.prune_hidden),
                                                ("prune_head_dim", args.prune_head_dim)) if on} or None)
    summary = aggregate(rows)
    Console(width=170).print(table(summary))
    for f in failures:
        console.print(f"[red]failed: {f['set']} {f['model']} {f['method']} {f['budget']}: "
                      f"{f['error'].splitlines()[0]}[/]")
    for r in rows:
        for w in r["warnings"]:
            console.print(f"[yellow]{r['set']}/{r['model']} {r['method']} {r['budget']}: {w}[/]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - started
    out.write_text(json.dumps({"rows": rows, "failures": failures, "seconds": seconds, "round_to": args.round_to,
                               "methods": args.methods, "budgets": [*args.targets, *args.ratios],
                               "seeds": args.seeds, "prune_hidden": args.prune_hidden,
                               "prune_head_dim": args.prune_head_dim, "summary": summary}, indent=1))
    plots = plot(summary, out.parent)
    console.print(f"wrote {out}" + (f" and {len(plots)} Pareto plots ({plots[0].parent}/pareto_*.png)" if plots else
                                    " (no plots: pip install matplotlib, or make bench)"))
    console.print(f"bench took {seconds:.0f} s")
    sys.exit(0 if rows else 1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
