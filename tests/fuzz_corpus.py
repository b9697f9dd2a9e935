"""A corpus of hostile inputs for the command line, and the promise every run must keep.

Each case builds its files in a fresh folder and returns the arguments to run: malformed
protos, broken external data, bad output paths, bad arguments, and valid but awkward models
(functions, sparse initializers, unsorted nodes, IR 3). :func:`run_case` runs one in-process
and returns its outcome and the promise breaks it found:

- the exit code is 0 (pruned, or nothing prunable: blocked), 2 (user error), 3 (fidelity
  refusal) or 128+N (interrupted), never 1 (a bug) or anything else;
- an error is one line on stderr, no traceback anywhere;
- on an error nothing is written (no new or changed file, no temporary left behind), the
  input is never changed;
- a written model passes onnx.checker and runs in onnxruntime with the input's signature.

``python tests/fuzz_corpus.py`` runs every case and prints the counts per outcome.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nets  # noqa: E402

OUTCOMES = {0: "pruned", 2: "user error", 3: "fidelity refusal", 130: "interrupted", 143: "interrupted"}
RATIO = ["--ratio", "0.4", "--check", "2"]


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def mlp() -> onnx.ModelProto:
    return nets.mlp()


def _external(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, location=name + ".data", size_threshold=0)
    return path


def _point(tensor: onnx.TensorProto, location: str, **extra: str) -> None:
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in {"location": location, **extra}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _with_if(model: onnx.ModelProto, tensor: onnx.TensorProto) -> onnx.ModelProto:
    """``y`` passes through an If whose branches hold ``tensor`` as a Constant."""
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [o + "_pre" if o == out else o for o in node.output]
    cond = numpy_helper.from_array(np.array(True), "cond")
    branch = helper.make_graph([helper.make_node("Constant", [], ["k"], value=tensor),
                                helper.make_node("Identity", [out + "_pre"], ["b_out"])], "branch", [],
                               [helper.make_tensor_value_info("b_out", onnx.TensorProto.FLOAT, None)])
    model.graph.initializer.append(cond)
    model.graph.node.append(helper.make_node("If", ["cond"], [out], then_branch=branch, else_branch=branch))
    return model


def _evil_tensor(location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "evil")
    _point(tensor, location)
    return tensor


def _with_function(model: onnx.ModelProto, tensor: onnx.TensorProto | None = None) -> onnx.ModelProto:
    """The first Relu becomes a call to a model-local function (holding ``tensor`` if given)."""
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    body = [helper.make_node("Relu", ["a"], ["b"])]
    if tensor is not None:
        body.insert(0, helper.make_node("Constant", [], ["unused"], value=tensor))
    function = helper.make_function("local", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    relu.op_type, relu.domain = "MyRelu", "local"
    return model


def _loop(model: onnx.ModelProto, tensor: onnx.TensorProto) -> onnx.ModelProto:
    """A one-trip Loop whose body holds ``tensor``, its result unused by the output."""
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=tensor), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, [])])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "trips"),
                                    numpy_helper.from_array(np.array(True), "go")])
    model.graph.node.append(helper.make_node("Loop", ["trips", "go"], [], body=body))
    return model


def _initializer(model: onnx.ModelProto, name: str = "w1") -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _mutated(edit: Callable[[onnx.ModelProto], object]) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        model = mlp()
        edit(model)
        return [save(model, tmp / "in.onnx"), tmp / "out.onnx", *RATIO]
    return build


def _dims(model, name, dims):
    t = _initializer(model, name)
    del t.dims[:]
    t.dims.extend(dims)


def _raw(model, name, cut):
    t = _initializer(model, name)
    data = numpy_helper.to_array(t).tobytes()
    t.ClearField("float_data")
    t.raw_data = data[:cut] if cut > 0 else data + b"\0" * -cut


def _float_data_short(model):
    t = _initializer(model, "b1")
    values = numpy_helper.to_array(t).ravel().tolist()
    t.ClearField("raw_data")
    t.float_data.extend(values[:-1])


def _bad_reshape(model):
    model.graph.initializer.append(numpy_helper.from_array(np.array([7, 5], np.int64), "bad_shape"))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.node.append(helper.make_node("Reshape", [relu.output[0], "bad_shape"], ["reshaped"]))
    model.graph.output.append(helper.make_tensor_value_info("reshaped", onnx.TensorProto.FLOAT, [7, 5]))


def _passthrough(model):
    del model.graph.node[:]
    del model.graph.initializer[:]
    model.graph.output[0].CopyFrom(model.graph.input[0])


def _cycle(model):
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    matmul.input[0] = relu.output[0]


def _duplicate_output(model):
    model.graph.node[2].output[0] = model.graph.node[0].output[0]


def _duplicate_names(model):
    for node in model.graph.node:
        node.name = "same"


def _unsorted(model):
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _sparse(model):
    dense = _initializer(model, "w2")
    array = numpy_helper.to_array(dense).copy()
    array[np.abs(array) < 0.2] = 0
    flat = np.flatnonzero(array)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(array.ravel()[flat], "w2"),
                                       numpy_helper.from_array(flat.astype(np.int64), "w2_idx"), array.shape)
    model.graph.initializer.remove(dense)
    model.graph.sparse_initializer.append(sparse)


def _bf16(model):
    for t in list(model.graph.initializer):
        t.CopyFrom(helper.make_tensor(t.name, onnx.TensorProto.BFLOAT16, t.dims,
                                      numpy_helper.to_array(t).ravel().tolist()))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16


def _ir3(model):
    model.ir_version = 3
    model.opset_import[0].version = 8
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer)


def _static(model, dims):
    shape = model.graph.input[0].type.tensor_type.shape
    for d, value in zip(shape.dim, dims):
        d.Clear()
        d.dim_value = value


def _output_case(builder: Callable[[Path, Path], list]) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        src = save(mlp(), tmp / "in.onnx")
        return builder(tmp, src)
    return build


def _external_case(edit: Callable[[onnx.ModelProto, Path], object]) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        path = _external(mlp(), tmp)
        model = onnx.load(str(path), load_external_data=False)
        edit(model, tmp)
        return [save(model, path), tmp / "out.onnx", *RATIO]
    return build


def _short_data(model, tmp):
    data = tmp / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    for t in model.graph.initializer:
        kept = {e.key: e.value for e in t.external_data if e.key != "length"}
        _point(t, kept.pop("location"), **kept)


def _outside_symlink(model, tmp):
    outside = tmp.parent / f"{tmp.name}-outside.bin"
    outside.write_bytes(b"\0" * 64 * 32 * 4)
    (tmp / "link.bin").symlink_to(outside)
    _point(_initializer(model, "w1"), "link.bin")


def _traversal_in(where: str, location: str):
    def edit(model, tmp):
        tensor = _evil_tensor(location)
        if where == "if":
            _with_if(model, tensor)
        elif where == "loop":
            _loop(model, tensor)
        elif where == "function":
            _with_function(model, tensor)
        else:
            model.graph.node.insert(0, helper.make_node("Constant", [], ["evil_out"], value=tensor))
    return edit


CASES: dict[str, Callable[[Path], list]] = {
    # output paths
    "OUT in a read-only folder": _output_case(lambda tmp, src: [src, "/sys/out.onnx", *RATIO]),
    "OUT an existing directory": _output_case(lambda tmp, src: [src, tmp, *RATIO]),
    "OUT name too long": _output_case(lambda tmp, src: [src, tmp / ("x" * 300 + ".onnx"), *RATIO]),
    "OUT name almost too long for .data": _output_case(lambda tmp, src: [src, tmp / ("x" * 252), *RATIO]),
    "OUT in a missing folder": _output_case(lambda tmp, src: [src, tmp / "no" / "out.onnx", *RATIO]),
    "OUT below a file": _output_case(lambda tmp, src: [src, src / "out.onnx", *RATIO]),
    "OUT is IN": _output_case(lambda tmp, src: [src, src, *RATIO]),
    "OUT is IN through ..": _output_case(lambda tmp, src: [src, tmp / "." / ".." / tmp.name / "in.onnx", *RATIO]),
    "--report into a missing folder": _output_case(
        lambda tmp, src: [src, tmp / "out.onnx", *RATIO, "--report", tmp / "no" / "r.json"]),
    "--report onto a directory": _output_case(lambda tmp, src: [src, tmp / "out.onnx", *RATIO, "--report", tmp]),
    "--save-plan into a missing folder": _output_case(
        lambda tmp, src: [src, tmp / "out.onnx", *RATIO, "--save-plan", tmp / "no" / "p.json"]),
    "--save-plan onto a directory": _output_case(lambda tmp, src: [src, tmp / "out.onnx", *RATIO, "--save-plan", tmp]),
    "--save-plan IN": _output_case(lambda tmp, src: [src, tmp / "out.onnx", *RATIO, "--save-plan", src]),
    "--report IN": _output_case(lambda tmp, src: [src, tmp / "out.onnx", *RATIO, "--report", src]),
    "--report IN with --force": _output_case(lambda tmp, src: [src, tmp / "out.onnx", *RATIO, "--report", src, "--force"]),
    "--report is OUT": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--report", tmp / "o.onnx"]),
    "--report is --save-plan": _output_case(
        lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--report", tmp / "r.json", "--save-plan", tmp / "r.json"]),
    "--report in a read-only folder": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--report", "/sys/r.json"]),
    "inspect a missing file": _output_case(lambda tmp, src: ["inspect", tmp / "none.onnx"]),
    # malformed protos
    "ir_version 999": _mutated(lambda m: setattr(m, "ir_version", 999)),
    "ir_version 2^62": _mutated(lambda m: setattr(m, "ir_version", 2**62)),
    "ir_version 0": _mutated(lambda m: setattr(m, "ir_version", 0)),
    "cycle": _mutated(_cycle),
    "duplicate node output names": _mutated(_duplicate_output),
    "node reads a missing tensor": _mutated(lambda m: m.graph.node[1].input.__setitem__(0, "ghost")),
    "output nothing produces": _mutated(lambda m: setattr(m.graph.output[0], "name", "ghost")),
    "raw_data short": _mutated(lambda m: _raw(m, "w1", 100)),
    "raw_data long": _mutated(lambda m: _raw(m, "w1", -8)),
    "float_data short": _mutated(_float_data_short),
    "negative dims": _mutated(lambda m: _dims(m, "b1", [-32])),
    "huge dims": _mutated(lambda m: _dims(m, "b1", [2**40])),
    "undefined data type": _mutated(lambda m: setattr(_initializer(m, "b1"), "data_type", 0)),
    "unknown data type": _mutated(lambda m: setattr(_initializer(m, "b1"), "data_type", 99)),
    "huge static input dim": _mutated(lambda m: _static(m, [2**40, 64])),
    "huge static feature dim": _mutated(lambda m: _static(m, [1, 2**40])),
    "zero batch": _mutated(lambda m: _static(m, [0, 64])),
    "bf16 model": _mutated(_bf16),
    "unknown op": _mutated(lambda m: setattr(m.graph.node[2], "op_type", "NoSuchOp")),
    "opset 99": _mutated(lambda m: setattr(m.opset_import[0], "version", 99)),
    "no default opset": _mutated(lambda m: setattr(m.opset_import[0], "domain", "other")),
    "wrong weight shape": _mutated(lambda m: (_raw(m, "w2", 32 * 16 * 4), _dims(m, "w2", [32, 16]))),
    "empty file": lambda tmp: [(tmp / "in.onnx").write_bytes(b"") and tmp / "in.onnx" or tmp / "in.onnx",
                               tmp / "out.onnx", *RATIO],
    "input is a directory": lambda tmp: [tmp, tmp / "out.onnx", *RATIO],
    "empty op_type": _mutated(lambda m: setattr(m.graph.node[2], "op_type", "")),
    "output listed twice": _mutated(lambda m: m.graph.output.append(m.graph.output[0])),
    "input listed twice": _mutated(lambda m: m.graph.input.append(m.graph.input[0])),
    "string input": _mutated(lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", onnx.TensorProto.STRING)),
    "input without a type": _mutated(lambda m: m.graph.input[0].ClearField("type")),
    "rank-40 input": _mutated(lambda m: m.graph.input[0].type.tensor_type.shape.dim.extend(
        [onnx.TensorShapeProto.Dimension(dim_value=1)] * 38)),
    "attribute of the wrong type": _mutated(lambda m: m.graph.node[-1].attribute[0].CopyFrom(
        helper.make_attribute("transB", "yes"))),
    "Reshape to an impossible shape": _mutated(_bad_reshape),
    "no nodes, output is the input": _mutated(_passthrough),
    # valid models, awkward
    "initializer with zero elements": _mutated(lambda m: m.graph.initializer.append(
        numpy_helper.from_array(np.zeros((0, 3), np.float32), "empty_unused"))),
    "initializer as an input's default": _mutated(lambda m: m.graph.input.append(
        helper.make_tensor_value_info("w1", onnx.TensorProto.FLOAT, [64, 32]))),
    "duplicate node names": _mutated(_duplicate_names),
    "unsorted nodes": _mutated(_unsorted),
    "sparse initializer": _mutated(_sparse),
    "model-local function": _mutated(_with_function),
    "IR 3, initializers listed as inputs": _mutated(_ir3),
    "plain mlp": _mutated(lambda m: None),
    "external data, plain": _external_case(lambda m, tmp: None),
    # shapes
    "--input-shape conflicts with a static dim": lambda tmp: [
        save(nets.resnet(), tmp / "in.onnx"), tmp / "out.onnx", *RATIO, "--input-shape", "x:1,3,9,8"],
    "--input-shape huge": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--input-shape", "x:1000000000,64"]),
    "--input-shape wrong rank": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--input-shape", "x:1,64,1"]),
    "--input-shape batch 3": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--input-shape", "x:3,64"]),
    # external data
    "short data file without a length": _external_case(_short_data),
    "empty location": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), "")),
    "missing data file": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), "gone.bin")),
    "offset past the end": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), "m.onnx.data", offset="999999")),
    "offset not a number": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), "m.onnx.data", offset="ten")),
    "negative length": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), "m.onnx.data", length="-4")),
    "location is the folder": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), ".")),
    "traversal in the main graph": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), "../../etc/passwd")),
    "absolute path in the main graph": _external_case(lambda m, tmp: _point(_initializer(m, "w1"), "/etc/passwd")),
    "symlink outside the folder": _external_case(_outside_symlink),
    "traversal in a Constant": _external_case(_traversal_in("constant", "../../etc/passwd")),
    "absolute path in a Constant": _external_case(_traversal_in("constant", "/etc/passwd")),
    "traversal in an If subgraph": _external_case(_traversal_in("if", "../../etc/passwd")),
    "absolute path in an If subgraph": _external_case(_traversal_in("if", "/etc/passwd")),
    "traversal in a Loop body": _external_case(_traversal_in("loop", "../../etc/passwd")),
    "traversal in a function": _external_case(_traversal_in("function", "../../etc/passwd")),
    "absolute path in a function": _external_case(_traversal_in("function", "/etc/passwd")),
    # arguments
    "negative --seed": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--seed", "-1"]),
    "huge --seed": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--seed", str(2**70)]),
    "--check -1": _output_case(lambda tmp, src: [src, tmp / "o.onnx", "--ratio", "0.4", "--check", "-1"]),
    "--check 0": _output_case(lambda tmp, src: [src, tmp / "o.onnx", "--ratio", "0.4", "--check", "0"]),
    "--min-cosine nan": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--min-cosine", "nan"]),
    "--min-cosine 1 (refused)": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--min-cosine", "1"]),
    "--min-cosine 1 with --report": _output_case(
        lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--min-cosine", "1", "--report", tmp / "r.json"]),
    "--dry-run with --save-plan": _output_case(
        lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--dry-run", "--save-plan", tmp / "p.json"]),
    "--ratio nan": _output_case(lambda tmp, src: [src, tmp / "o.onnx", "--ratio", "nan"]),
    "--round-to 0": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--round-to", "0"]),
    "--round-to huge": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--round-to", "1000"]),
    "--alpha inf": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--method", "srdfp", "--alpha", "inf"]),
    "--step 0": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--step", "0"]),
    "--plan missing": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--plan", tmp / "p.json"]),
    "--plan not JSON": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--plan", src]),
    "--calibration missing": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--calibration", tmp / "c.npz"]),
    "--calibration is IN": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--calibration", src]),
    "--input-range reversed": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--input-range", "2,1"]),
    "--exclude everything": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--exclude", "*"]),
    "unknown option": _output_case(lambda tmp, src: [src, tmp / "o.onnx", *RATIO, "--frobnicate"]),
    "no OUT": _output_case(lambda tmp, src: [src, "--ratio", "0.4"]),
    "no arguments": lambda tmp: [],
    # inspect
    "inspect a cyclic graph": lambda tmp: ["inspect", _mutated(_cycle)(tmp)[0]],
    "inspect short raw_data": lambda tmp: ["inspect", _mutated(lambda m: _raw(m, "w1", 100))(tmp)[0]],
    "inspect a valid model": lambda tmp: ["inspect", _mutated(lambda m: None)(tmp)[0]],
}

#: Valid models: they must prune (or be left alone, blocked), never be refused.
VALID = {"duplicate node names", "unsorted nodes", "sparse initializer", "model-local function",
         "IR 3, initializers listed as inputs", "plain mlp", "external data, plain", "--input-shape batch 3",
         "--check 0", "--exclude everything", "inspect a valid model",
         "initializer with zero elements", "initializer as an input's default"}


def _snapshot(folder: Path) -> dict[Path, str]:
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _groups_pruned(stdout: str) -> int | None:
    match = re.search(r"groups pruned\D*(\d+)/(\d+)", stdout)
    return int(match.group(1)) if match else None


def check_promise(argv: list[str], code: int, stdout: str, stderr: str, before: dict, after: dict,
                  tmp: Path) -> tuple[str, list[str]]:
    """The outcome of one run and the promises it broke."""
    from onnxprune.ir import load_model, session, signature
    from onnxprune.ir.shapes import concrete_input_shapes, random_inputs

    breaks = []
    if code not in OUTCOMES:
        breaks.append(f"exit code {code}: {stderr.strip()[-300:]}")
    if "Traceback" in stdout + stderr:
        breaks.append("a traceback")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code in (1, 2) and len(lines) != 1:
        breaks.append(f"{len(lines)} lines on stderr: {stderr[:300]!r}")
    leftovers = [p for p in tmp.rglob(".onnxprune-*")]
    if leftovers:
        breaks.append(f"temporaries left: {leftovers}")
    changed = [p for p in before if after.get(p) != before[p]]
    forced = "--force" in argv and len(argv) > 1 and str(argv[0]) == str(argv[1])
    if changed and not (code == 0 and forced):
        breaks.append(f"changed or removed: {[p.name for p in changed]}")
    new = [p for p in after if p not in before]
    if code not in (0, 3) and new:
        breaks.append(f"wrote {[p.name for p in new]} on exit {code}")
    outcome = OUTCOMES.get(code, "promise break")
    target = Path(argv[1]).resolve() if len(argv) > 1 and argv[0] != "inspect" else None
    if code == 3 and target in {p.resolve() for p in new} and "--keep-failed" not in argv:
        breaks.append("wrote the model despite the fidelity refusal")
    if code == 0 and argv and argv[0] != "inspect":
        if _groups_pruned(stdout) == 0:
            outcome = "blocked"
        if "--dry-run" not in argv:
            out = Path(argv[1])
            try:
                pruned = load_model(out)
                original = load_model(argv[0]) if not forced else pruned
                if signature(pruned) != signature(original):
                    breaks.append("the output's signature differs from the input's")
                shapes = concrete_input_shapes(pruned, {})
                session(pruned).run(None, random_inputs(pruned, shapes, np.random.default_rng(0)))
            except Exception as exc:  # noqa: BLE001 - any failure here is a promise break
                breaks.append(f"the output does not load and run: {type(exc).__name__}: {exc}"[:300])
    return outcome, breaks


def run_case(name: str, tmp: Path) -> tuple[str, list[str], str]:
    """Build case ``name`` in ``tmp``, run it; (outcome, breaks, stderr)."""

    tmp.mkdir(parents=True, exist_ok=True)
    argv = [str(a) for a in CASES[name](tmp)]
    return run_argv(argv, tmp)


def run_argv(argv: list[str], tmp: Path) -> tuple[str, list[str], str]:
    from onnxprune.cli import main

    before = _snapshot(tmp)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    after = _snapshot(tmp)
    outcome, breaks = check_promise(argv, code, stdout.getvalue(), stderr.getvalue(), before, after, tmp)
    return outcome, breaks, stderr.getvalue()


if __name__ == "__main__":
    import tempfile

    counts: Counter = Counter()
    broken = []
    with tempfile.TemporaryDirectory() as root:
        for k, case in enumerate(CASES):
            outcome, breaks, err = run_case(case, Path(root) / f"case{k}")
            counts[outcome] += 1
            if breaks or (case in VALID and outcome == "user error"):
                broken.append((case, breaks or [f"refused a valid model: {err.strip()}"]))
            print(f"{outcome:18s} {case}: {err.strip().splitlines()[-1] if err.strip() else ''}"[:220])
    print(dict(counts), f"{len(broken)} promise breaks")
    for case, breaks in broken:
        print("BREAK", case, breaks)
    os._exit(1 if broken else 0)
