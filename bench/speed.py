"""What a user waits for: the `onnxprune` command, each method against magnitude, per model.

For every model of ``models/`` and of the validation zoo, runs ``onnxprune IN OUT --ratio R
--method M`` (the uniform ratio's MACs for the methods that allocate, its channels for the
others; ``--input-range`` from the manifest) as a fresh process, the methods interleaved
model by model so that a busy machine slows them alike, and records the wall seconds, their
ratio to magnitude's on the same model, and the process's peak resident set (maximum RSS,
from the kernel's accounting of the child). Start-up, loading, the check and writing count:
it is the command as a user runs it. Writes bench/results/speed.json.

    python bench/speed.py [--sets models validation] [--models vgg resnet] \\
        [--methods magnitude auto] [--ratio 0.4] [--repeats 1] [--light resnet50]

``--light NAME ...`` adds light models of the onnx wheel (``tests/light_models.py``: real
architectures, seeded random weights), written to a temporary file and pruned the same way,
without an input range (their priors are the default). ``--thirdparty NAME ...`` adds the
real third-party models of ``bench/thirdparty.py`` (fetched once by ``make thirdparty`` into
``build/thirdparty``), with their input shapes. A run past ``--timeout`` seconds is stopped
and recorded as such. With ``--repeats N`` the seconds are the fastest run's and the peak RSS
the median of the N (single peaks vary by +-80 MB at 224x224 here; the aim is judged on the
median).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from validation import SETS, entries  # noqa: E402  (the same manifests, the TorchScript exports)


def light_entries(names: list[str], folder: Path) -> list[dict]:
    """The named light models, materialised into ``folder`` as files a user would pass."""
    if not names:
        return []
    sys.path.insert(0, str(ROOT / "tests"))
    from light_models import LIGHT_MODELS, materialise

    unknown = sorted(set(names) - set(LIGHT_MODELS))
    if unknown:
        sys.exit(f"speed.py: unknown light model(s) {', '.join(unknown)}; the onnx wheel has {', '.join(LIGHT_MODELS)}")

    from onnxprune.ir import save_model

    out = []
    for name in names:
        model = materialise(name)
        # IR 3 wants every initializer listed as a graph input, and the materialised weights
        # are not: the file says IR 4, as a valid file of the same model would.
        model.ir_version = max(model.ir_version, 4)
        save_model(model, folder / f"{name}.onnx")
        out.append({"set": "light", "name": name, "folder": folder, "file": f"{name}.onnx", "input_range": None})
    return out


def thirdparty_entries(names: list[str]) -> list[dict]:
    """The named models of bench/thirdparty.py, where ``make thirdparty`` fetched them."""
    if not names:
        return []
    from thirdparty import fetched

    out = []
    for name in names:
        path, entry = fetched(name)
        shapes = [f"--input-shape={k}:{','.join(map(str, v))}" for k, v in entry["shapes"].items()]
        out.append({"set": "thirdparty", "name": name, "folder": path.parent, "file": path.name,
                    "input_range": None, "args": shapes})
    return out


#: Runs the command in the child and writes the child's own peak resident set (VmHWM, in
#: kB) to the file named by $ONNXPRUNE_BENCH_PEAK at exit. wait4's ru_maxrss cannot be used
#: alone: Linux carries the forking parent's resident set over exec into the child's figure
#: (this bench, with a light model loaded, read 463 MB for an argument error).
LAUNCHER = """
import atexit, os, runpy, sys
def _peak():
    with open('/proc/self/status') as status, open(os.environ['ONNXPRUNE_BENCH_PEAK'], 'w') as out:
        out.write(next(line.split()[1] for line in status if line.startswith('VmHWM:')))
atexit.register(_peak)
sys.argv = ['onnxprune', *sys.argv[1:]]
runpy.run_module('onnxprune.cli', run_name='__main__')
"""


def run_cli(args: list[str], timeout: float | None = None) -> tuple[float, float, int, str]:
    """``(seconds, peak RSS in MB, exit code, last line of stderr)`` of one onnxprune process;
    past ``timeout`` seconds it is killed and the code is -9 (its peak then from wait4)."""
    with tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("r") as peak_file:
        t0 = time.perf_counter()
        # stderr to a file, not a pipe: nothing to drain while waiting.
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], stdout=subprocess.DEVNULL,
                                stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, "ONNXPRUNE_BENCH_PEAK": peak_file.name})
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = (err.read().strip().splitlines() or [""])[-1]
        written = peak_file.read().strip()
    peak_mb = int(written) / 1024 if written else usage.ru_maxrss / 1024
    if proc.returncode == -9 and timeout and seconds >= timeout:
        tail = f"stopped after {timeout:.0f} s"
    return seconds, peak_mb, proc.returncode, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", choices=list(SETS), default=list(SETS),
                        help="digits sets (none: `--sets` alone, with --light or --thirdparty)")
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "auto"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per method and model: the fastest one's seconds, the median peak RSS")
    parser.add_argument("--light", nargs="*", default=[], metavar="NAME",
                        help="light models of the onnx wheel to add (e.g. resnet50)")
    parser.add_argument("--thirdparty", nargs="*", default=[], metavar="NAME",
                        help="third-party models of bench/thirdparty.py to add (after `make thirdparty`)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is stopped")
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = parser.parse_args()
    console = Console(width=150)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        chosen = entries(args.sets, args.models) + light_entries(args.light, Path(tmp)) \
            + thirdparty_entries(args.thirdparty)
        for e in chosen:
            path = e["folder"] / e["file"]
            size_mb = os.path.getsize(path) / 2**20
            for method in args.methods:
                runs = []
                for _ in range(args.repeats):
                    out = Path(tmp) / f"{e['set']}_{e['name']}_{method}.onnx"
                    cli = [str(path), str(out), "--ratio", str(args.ratio), "--method", method, "--force",
                           *e.get("args", [])]
                    if e["input_range"] is not None:
                        cli.append("--input-range={},{}".format(*e["input_range"]))
                    runs.append(run_cli(cli, args.timeout))
                seconds, _, code, tail = min(runs)
                peaks = sorted(r[1] for r in runs)
                peak = peaks[(len(peaks) - 1) // 2]  # the median (the lower of the middle two)
                rows.append({"set": e["set"], "model": e["name"], "method": method, "seconds": seconds,
                             "model_mb": size_mb, "peak_rss_mb": peak, "peaks_mb": peaks, "exit": code,
                             "error": tail if code else None})
                spread = f" (runs {peaks[0]:.0f}-{peaks[-1]:.0f})" if len(peaks) > 1 else ""
                console.print(f"{e['set']:10s} {e['name']:10s} {method:10s} {seconds:6.1f} s  "
                              f"peak {peak:5.0f} MB{spread}  exit {code}" + (f"  {tail}" if code else ""))
    base = {(r["set"], r["model"]): r["seconds"] for r in rows if r["method"] == "magnitude" and not r["exit"]}
    for r in rows:
        ref = base.get((r["set"], r["model"]))
        r["vs_magnitude"] = r["seconds"] / ref if ref and not r["exit"] else None
    table = Table(title=f"onnxprune CLI at --ratio {args.ratio}: wall seconds (start-up included), "
                        "ratio to magnitude on the same model, peak RSS"
                        + (f" (fastest and median of {args.repeats} runs)" if args.repeats > 1 else ""))
    for col in ("set", "model", "method", "seconds", "x magnitude", "peak RSS MB", "aim MB", "over aim"):
        table.add_column(col, justify="left" if col in ("set", "model", "method") else "right")
    for r in rows:
        aim = 1024 + 3 * r["model_mb"]  # #14: 1 GB plus 3x the model
        r["over_aim_mb"] = max(r["peak_rss_mb"] - aim, 0.0)
        table.add_row(r["set"], r["model"], r["method"], f"{r['seconds']:.1f}" if not r["exit"] else f"exit {r['exit']}",
                      "-" if r["vs_magnitude"] is None else f"{r['vs_magnitude']:.1f}x", f"{r['peak_rss_mb']:.0f}",
                      f"{aim:.0f}", f"[red]+{r['over_aim_mb']:.0f} MB[/]" if r["over_aim_mb"] else "-")
    console.print(table)
    console.print(f"bench took {time.perf_counter() - started:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"ratio": args.ratio, "methods": args.methods, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
