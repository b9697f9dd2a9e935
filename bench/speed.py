"""What a user waits for: the `onnxprune` command, each method against magnitude, per model.

For every model of ``models/`` and of the validation zoo, runs ``onnxprune IN OUT --ratio R
--method M`` (the uniform ratio's MACs for the methods that allocate, its channels for the
others; ``--input-range`` from the manifest) as a fresh process, the methods interleaved
model by model so that a busy machine slows them alike, and records the wall seconds, their
ratio to magnitude's on the same model, and the process's peak resident set (maximum RSS,
from the kernel's accounting of the child). Start-up, loading, the check and writing count:
it is the command as a user runs it. Writes bench/results/speed.json.

    python bench/speed.py [--sets models validation] [--models vgg resnet] \\
        [--methods magnitude paoding] [--ratio 0.4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from validation import SETS, entries  # noqa: E402  (the same manifests, the TorchScript exports)


def run_cli(args: list[str]) -> tuple[float, float, int, str]:
    """``(seconds, peak RSS in MB, exit code, last line of stderr)`` of one onnxprune process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stderr = proc.stderr.read()  # stdout goes nowhere: reading one pipe cannot deadlock
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    tail = (stderr.strip().splitlines() or [""])[-1]
    return seconds, usage.ru_maxrss / 1024, proc.returncode, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "paoding"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method and model (the fastest counts)")
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = parser.parse_args()
    console = Console()
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for e in entries(args.sets, args.models):
            lo, hi = e["input_range"]
            path = e["folder"] / e["file"]
            size_mb = os.path.getsize(path) / 2**20
            for method in args.methods:
                best = None
                for _ in range(args.repeats):
                    out = Path(tmp) / f"{e['set']}_{e['name']}_{method}.onnx"
                    cli = [str(path), str(out), "--ratio", str(args.ratio), "--method", method,
                           f"--input-range={lo},{hi}", "--force"]
                    seconds, peak, code, tail = run_cli(cli)
                    if best is None or seconds < best[0]:
                        best = (seconds, peak, code, tail)
                seconds, peak, code, tail = best
                rows.append({"set": e["set"], "model": e["name"], "method": method, "seconds": seconds,
                             "model_mb": size_mb, "peak_rss_mb": peak, "exit": code,
                             "error": tail if code else None})
                console.print(f"{e['set']:10s} {e['name']:10s} {method:10s} {seconds:6.1f} s  "
                              f"peak {peak:5.0f} MB  exit {code}" + (f"  {tail}" if code else ""))
    base = {(r["set"], r["model"]): r["seconds"] for r in rows if r["method"] == "magnitude" and not r["exit"]}
    for r in rows:
        ref = base.get((r["set"], r["model"]))
        r["vs_magnitude"] = r["seconds"] / ref if ref and not r["exit"] else None
    table = Table(title=f"onnxprune CLI at --ratio {args.ratio}: wall seconds (start-up included), "
                        "ratio to magnitude on the same model, peak RSS")
    for col in ("set", "model", "method", "seconds", "x magnitude", "peak RSS MB", "aim MB"):
        table.add_column(col, justify="left" if col in ("set", "model", "method") else "right")
    for r in rows:
        table.add_row(r["set"], r["model"], r["method"], f"{r['seconds']:.1f}" if not r["exit"] else f"exit {r['exit']}",
                      "-" if r["vs_magnitude"] is None else f"{r['vs_magnitude']:.1f}x", f"{r['peak_rss_mb']:.0f}",
                      f"{1024 + 3 * r['model_mb']:.0f}")
    console.print(table)
    console.print(f"bench took {time.perf_counter() - started:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"ratio": args.ratio, "methods": args.methods, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
