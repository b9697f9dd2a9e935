"""make bench-regress: the default method on every digits net of both sets, against a committed baseline.

One fixed run (the default method, seed 0, ``macs=0.5``, ``macs=0.35`` and ratio 0.2, no
latency: the budgets issues #12 and #13 set their aims at) on every net of ``models/`` and
of the validation zoo, compared row by row with ``bench/baseline/regress.json``: accuracy
before and now, MACs kept, prune seconds (their ratio: machines differ, so it is shown, never
judged), and whether the pruned model is the same bytes (a change that should not move a plan
shows here first; onnxruntime on another CPU may move one by itself, so neither is a failure).

A row whose test accuracy fell by more than ``--tolerance`` (default one point) fails the
run (exit 1), as does a row that failed to prune or a baseline row that is missing; rows that
rose by as much are listed too. The summary gives both sets side by side: mean accuracy per
budget and how many nets meet the issues' aims (ratio 0.2 and macs=0.5: within one point of
unpruned; macs=0.35: at least 0.95).

    python bench/regress.py [--update] [--tolerance 0.01] [--models vgg resnet] [--out F]

``--update`` writes the run as the new baseline (after a change whose plans should move, with
the table that shows it in the commit). About 12 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, ROOT, entries, run  # noqa: E402

from onnxprune.pipeline import DEFAULT_METHOD  # noqa: E402

BASELINE = ROOT / "bench" / "baseline" / "regress.json"
SETS = ["models", "validation"]
BUDGETS = ["macs=0.5", "macs=0.35", 0.2]
SEED = 0


def key(row: dict) -> tuple[str, str, str]:
    return row["set"], row["model"], str(row["budget"])


def meets_aim(row: dict) -> bool:
    """#12: ratio 0.2 within one point of unpruned; #13: macs=0.5 within one point, macs=0.35 at
    least 0.95."""
    before, after = row["accuracy"]
    return after >= 0.95 if str(row["budget"]) == "macs=0.35" else after >= before - 0.01


def compare(rows: list[dict], baseline: list[dict], tolerance: float) -> tuple[Table, list[str]]:
    """The row-by-row table, and what fails the run."""
    old = {key(r): r for r in baseline}
    t = Table(title=f"bench-regress: {DEFAULT_METHOD} (seed {SEED}) against {BASELINE.relative_to(ROOT)}",
              title_justify="left")
    for col in ("set", "model", "budget", "ran", "unpruned", "baseline", "now", "change", "MACs kept", "seconds",
                "same bytes", "aim"):
        t.add_column(col, justify="left" if col in ("set", "model", "ran") else "right")
    failures = []
    for r in rows:
        b = old.get(key(r))
        now = r["accuracy"][1]
        aim = "met" if meets_aim(r) else "[yellow]missed[/]"
        if b is None:
            t.add_row(r["set"], r["model"], str(r["budget"]), r["ran"], f"{r['accuracy'][0]:.3f}", "-", f"{now:.3f}",
                      "new", f"{r['macs_kept']:.1%}", f"{r['prune_seconds']:.0f}", "-", aim)
            continue
        change = now - b["accuracy"][1]
        shown = f"{change:+.3f}"
        if change < -tolerance:
            shown = f"[red]{shown}[/]"
            failures.append(f"{'/'.join(key(r))}: accuracy {b['accuracy'][1]:.3f} -> {now:.3f}")
        elif change > tolerance:
            shown = f"[green]{shown}[/]"
        macs = f"{r['macs_kept']:.1%}" + ("" if abs(r["macs_kept"] - b["macs_kept"]) < 5e-4 else
                                          f" (was {b['macs_kept']:.1%})")
        seconds = f"{r['prune_seconds']:.0f} ({r['prune_seconds'] / b['prune_seconds']:.2f}x)"
        same = "yes" if r.get("digest") and r.get("digest") == b.get("digest") else "no"
        t.add_row(r["set"], r["model"], str(r["budget"]), r["ran"], f"{r['accuracy'][0]:.3f}",
                  f"{b['accuracy'][1]:.3f}", f"{now:.3f}", shown, macs, seconds, same, aim)
    ran = {key(r) for r in rows}
    failures += [f"{'/'.join(k)}: in the baseline, not in this run" for k in old if k not in ran]
    return t, failures


def summary(rows: list[dict]) -> Table:
    """Both sets side by side: per budget, mean accuracy (unpruned -> pruned) and nets meeting the aim."""
    t = Table(title="both sets side by side (models/ was tuned on, the zoo never)", title_justify="left")
    t.add_column("budget")
    for s in SETS:
        t.add_column(f"{s}: mean accuracy", justify="right")
        t.add_column(f"{s}: aim met", justify="right")
    for budget in BUDGETS:
        cells = []
        for s in SETS:
            group = [r for r in rows if r["set"] == s and str(r["budget"]) == str(budget)]
            if not group:
                cells += ["-", "-"]
                continue
            before = sum(r["accuracy"][0] for r in group) / len(group)
            after = sum(r["accuracy"][1] for r in group) / len(group)
            missed = [r["model"] for r in group if not meets_aim(r)]
            cells += [f"{before:.3f} -> {after:.3f}",
                      f"{len(group) - len(missed)}/{len(group)}" + (f" (not: {', '.join(missed)})" if missed else "")]
        t.add_row(str(budget), *cells)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write this run as the new baseline")
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop that fails a row")
    parser.add_argument("--models", nargs="*", default=[], help="model names (default: every net of both sets)")
    parser.add_argument("--out", default=str(RESULTS / "regress.json"))
    args = parser.parse_args()
    console = Console(width=170, stderr=True)
    started = time.perf_counter()
    rows, errors = run(entries(SETS, args.models), BUDGETS, [DEFAULT_METHOD], console, seeds=(SEED,), latency=False)
    seconds = time.perf_counter() - started
    record = {"method": DEFAULT_METHOD, "seed": SEED, "budgets": BUDGETS, "seconds": seconds,
              "rows": [{k: r[k] for k in ("set", "model", "budget", "ran", "accuracy", "macs_kept", "params_kept",
                                          "prune_seconds", "digest")} for r in rows]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    out_console = Console(width=170)
    failures = [f"{e['set']}/{e['model']}/{e['budget']}: {e['error'].splitlines()[0]}" for e in errors]
    if args.update:
        BASELINE.parent.mkdir(parents=True, exist_ok=True)
        BASELINE.write_text(json.dumps(record, indent=1) + "\n")
        console.print(f"wrote the baseline {BASELINE.relative_to(ROOT)} ({len(rows)} rows)")
    elif BASELINE.exists():
        baseline = json.loads(BASELINE.read_text())["rows"]
        if args.models:
            baseline = [b for b in baseline if b["model"] in args.models]
        table, found = compare(record["rows"], baseline, args.tolerance)
        out_console.print(table)
        failures += found
    else:
        console.print(f"[yellow]no baseline at {BASELINE.relative_to(ROOT)}: run with --update to make one[/]")
    out_console.print(summary(record["rows"]))
    console.print(f"wrote {out}; bench-regress took {seconds:.0f} s")
    for f in failures:
        console.print(f"[red]regressed: {f}[/]")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
