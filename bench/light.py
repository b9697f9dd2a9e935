"""Benchmark: the nine light models of the onnx wheel pruned at one ratio.

Prints parameters and MACs kept, groups pruned/blocked, prune wall time, and the pruned
model's latency relative to the original (both timed in one run, interleaved, one thread),
against the target "latency falls at least 0.8 x the share of MACs removed".

    python bench/light.py [--ratio 0.4] [--method paoding] [--json out.json] [--models resnet50 vgg19]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from light_models import LIGHT_MODELS, materialise  # noqa: E402
from onnxprune.passes.registry import METHODS  # noqa: E402

from onnxprune import prune  # noqa: E402
from onnxprune.fidelity import latency_ratio  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--models", nargs="*", default=LIGHT_MODELS)
    parser.add_argument("--method", choices=sorted(METHODS), default="magnitude")
    parser.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of N")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing budget per model")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    table = Table(title=f"light models: {args.method} at ratio {args.ratio}, round-to {args.round_to}",
                  title_justify="left")
    for col in ("model", "params kept", "MACs kept", "groups pruned/blocked", "prune s", "latency ms",
                "latency kept", "target"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = []
    for name in args.models:
        model = materialise(name)
        t0 = time.perf_counter()
        pruned, report = prune(model, args.ratio, method=args.method, round_to=args.round_to, check=1)
        seconds = time.perf_counter() - t0
        before, after, ratio = latency_ratio(model, pruned, report.input_shapes, seconds=args.seconds)
        macs_kept = report.after.macs / report.before.macs
        target = 1 - 0.8 * (1 - macs_kept)
        blocked = report.groups_total - report.groups_prunable
        row = {"model": name, "method": args.method, "params_kept": report.after.params / report.before.params,
               "macs_kept": macs_kept, "groups_pruned": report.groups_pruned, "groups_blocked": blocked, "prune_seconds": seconds,
               "latency_ms": [before, after], "latency_kept": ratio, "latency_target": target}
        rows.append(row)
        table.add_row(name, f"{row['params_kept']:.1%}", f"{macs_kept:.1%}", f"{report.groups_pruned}/{blocked}",
                      f"{seconds:.1f}", f"{before:.1f} → {after:.1f}", f"{ratio:.1%}",
                      ("[green]" if ratio <= target else "[red]") + f"≤ {target:.1%}[/]")
    Console(width=160).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
