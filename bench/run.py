"""make bench: every model in models/ x ratios x methods, pruned, evaluated, timed; one table.

Columns: parameters and MACs kept, latency of the pruned model over the original in
onnxruntime (interleaved in one run, one thread), top-1 accuracy and FGSM(0.05) accuracy
before -> after on the held-out digits, prune seconds. Every registered method runs, plus
``magnitude-raw`` (no compensation: what other pruners do), ``magnitude-ls`` (least-squares
reconstruction), ``paoding-pair`` (the papers' pair merges instead of least squares) and
``paoding-macs`` / ``srdfp-macs`` (the budget is the MACs a uniform ratio leaves, for
same-size comparisons). Writes bench/results/bench.json
and, when matplotlib is installed, bench/results/pareto.png (accuracy against MACs kept).

    python bench/run.py [--models vgg resnet] [--ratios 0.2 0.4] [--methods paoding magnitude]
"""

from __future__ import annotations

import argparse
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
from onnxprune.fidelity import latency_ratio
from onnxprune.ir import load_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
RESULTS = ROOT / "bench" / "results"
#: The digits inputs live in [0, 1]: the range is part of the input's specification, not data.
INPUT_RANGE = (0.0, 1.0)


def _evaluate(model, x, y) -> tuple[float, float]:
    report = evaluate(model, x, y, epsilons=(0.05,), pgd_steps=0)
    return report.accuracy, report.fgsm[0.05]


def run(models: list[str], ratios: list[float], methods: list[str], exporter: str, console: Console) -> list[dict]:
    manifest = json.loads((MODELS / "manifest.json").read_text())
    entries = [e for e in manifest if e["exporter"] == exporter and (not models or e["name"] in models)]
    rows = []
    for entry in entries:
        model = load_model(MODELS / entry["file"])
        x, y = load_npz(MODELS / entry["data"])
        base_acc, base_fgsm = _evaluate(model, x, y)
        for method in methods:
            # NAME, NAME-raw (no compensation), NAME-macs, NAME-ls / NAME-pair (reconstruction)
            name, _, variant = method.partition("-")
            reconstruction = {"ls": "least-squares", "pair": "pair"}.get(variant)
            for ratio in ratios:
                t0 = time.perf_counter()
                try:
                    pruned, report = prune(model, ratio, method=name, compensate=variant != "raw",
                                           target="macs" if variant == "macs" else "channels",
                                           reconstruction=reconstruction, input_range=INPUT_RANGE, check=1)
                except Exception as exc:  # a row that fails says so; the bench goes on
                    console.print(f"[red]{entry['name']} {method} {ratio}: {exc}[/]")
                    continue
                seconds = time.perf_counter() - t0
                acc, fgsm = _evaluate(pruned, x, y)
                _, _, latency = latency_ratio(model, pruned, report.input_shapes, seconds=0.5)
                row = {"model": entry["name"], "method": method, "ratio": ratio,
                       "params_kept": report.after.params / report.before.params,
                       "macs_kept": report.after.macs / report.before.macs, "latency_kept": latency,
                       "accuracy": [base_acc, acc], "fgsm_0.05": [base_fgsm, fgsm], "prune_seconds": seconds}
                rows.append(row)
                console.print(f"{entry['name']:10s} {method:14s} {ratio:.1f} acc {base_acc:.3f} -> {acc:.3f} "
                              f"fgsm {base_fgsm:.3f} -> {fgsm:.3f} macs {row['macs_kept']:.1%} {seconds:.1f}s")
    return rows


def table(rows: list[dict]) -> Table:
    t = Table(title="onnxprune bench (digits test split, 450 samples)", title_justify="left")
    for col in ("model", "method", "ratio", "params", "MACs", "latency", "accuracy", "FGSM(0.05)", "prune s"):
        t.add_column(col, justify="left" if col in ("model", "method") else "right")
    best = {}
    for r in rows:
        key = (r["model"], r["ratio"])
        best[key] = max(best.get(key, 0), r["accuracy"][1])
    for r in rows:
        acc = f"{r['accuracy'][0]:.3f} → {r['accuracy'][1]:.3f}"
        if r["accuracy"][1] == best[(r["model"], r["ratio"])]:
            acc = f"[bold]{acc}[/]"
        t.add_row(r["model"], r["method"], f"{r['ratio']:g}", f"{r['params_kept']:.1%}", f"{r['macs_kept']:.1%}",
                  f"{r['latency_kept']:.1%}", acc, f"{r['fgsm_0.05'][0]:.3f} → {r['fgsm_0.05'][1]:.3f}",
                  f"{r['prune_seconds']:.1f}")
    return t


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["macs_kept"], r["accuracy"][1]) for r in rows if r["model"] == name and r["method"] == method)
            if pts:
                base = next(r["accuracy"][0] for r in rows if r["model"] == name)
                xs, ys = zip(*([(1.0, base)] + pts[::-1]))
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(name)
        ax.set_xlabel("MACs kept")
        ax.set_ylim(0, 1.02)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4, 0.6])
    parser.add_argument("--methods", nargs="*",
                        default=[*METHODS, "magnitude-raw", "magnitude-ls", "paoding-pair", "paoding-macs", "srdfp-macs"])
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument("--out", default=str(RESULTS / "bench.json"))
    args = parser.parse_args()
    console = Console(width=170, stderr=True)
    started = time.perf_counter()
    rows = run(args.models, args.ratios, args.methods, args.exporter, console)
    Console(width=170).print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    if plot(rows, out.with_name("pareto.png")):
        console.print(f"wrote {out} and {out.with_name('pareto.png')}")
    console.print(f"bench took {time.perf_counter() - started:.0f} s")
    sys.exit(0 if rows else 1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
