"""--calibration: every bad file is one line and exit code 2 with nothing written; a good file
replaces the synthetic inputs (planning's and the fidelity check's), planning never sees the
held-out part, and without one nothing changes."""

import re

import nets
import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.errors import UserError
from onnxprune.evidence.calibration import CalibrationSet, check_calibration, load_calibration
from onnxprune.ir import input_specs
from onnxprune.pipeline import analyse, prune

SHAPE = (3, 8, 8)  # nets.resnet's input is float[1,3,8,8]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save(nets.resnet(), str(path))
    return path


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *SHAPE)).astype(np.float32)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nan() -> np.ndarray:
    x = samples(8)
    x[3, 0, 0, 0] = np.nan
    return x


@pytest.mark.parametrize("arrays, message", [
    ({}, "holds no arrays"),
    ({"x": np.zeros((0, *SHAPE), np.float32)}, "zero samples"),
    ({"x": samples(1)}, "1 sample; at least 2"),
    ({"x": samples(8), "extra": samples(8)}, r"\['extra'\] match no model input"),
    ({"image": samples(8), "mask": samples(8)}, "match no model input"),
    ({"x": samples(8)[:, 0]}, "rank 4"),
    ({"x": np.zeros((8, 3, 8, 9), np.float32)}, "axis 3 differs"),
    ({"x": np.full((8, *SHAPE), "a")}, "numeric"),
    ({"x": _nan()}, "NaN or infinite"),
    ({"x": np.full((8, *SHAPE), np.inf, np.float32)}, "NaN or infinite"),
])
def test_bad_calibration_files_are_one_line_and_exit_2(capsys, model_path, tmp_path, arrays, message):
    path, out = tmp_path / "cal.npz", tmp_path / "out.onnx"
    np.savez(path, **arrays)
    code, stdout, stderr = run(capsys, model_path, out, "--ratio", "0.4", "--calibration", path)
    assert code == 2 and not out.exists() and not stdout
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert re.search(message, stderr), stderr


def test_unreadable_files_are_one_line_and_exit_2(capsys, model_path, tmp_path):
    out = tmp_path / "out.onnx"
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    np.save(tmp_path / "single.npy", samples(4))
    for path, message in ((tmp_path / "missing.npz", "calibration file .* does not exist"),
                          (tmp_path / "junk.npz", "not a readable .npz"),
                          (tmp_path / "single.npy", "single .npy array")):
        code, _, stderr = run(capsys, model_path, out, "--ratio", "0.4", "--calibration", path)
        assert code == 2 and not out.exists() and len(stderr.strip().splitlines()) == 1
        assert re.search(message, stderr), stderr


def _int_model() -> onnx.ModelProto:
    return nets.from_text("net (int64[N,4] ids, float[N,4] v, float[4,3] w) => (float[N,3] y) {\n"
                          "  f = Cast<to=1>(ids)\n  s = Add(f, v)\n  y = MatMul(s, w)\n}", inputs=("ids", "v"))


def test_multi_input_files_name_each_input_and_types_are_checked():
    specs = input_specs(_int_model())
    ids, v = np.arange(24).reshape(6, 4), np.ones((6, 4))
    cal = check_calibration({"ids": ids, "v": v}, specs)
    assert cal["ids"].dtype == np.int64 and cal["v"].dtype == np.float32 and cal.samples == 6
    for arrays, message in (({"ids": ids}, r"no array for input\(s\) \['v'\]"),
                            ({"ids": ids * 1.0, "v": v}, "is int64 but the file holds float64"),
                            ({"ids": ids, "v": v[:5]}, "different sample counts"),
                            ({"only": v}, "match no model input")):
        with pytest.raises(UserError, match=message):
            check_calibration(arrays, specs)


def test_a_single_array_may_have_any_name(tmp_path):
    np.savez(tmp_path / "c.npz", whatever=samples(8, seed=1).astype(np.float64))
    cal = load_calibration(tmp_path / "c.npz", input_specs(nets.resnet()))
    assert list(cal) == ["x"] and cal["x"].dtype == np.float32 and cal.origin == "c.npz"


def test_planning_and_the_check_draw_from_disjoint_parts_of_the_file():
    x = samples(40, seed=2)
    analysis = analyse(nets.resnet(), calibration=CalibrationSet({"x": x}, "cal.npz"))
    rows = {r.tobytes(): k for k, r in enumerate(x)}
    planning = [rows[r.tobytes()] for r in analysis.probe_inputs(16, 0)["x"]]  # every row is one of the file's
    everything = [rows[r.tobytes()] for r in analysis.probe_inputs(100, 0)["x"]]
    held = analysis.synthetic(8, 0, held_out=True)
    held_rows = [rows[r.tobytes()] for r in held.arrays["x"]]
    assert held.kind == "calibration" and "cal.npz" in held.source
    assert len(set(planning)) == 16 and max(planning) < 30  # the last quarter, 10 rows, is held out
    assert sorted(everything) == list(range(30))  # more than the part holds: all of it, none twice
    assert len(set(held_rows)) == 8 and min(held_rows) >= 30
    assert analysis.probe_inputs(16, 0)["x"] is analysis.probe_inputs(16, 0)["x"]  # cached, seeded
    other = [rows[r.tobytes()] for r in analyse(nets.resnet(), calibration={"x": x}).probe_inputs(16, 1)["x"]]
    assert len(set(other)) == 16 and max(other) < 30


def test_calibration_replaces_the_synthetic_inputs_in_the_report(capsys, model_path, tmp_path):
    np.savez(tmp_path / "cal.npz", x=samples(24, seed=3))
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run(capsys, model_path, out, "--ratio", "0.4", "--method", "paoding",
                               "--calibration", tmp_path / "cal.npz")
    assert code == 0, stderr
    assert "held-out calibration inputs" in stdout and "synthetic" not in stdout and out.exists()
    with_cal = out.read_bytes()
    code, stdout, _ = run(capsys, model_path, out, "--ratio", "0.4", "--method", "paoding")
    assert code == 0 and "held-out synthetic inputs" in stdout
    assert out.read_bytes() != with_cal  # the statistics and probes saw other inputs


def test_without_calibration_nothing_changes():
    plain, report = prune(nets.resnet(), 0.4, method="paoding")
    none, _ = prune(nets.resnet(), 0.4, method="paoding", calibration=None)
    assert plain.SerializeToString() == none.SerializeToString()
    assert report.calibration == "" and report.fidelity.inputs.startswith("held-out synthetic inputs")


def test_calibration_must_match_the_concrete_input_shape():
    model = nets.from_text("net (float[N,3,H,W] x, float[4,3,1,1] w) => (float[N,4,H,W] y) {\n  y = Conv(x, w)\n}")
    with pytest.raises(UserError, match="axis 2 differs"):
        analyse(model, {"x": (1, 3, 8, 8)}, calibration={"x": np.zeros((4, 3, 6, 6), np.float32)})
    analysis = analyse(model, {"x": (1, 3, 6, 6)}, calibration={"x": np.zeros((4, 3, 6, 6), np.float32)})
    assert analysis.calibration.samples == 4 and analysis.calibration.held_out_count == 1


def test_a_saved_plan_replays_to_the_same_bytes_with_the_same_file(capsys, model_path, tmp_path):
    np.savez(tmp_path / "cal.npz", x=samples(16, seed=4))
    first, again, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    common = ("--ratio", "0.4", "--calibration", tmp_path / "cal.npz")
    assert run(capsys, model_path, first, *common, "--method", "paoding", "--save-plan", plan)[0] == 0
    assert run(capsys, model_path, again, *common, "--plan", plan)[0] == 0
    assert again.read_bytes() == first.read_bytes()
