"""A large model with external data, and what pruning it costs in time and memory.

    python bench/bigmodel.py /tmp/big            # writes /tmp/big/big.onnx (+ .data), ~600 MB
    python bench/bigmodel.py /tmp/big --run      # and prunes it: wall time, peak RSS vs size

The model is a chain of Gemm+Relu layers (``--layers`` of ``--width``², float32) ending in
a 1000-way Gemm; its weights are written straight to the data file, layer by layer, so
generating it needs little memory. Nothing here is committed but this script.
"""

from __future__ import annotations

import argparse
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
    """Prune ``path`` with the CLI in a child process: wall time, the child's peak RSS."""
    out = path.with_name("big-pruned.onnx")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "onnxprune.cli", str(path), str(out), "--ratio", str(ratio),
                             "--method", method], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
    written = sum(p.stat().st_size for p in out.parent.glob(out.name + "*"))
    return {"exit": result.returncode, "stderr": result.stderr.strip().splitlines()[-1:], "wall_s": round(wall, 1),
            "peak_rss_mb": round(peak / 2**20), "model_mb": round(size / 2**20), "peak_over_size": round(peak / size, 2),
            "written_mb": round(written / 2**20)}


def main() -> None:
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
        print(run(path, args.ratio, args.method))


if __name__ == "__main__":
    main()
