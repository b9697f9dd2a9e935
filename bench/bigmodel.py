"""A large model with external data, and what pruning it costs in time and memory.

    python bench/bigmodel.py /tmp/big            # writes /tmp/big/big.onnx (+ .data), ~600 MB
    python bench/bigmodel.py /tmp/big --run      # and prunes it: wall time, peak RSS vs size

``--run`` prints a table of the stages (``onnxprune.profiling``, with memory tracking on):
inclusive seconds and the peak resident memory while each ran, and its ratio to the size of
the model on disk (the ``.onnx`` and its ``.data``).

The model is a chain of Gemm+Relu layers (``--layers`` of ``--width``², float32) ending in
a 1000-way Gemm; its weights are written straight to the data file, layer by layer, so
generating it needs little memory. Nothing here is committed but this script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build(folder: Path, layers: int = 9, width: int = 4096, classes: int = 1000, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path, data = folder / "big.onnx", folder / "big.onnx.data"
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    with open(data, "wb") as f:
        for k in range(layers + 1):
            rows = classes if k == layers else width
            for name, shape, scale in ((f"w{k}", [rows, width], np.sqrt(2.0 / width)), (f"b{k}", [rows], 0.01)):
                array = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
                offset = f.tell()
                f.write(array.tobytes())
                inits.append(_external(name, shape, data.name, offset, array.nbytes))
                del array
            y = "y" if k == layers else f"h{k}"
            nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [y + ("" if k == layers else "_pre")],
                                          transB=1, name=f"fc{k}"))
            if k < layers:
                nodes.append(helper.make_node("Relu", [y + "_pre"], [y], name=f"relu{k}"))
            x = y
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def run(path: Path, ratio: float = 0.4, method: str = "magnitude") -> dict:
    """Prune ``path`` with the CLI in a child process: wall time, peak RSS overall and per stage."""
    out = path.with_name("big-pruned.onnx")
    profile = path.with_name("big-profile.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [str(path), str(out), "--ratio", str(ratio), "--method", method]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    result = subprocess.run([sys.executable, __file__, "--child", str(profile), "--", *argv], env=env,
                            capture_output=True, text=True, cwd=ROOT)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    stages = json.loads(profile.read_text()) if profile.exists() else {}
    peak = stages.pop("", {}).get("peak_rss", 0) or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
    written = sum(p.stat().st_size for p in out.parent.glob(out.name + "*"))
    return {"exit": result.returncode, "stderr": result.stderr.strip().splitlines()[-1:], "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "peak_rss_mb": round(peak / 2**20), "model_mb": round(size / 2**20), "peak_over_size": round(peak / size, 2),
            "written_mb": round(written / 2**20), "stages": stages}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child(profile: Path, argv: list[str]) -> int:
    """Run the CLI here with per-stage memory tracking; write the stage tree to ``profile``."""
    from onnxprune import profiling
    from onnxprune.cli import main as cli

    if not profiling.track_memory():
        print("cannot track per-stage memory here (no /proc/self/clear_refs)", file=sys.stderr)
    code = cli(argv)
    prof = profiling.current()
    rows = {"": {"peak_rss": prof.peak_rss.get((), 0)}}
    order = list(prof.seconds)  # as stages ended: an inner stage before the one holding it

    def started(path):  # a subtree's place: the first of its stages to end
        return tuple(min(k for k, p in enumerate(order) if p[:i] == path[:i]) for i in range(1, len(path) + 1))

    for path in sorted(prof.seconds, key=started):
        if path:
            inclusive = sum(s for p, s in prof.seconds.items() if p[:len(path)] == path)
            rows["/".join(path)] = {"calls": prof.calls.get(path, 0), "seconds": inclusive,
                                    "peak_rss": prof.peak_rss.get(path, 0)}
    profile.write_text(json.dumps(rows, indent=1))
    return code


def stage_table(report: dict, depth: int = 2) -> str:
    """The stages as a markdown table: inclusive seconds, peak RSS and its ratio to the model."""
    size = report["model_mb"]
    lines = ["| stage | s | peak RSS MB | peak / size |", "|---|---:|---:|---:|"]
    for name, row in report["stages"].items():
        if name.count("/") < depth:
            mb = row["peak_rss"] / 2**20
            lines.append(f"| {'&nbsp;&nbsp;' * name.count('/')}{name.rsplit('/', 1)[-1]} | {row['seconds']:.1f} | "
                         f"{mb:.0f} | {mb / size:.2f} |")
    lines.append(f"| **whole run** | {report['wall_s']:.1f} | {report['peak_rss_mb']} | {report['peak_over_size']} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(Path(sys.argv[2]), sys.argv[4:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--run", action="store_true", help="also prune it and report time and memory")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--method", default="magnitude")
    args = p.parse_args()
    path = args.folder / "big.onnx"
    if not path.exists():
        path = build(args.folder, args.layers, args.width)
    onnx.checker.check_model(str(path))
    print(f"{path}: {(path.stat().st_size + path.with_name(path.name + '.data').stat().st_size) / 2**20:.0f} MB")
    if args.run:
        report = run(path, args.ratio, args.method)
        print(stage_table(report))
        print(json.dumps({k: v for k, v in report.items() if k != "stages"}))


if __name__ == "__main__":
    main()
