"""The command line: the happy path, the report and plan files, and every bad-input case
(one clear line, exit code 2, nothing written, no traceback)."""

import json
import subprocess
import sys

import nets
import onnx
import pytest

from onnxprune.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save(nets.resnet(), str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_a_smaller_model_and_prints_the_table(capsys, model_path, tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run(capsys, model_path, out, "--ratio", "0.4", "--report", tmp_path / "r.json",
                               "--save-plan", tmp_path / "plan.json")
    assert code == 0, stderr
    assert "paoding (auto), ratio 0.4, budget macs" in stdout  # the default method, at the uniform plan's MACs
    assert "method paoding, chosen by auto: keeps the most at equal MACs" in stdout
    assert "parameters" in stdout and "groups pruned" in stdout and "fidelity" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["method"] == "paoding" and report["target"] == "macs" and report["groups_pruned"] >= 3
    onnx.checker.check_model(onnx.load(str(out)))
    # Re-applying the saved plan reproduces the same bytes.
    again = tmp_path / "again.onnx"
    assert run(capsys, model_path, again, "--ratio", "0.4", "--plan", tmp_path / "plan.json")[0] == 0
    assert again.read_bytes() == out.read_bytes()


def test_inspect_lists_every_group(capsys, model_path):
    code, stdout, _ = run(capsys, "inspect", model_path, "--json")
    assert code == 0
    groups = json.loads(stdout)
    assert len(groups) == 6 and sum(g["prunable"] for g in groups) == 4
    assert any("graph input" in why for g in groups for why in g["why"])
    for g in groups:  # each message once more, with its kind and node
        assert [r["message"] for r in g["reasons"]] == g["why"]
    reasons = {r["message"]: r for g in groups for r in g["reasons"]}
    assert reasons["'x' is a graph input"]["kind"] == "graph_input" and reasons["'x' is a graph input"]["node"] is None


def test_inspect_summarises_blocked_groups_by_kind(capsys, tmp_path):
    model = nets.from_text("net (float[1,4,8,8] x, float[8,4,3,3] c1_w, float[6,8,3,3] c2_w) => (float[1,6,8,8] y) {\n"
                           "  h = Conv<pads=[1,1,1,1]>(x, c1_w)\n  o = LRN<size=3>(h)\n"
                           "  y = Conv<pads=[1,1,1,1]>(o, c2_w)\n}")
    path = tmp_path / "lrn.onnx"
    onnx.save(model, str(path))
    code, stdout, _ = run(capsys, "inspect", path, "--json")
    lrn = [r for g in json.loads(stdout) for r in g["reasons"] if r["kind"] == "cross_channel"]
    assert code == 0 and lrn and all(r["node"].startswith("LRN") and r["node"] in r["message"] for r in lrn)
    code, stdout, _ = run(capsys, "inspect", path)
    summary = stdout[stdout.index("blocked groups by kind"):]
    assert code == 0 and "cross_channel" in summary and "graph_input" in summary and "graph_output" in summary
    assert "LRN_" in summary  # the example names its node


def test_dry_run_writes_nothing(capsys, model_path, tmp_path):
    code, _, _ = run(capsys, model_path, tmp_path / "out.onnx", "--ratio", "0.3", "--dry-run")
    assert code == 0 and not (tmp_path / "out.onnx").exists()


def test_fidelity_below_threshold_exits_3_and_writes_only_when_asked(capsys, model_path, tmp_path):
    out = tmp_path / "out.onnx"
    code, _, stderr = run(capsys, model_path, out, "--ratio", "0.6", "--min-cosine", "0.9999")
    assert code == 3 and "nothing written" in stderr and not out.exists()
    code, _, _ = run(capsys, model_path, out, "--ratio", "0.6", "--min-cosine", "0.9999", "--keep-failed")
    assert code == 3 and out.exists()


def _bad_inputs(tmp_path, model_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    old = nets.resnet()
    old.opset_import[0].version = 3
    old_path = tmp_path / "old.onnx"
    onnx.save(old, str(old_path))
    dynamic = nets.resnet()
    for d, name in zip(dynamic.graph.input[0].type.tensor_type.shape.dim, "NCHW"):
        if name in "HW":
            d.dim_param = name
    dyn_path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic, str(dyn_path))
    traversal = tmp_path / "sub" / "evil.onnx"
    traversal.parent.mkdir()
    evil = nets.resnet()
    weight = evil.graph.initializer[0]
    weight.ClearField("raw_data")
    del weight.float_data[:]
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    traversal.write_bytes(evil.SerializeToString())
    return {
        "missing file": ([tmp_path / "nope.onnx"], "no such file"),
        "not ONNX": ([text], "not"),
        "truncated": ([truncated], "truncated"),
        "ratio zero": ([model_path, "--ratio", "0"], "(0, 1)"),
        "ratio one": ([model_path, "--ratio", "1"], "(0, 1)"),
        "ratio text": ([model_path, "--ratio", "lots"], "number"),
        "unsupported opset": ([old_path], "opset 3"),
        "dynamic dims without a shape": ([dyn_path], "--input-shape"),
        "bad --input-shape": ([model_path, "--input-shape", "x:1,3,a"], "--input-shape"),
        "unknown input in --input-shape": ([model_path, "--input-shape", "z:1,3,8,8"], "unknown input"),
        "path traversal": ([traversal], "outside"),
        "unknown method": ([model_path, "--method", "oracle"], "invalid choice"),
    }


CASES = ["missing file", "not ONNX", "truncated", "ratio zero", "ratio one", "ratio text", "unsupported opset",
         "dynamic dims without a shape", "bad --input-shape", "unknown input in --input-shape", "path traversal",
         "unknown method"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, tmp_path, model_path, case):
    argv, expected = _bad_inputs(tmp_path, model_path)[case]
    out = tmp_path / "out.onnx"
    args = [argv[0], out, *argv[1:]]
    if "--ratio" not in argv:
        args += ["--ratio", "0.4"]
    code, stdout, stderr = run(capsys, *args)
    assert code == 2
    assert expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".onnxprune-*"))


def test_output_equal_to_input_needs_force(capsys, model_path):
    before = model_path.read_bytes()
    code, _, stderr = run(capsys, model_path, model_path, "--ratio", "0.4")
    assert code == 2 and "--force" in stderr and model_path.read_bytes() == before
    code, _, _ = run(capsys, model_path, model_path, "--ratio", "0.4", "--force")
    assert code == 0 and model_path.read_bytes() != before


def test_dynamic_dims_with_input_shape_keep_them_dynamic(capsys, tmp_path):
    model = nets.resnet()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param, dims[3].dim_param = "N", "H", "W"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    src = tmp_path / "dyn.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    code, _, stderr = run(capsys, src, out, "--ratio", "0.5", "--input-shape", "x:1,3,8,8")
    assert code == 0, stderr
    import numpy as np

    from onnxprune.ir import session
    pruned = onnx.load(str(out))
    assert [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "H", "W"]
    (y,) = session(pruned).run(None, {"x": np.ones((3, 3, 16, 16), np.float32)})
    assert y.shape == (3, 10)


def test_entry_point_runs_and_hides_tracebacks(tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnxprune.cli", str(tmp_path / "none.onnx"),
                             str(tmp_path / "o.onnx"), "--ratio", "0.4"], capture_output=True, text=True)
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("spelling", [["--input-range", "-0.95,2.15"], ["--input-range=-0.95,2.15"]])
def test_input_range_takes_negative_numbers_as_written(capsys, model_path, tmp_path, spelling):
    code, out, err = run(capsys, model_path, tmp_path / "out.onnx", "--ratio", "0.2", "--report",
                         tmp_path / "r.json", *spelling)
    assert code == 0, err
    assert "within [-0.95, 2.15]" in json.loads((tmp_path / "r.json").read_text())["input_prior"]


def test_the_cli_tables_agree_with_the_registry():
    """The CLI names methods without importing the pipeline (start-up): its tables must agree."""
    from onnxprune.passes.registry import METHODS

    from onnxprune import cli
    from onnxprune.pipeline import DEFAULT_METHOD

    assert set(cli.METHODS) == {"auto", *METHODS} and cli.DEFAULT_METHOD == DEFAULT_METHOD == "auto"
    assert set(cli.ALLOCATING) == {"auto"} | {name for name, m in METHODS.items() if m.allocates}


def test_a_target_replaces_the_ratio_on_the_command_line(capsys, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(nets.mlp(), str(model))
    out = tmp_path / "o.onnx"
    assert run(capsys, model, out, "--ratio", "0.4", "--target", "macs=0.5")[0] == 2
    assert run(capsys, model, out, "--target", "macs=0.5", "--budget", "macs")[0] == 2
    assert run(capsys, model, out, "--target", "flops=0.5")[0] == 2
    assert not out.exists()
    code, stdout, stderr = run(capsys, model, out, "--target", "macs=0.5", "--method", "magnitude", "--check", "1")
    assert code == 0, stderr
    assert "target macs=0.5" in stdout
