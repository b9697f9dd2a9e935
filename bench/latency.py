"""How well the latency cost model predicts what onnxruntime measures (docs/performance.md).

For each model (models/ and the validation zoo), at one thread and at all threads: the
machine's calibration (its fit on the one-op chains), the model's refit (timed at full width
and at the uniform ratios of REFIT_RATIOS), then uniform plans at ``--ratios`` (other widths
than the refit's) timed interleaved with the original. Each row sets the measured latency
share beside the share the calibration alone predicts and the share the refitted model
predicts, with the MACs share for reference. Channel counts are aligned as a latency target
aligns them (the CPU's channel block) unless ``--round-to`` says otherwise. Then, with
``--targets``, whole prunes (magnitude) at latency targets: predicted against measured.
Writes bench/results/latency.json.

    python bench/latency.py [--sets models validation] [--models vgg resnet] [--threads 1 0] \\
        [--ratios 0.25 0.5 0.75] [--round-to 16] [--targets latency=0.8 latency=0.6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from onnxprune.passes.cost import MacModel
from onnxprune.passes.latency import REFIT_RATIOS, latency_model, latency_terms, uniform_removal, uniform_variant
from rich.console import Console
from rich.table import Table

from onnxprune import analyse, prune
from onnxprune.errors import UserError
from onnxprune.ir import interleaved_medians, load_model, random_inputs, session
from onnxprune.latency import calibrate, channel_block

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SETS = {"models": ROOT / "models", "validation": ROOT / "models" / "validation"}


def entries(sets: list[str], names: list[str]) -> list[dict]:
    out = []
    for set_name in sets:
        folder = SETS[set_name]
        for e in json.loads((folder / "manifest.json").read_text()):
            if e.get("exporter", "torchscript") == "torchscript" and (not names or e["name"] in names):
                out.append({**e, "set": set_name, "path": folder / e["file"],
                            "input_range": tuple(e.get("input_range", (0.0, 1.0)))})
    return out


def uniform_rows(entry: dict, threads: int, ratios: list[float], round_to: int, seconds: float) -> list[dict]:
    """Measured against predicted latency shares of uniform plans of one model."""
    analysis = analyse(load_model(entry["path"]), input_range=entry["input_range"])
    groups = analysis.dep.prunable_groups([])
    refit = latency_model(analysis, groups, threads, round_to)
    raw = MacModel(analysis.dep, groups, "latency", latency_terms(analysis.dep, calibrate(threads)))
    macs = MacModel(analysis.dep, groups, "macs")
    removals = [uniform_removal(groups, r, round_to) for r in ratios]
    models = [analysis.model] + [uniform_variant(analysis, r) for r in removals]
    feed = random_inputs(analysis.model, analysis.input_shapes, np.random.default_rng(0))
    measured = interleaved_medians([(session(m, threads), feed) for m in models], seconds)
    rows = []
    for ratio, removed, t in zip(ratios, removals, measured[1:]):
        rows.append({"set": entry["set"], "model": entry["name"], "threads": threads, "ratio": ratio,
                     "round_to": round_to, "base_us": measured[0] * 1e6, "measured": t / measured[0],
                     "calibration_only": raw.after_removal(removed) / raw.base,
                     "refitted": refit.after_removal(removed) / refit.base,
                     "macs": macs.after_removal(removed) / macs.base, "fixed_share": refit.fit.fixed_share})
    return rows


def target_rows(entry: dict, threads: int, targets: list[str]) -> list[dict]:
    rows = []
    for target in targets:
        try:
            _, report = prune(load_model(entry["path"]), method="magnitude", target=target, check=0,
                              input_range=entry["input_range"], latency_threads=threads)
        except UserError as exc:
            rows.append({"set": entry["set"], "model": entry["name"], "threads": threads, "target": target,
                         "error": str(exc)})
            continue
        check = report.latency
        rows.append({"set": entry["set"], "model": entry["name"], "threads": threads, "target": target,
                     "predicted": check.predicted_share, "measured": {m.threads: m.share for m in check.measured},
                     "macs": report.after.macs / report.before.macs})
    return rows


def calibration_table(threads: list[int]) -> Table:
    t = Table(title="calibration on one-op chains (this machine)", title_justify="left")
    for col in ("threads", "chains", "run us", "median |error|", "worst |error|", "seconds"):
        t.add_column(col, justify="right")
    for n in threads:
        c = calibrate(n)
        t.add_row("all" if n == 0 else str(n), str(c.chains), f"{c.session_us:.1f}", f"{c.median_error:.1%}",
                  f"{c.worst_error:.1%}", f"{c.seconds:.1f}")
    return t


def uniform_table(rows: list[dict]) -> Table:
    t = Table(title="latency kept by uniform plans: measured vs predicted (refit on "
              f"{', '.join(map(str, REFIT_RATIOS))})", title_justify="left")
    for col in ("set", "model", "threads", "full us", "fixed", "ratio", "MACs", "measured", "calibration",
                "refitted", "|refit - measured|"):
        t.add_column(col, justify="left" if col in ("set", "model") else "right")
    for r in rows:
        t.add_row(r["set"], r["model"], "all" if r["threads"] == 0 else str(r["threads"]), f"{r['base_us']:.0f}",
                  f"{r['fixed_share']:.0%}", f"{r['ratio']:g}", f"{r['macs']:.2f}", f"{r['measured']:.2f}",
                  f"{r['calibration_only']:.2f}", f"{r['refitted']:.2f}", f"{abs(r['refitted'] - r['measured']):.3f}")
    return t


def summary(rows: list[dict]) -> dict:
    out = {}
    for threads in sorted({r["threads"] for r in rows}):
        mine = [r for r in rows if r["threads"] == threads]
        for key in ("calibration_only", "refitted"):
            err = np.array([abs(r[key] - r["measured"]) for r in mine])
            out[f"{'all' if threads == 0 else threads} threads, {key}"] = {
                "median": float(np.median(err)), "max": float(err.max()), "within_0.02": float((err <= 0.02).mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 0], help="0: all threads")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--round-to", type=int, default=None, help="default: the CPU's channel block")
    parser.add_argument("--seconds", type=float, default=2.0, help="interleaved timing per model")
    parser.add_argument("--targets", nargs="*", default=[], help="e.g. latency=0.8 latency=0.6 (magnitude)")
    parser.add_argument("--out", default=str(RESULTS / "latency.json"))
    args = parser.parse_args()
    console = Console(width=170)
    started = time.perf_counter()
    round_to = args.round_to or channel_block()
    rows, targets = [], []
    for entry in entries(args.sets, args.models):
        for threads in args.threads:
            rows.extend(uniform_rows(entry, threads, args.ratios, round_to, args.seconds))
            targets.extend(target_rows(entry, threads, args.targets))
            console.print(f"{entry['set']}/{entry['name']} threads {threads} done", style="dim")
    console.print(calibration_table(args.threads))
    console.print(uniform_table(rows))
    stats = summary(rows)
    console.print(stats)
    for r in targets:
        console.print(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"round_to": round_to, "calibration": {n: calibrate(n).to_dict() for n in args.threads},
                               "uniform": rows, "summary": stats, "targets": targets}, indent=1))
    console.print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
