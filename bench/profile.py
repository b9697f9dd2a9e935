"""Where prune time goes: every method on a small, a mid and a large model, by stage.

Each run is one ``prune`` call at the uniform-0.4 MAC budget (``--budget macs``) in this
process, timed by :mod:`onnxprune.profiling`; start-up (importing onnxprune) is measured in
a fresh interpreter. Prints one table per model and writes bench/results/profile.json.

    python bench/profile.py [--models mlp resnet resnet50] [--methods magnitude paoding srdfp] [--memory]

A name is a net of ``models/`` (``vgg``), of the validation zoo (``validation/resnext``, with
its input range from the manifest), a real third-party model of ``bench/thirdparty.py``
(``thirdparty/orientation``, after ``make thirdparty``), or a light model of the onnx wheel
(``resnet50``).

``--fold-batchnorm`` folds each model's BatchNorms into the layers before them first
(bench/folding.py: as many exporters ship conv nets).

``--memory`` adds each stage's peak resident memory (Linux: the kernel's high-water mark, read
and reset at every stage boundary; see :func:`onnxprune.profiling.track_memory`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from onnxprune import profiling, prune  # noqa: E402
from onnxprune.ir import load_model  # noqa: E402

#: name -> (loader, input range): two digits nets of models/ and the resnet50 light model.
SMALL = {"mlp": "models/mlp.onnx", "resnet": "models/resnet.onnx", "vgg": "models/vgg.onnx",
         "mobilenet": "models/mobilenet.onnx", "densenet": "models/densenet.onnx", "vit": "models/vit.onnx"}


def _load(name: str):
    """``(model, input range, input shapes)``."""
    if name in SMALL:
        return load_model(ROOT / SMALL[name]), (0.0, 1.0), None
    if name.startswith("thirdparty/"):
        sys.path.insert(0, str(ROOT / "bench"))
        from thirdparty import fetched

        path, entry = fetched(name.split("/", 1)[1])
        return load_model(path), None, entry["shapes"]
    if name.startswith("validation/"):
        sys.path.insert(0, str(ROOT / "bench"))
        from validation import entries

        (e,) = entries(["validation"], [name.split("/", 1)[1]]) or [None]
        if e is None:
            raise SystemExit(f"no validation net {name!r} (see models/validation/manifest.json)")
        return load_model(e["folder"] / e["file"]), e["input_range"], None
    from light_models import materialise

    return materialise(name), None, None


def startup_seconds(repeats: int = 3) -> dict[str, float]:
    """Fastest of ``repeats`` fresh interpreters: ``onnxprune --help`` and ``import onnxprune``."""
    out = {}
    for label, argv in (("onnxprune --help", ["-m", "onnxprune.cli", "--help"]),
                        ("import onnxprune (library)", ["-c", "import onnxprune.pipeline"])):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, capture_output=True, cwd=ROOT)
            best = min(best, time.perf_counter() - t0)
        out[label] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp", "resnet", "resnet50"])
    parser.add_argument("--methods", nargs="*", default=["magnitude", "paoding", "srdfp"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "profile.json"))
    parser.add_argument("--memory", action="store_true", help="peak resident memory per stage")
    parser.add_argument("--fold-batchnorm", action="store_true", help="fold every BatchNorm first (bench/folding.py)")
    args = parser.parse_args()
    if args.memory and not profiling.track_memory(True):
        parser.error("--memory needs Linux's /proc/self/clear_refs")
    console = Console()
    results = {"startup": startup_seconds(), "runs": []}
    console.print({k: round(v, 3) for k, v in results["startup"].items()})
    for name in args.models:
        model, input_range, shapes = _load(name)
        if args.fold_batchnorm:
            sys.path.insert(0, str(ROOT / "bench"))
            from folding import fold_batchnorm

            model = fold_batchnorm(model)
        for method in args.methods:
            profiling.reset()
            t0 = time.perf_counter()
            _, report = prune(model, args.ratio, method=method, target="macs", input_range=input_range,
                              input_shapes=shapes, check=8)
            seconds = time.perf_counter() - t0
            prof = profiling.reset()
            # With --memory the high-water mark is reset at every stage, so getrusage's figure
            # is no longer the process's: the profile's own whole-run peak stands instead.
            rss = prof.peak_rss[()] / 2**20 if args.memory else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            table = Table(title=f"{name}{' (folded)' if args.fold_batchnorm else ''} {method}: {seconds:.2f} s, MACs kept "
                          f"{report.after.macs / report.before.macs:.1%}, peak RSS {'of the run' if args.memory else 'so far'} "
                          f"{rss:.0f} MB",
                          title_justify="left")
            for col in ("stage", "calls", "self s", "total s") + (("peak MB",) if args.memory else ()):
                table.add_column(col, justify="left" if col == "stage" else "right")
            for (label, calls, own, total), path in zip(prof.rows(), prof.paths()):
                peak = (f"{prof.peak_rss.get(path, 0) / 2**20:.0f}",) if args.memory else ()
                table.add_row(label, str(calls), f"{own:.2f}", f"{total:.2f}", *peak)
            console.print(table)
            results["runs"].append({"model": name, "folded": args.fold_batchnorm, "method": method, "seconds": seconds,
                                    "macs": report.before.macs, "macs_kept": report.after.macs / report.before.macs,
                                    "stages": {"/".join(p): s for p, s in prof.seconds.items()},
                                    "by_stage": prof.by_leaf(),
                                    "peak_rss_mb": {"/".join(p): b / 2**20 for p, b in prof.peak_rss.items()}})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
