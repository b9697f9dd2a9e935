"""What keeps a large model's memory down: held weights (onnxprune.ir.held), read once, shared
by the graph and the sessions and written straight from their arrays, to the bytes a run
without holding writes; and corrections that keep only the slices they change."""

import contextlib
import hashlib

import nets
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.cli import main
from onnxprune.errors import InternalError
from onnxprune.ir import (
    SHRINK_ARENA,
    held,
    holding,
    import_graph,
    load_model_info,
    random_inputs,
    runtime,
    save_model,
    session,
)
from onnxprune.plan import Corrections


@pytest.fixture
def held_sizes(monkeypatch):
    """The tests' models are small: hold every weight of 256 bytes or more."""
    monkeypatch.setattr(runtime, "LEAN_SESSION_BYTES", 1)
    monkeypatch.setattr(runtime, "LEAN_TENSOR_BYTES", 256)


def _with_external_data(folder, model):
    folder.mkdir(exist_ok=True)
    src = folder / "in.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    return src


def _digest(path) -> str:
    data = path.with_name(path.name + ".data")
    return hashlib.sha256(path.read_bytes() + (data.read_bytes() if data.exists() else b"")).hexdigest()


def _held_then_plain(tmp_path, monkeypatch, capsys, src, args: list[str]):
    """The CLI on ``src``, holding, then with holding off: the two outputs, and the names held
    (all in the first run: the second holds nothing)."""
    holds = []
    real = held.hold
    monkeypatch.setattr(held, "hold", lambda tensor, array: (holds.append(tensor.name), real(tensor, array))[1])
    outs = []
    for mode in ("held", "plain"):
        if mode == "plain":
            count = len(holds)
            monkeypatch.setattr(held, "active", lambda: False)
        (tmp_path / mode).mkdir()
        outs.append(tmp_path / mode / "out.onnx")
        code = main([str(src), str(outs[-1]), *args])
        assert code == 0, capsys.readouterr().err
    assert len(holds) == count, "nothing is held outside a holding block"
    return outs, holds


@pytest.mark.parametrize("method", ["magnitude", "paoding"])
def test_a_held_run_writes_the_bytes_an_unheld_one_writes(tmp_path, monkeypatch, held_sizes, capsys, method):
    src = _with_external_data(tmp_path, nets.resnet())
    outs, holds = _held_then_plain(tmp_path, monkeypatch, capsys, src, ["--ratio", "0.4", "--method", method,
                                                                        "--check", "2"])
    assert holds, "the weights were read into held arrays"
    assert outs[0].with_name("out.onnx.data").exists()
    assert _digest(outs[0]) == _digest(outs[1])


def test_held_weights_are_shared_read_only_and_go_with_their_block(tmp_path, held_sizes):
    src = _with_external_data(tmp_path, nets.mlp())
    plain, _ = load_model_info(src)
    shapes = {"x": tuple(d.dim_value or 1 for d in plain.graph.input[0].type.tensor_type.shape.dim)}
    feeds = random_inputs(plain, shapes, np.random.default_rng(0))
    with holding():
        model, files = load_model_info(src, hold=True)
        tensors = held.held_tensors(model)
        assert tensors and not any(t.HasField("raw_data") for t in tensors) and files
        arrays = {id(held.held_array(t)) for t in tensors}
        assert not any(held.held_array(t).flags.writeable for t in tensors)
        graph = import_graph(model)
        assert arrays <= {id(c.values) for c in graph.tensors().values() if hasattr(c, "values")}
        for a, b in zip(session(model).run(None, feeds), session(plain).run(None, feeds)):
            np.testing.assert_array_equal(a, b)
        save_model(model, tmp_path / "one.onnx", external_data=False)  # one protobuf: the bytes go in
        assert held.held_tensors(model) == tensors
    one = onnx.load(str(tmp_path / "one.onnx"))
    assert one.SerializeToString() == plain.SerializeToString()
    with pytest.raises(InternalError, match="not by an open block"):
        held.held_array(tensors[0])
    outside, _ = load_model_info(src, hold=True)
    assert not held.held_tensors(outside)


def test_a_held_run_keeps_the_bad_input_promise(tmp_path, held_sizes, capsys):
    src = _with_external_data(tmp_path, nets.mlp())
    data = src.with_name("in.onnx.data")
    data.write_bytes(data.read_bytes()[:-100])
    code = main([str(src), str(tmp_path / "out.onnx"), "--ratio", "0.4", "--check", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "truncated" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data"]


@pytest.mark.parametrize("method", ["paoding", "srdfp"])
def test_a_large_models_probe_steps_hold_its_weights_once_and_change_no_byte(tmp_path, monkeypatch, held_sizes, capsys,
                                                                          method):
    """Weights in the protobuf (no external data): each probe step holds the probe models'
    weights and estimates, and its gradient graph's flipped kernels, for the step alone; the
    pruned model is the same bytes as without holding."""
    src = tmp_path / "in.onnx"
    onnx.save(nets.resnet(), str(src))
    outs, holds = _held_then_plain(tmp_path, monkeypatch, capsys, src, ["--target", "macs=0.6", "--method", method,
                                                                        "--check", "2"])
    assert any(name.startswith("grad/") for name in holds), "the flipped kernels are held"
    assert any(name.startswith("onnxprune_probe") for name in holds), "the estimates are held"
    assert _digest(outs[0]) == _digest(outs[1])


def test_an_inversion_whose_gradient_model_is_large_shares_the_graphs_weights(monkeypatch):
    """Weights under the lean threshold, their gradient model (weights and flipped kernels)
    over it: the inversion holds the graph's arrays instead of copying them into its three
    sessions, keeps no flipped kernel in the caller's block once it is done, and distils the
    same inputs as without holding."""
    from onnxprune.evidence.distill import Distiller
    from onnxprune.pipeline import analyse

    model = nets.resnet()
    monkeypatch.setattr(runtime, "LEAN_TENSOR_BYTES", 256)
    weights = sum(a.nbytes for t in model.graph.initializer
                  if (a := onnx.numpy_helper.to_array(t)).nbytes >= 256 and a.dtype == np.float32)
    monkeypatch.setattr(runtime, "LEAN_SESSION_BYTES", int(1.5 * weights))
    monkeypatch.setattr(Distiller, "__init__", _small_parts(Distiller.__init__))
    distilled = []
    for hold in (True, False):
        with holding() if hold else contextlib.nullcontext():
            analysis = analyse(model)
            distiller = analysis.distiller
            tensors = held.held_tensors(distiller._batched)
            assert bool(tensors) == hold
            if hold:
                graph_arrays = {id(c.values) for c in analysis.graph.tensors().values() if hasattr(c, "values")}
                assert {id(held.held_array(t)) for t in tensors} <= graph_arrays, "shared, not copied"
            before = len(held._tables[-1]) if hold else 0
            distilled.append(distiller.distill((5, 3, 8, 8), analysis.prior, np.random.default_rng(0), steps=3))
            assert distiller.failure is None, distiller.failure
            if hold:  # the flipped kernels of its gradient graphs lived as long as their sessions
                assert len(held._tables[-1]) == before and distiller._session is None
    np.testing.assert_allclose(distilled[0], distilled[1], rtol=1e-4, atol=1e-5)


def _small_parts(init):
    """Distillers that invert more than 2 inputs in parts of 2 (the parts' sessions too)."""
    def small(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.whole, self.part = 2, 2
    return small


def test_a_lean_session_runs_without_an_arena_and_takes_the_shrink_option(held_sizes):
    model = nets.mlp()
    feeds = random_inputs(model, {"x": (4, 64)}, np.random.default_rng(0))
    lean = session(model)
    assert isinstance(lean, runtime.LeanSession)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(lean.run(None, feeds, SHRINK_ARENA), plain.run(None, feeds)):
        np.testing.assert_array_equal(a, b)


class _Const:
    def __init__(self, values):
        self.name, self.values = "w", values


def test_corrections_keep_the_slices_that_changed_only():
    w = _Const(np.arange(24, dtype=np.float32).reshape(4, 6))
    w.values[1, 2] = -0.0
    corrections = Corrections()
    new = w.values.copy()
    new[:, 4] += 1
    new[1, 2] = 0.0  # a sign bit is a change: the rewrite writes what was computed, bit for bit
    corrections.write(w, new, axis=1)
    patch = corrections.patches["w"]
    assert patch.axis == 1 and patch.index.tolist() == [2, 4] and patch.values.shape == (4, 2)
    assert corrections.read(w).tobytes() == new.tobytes()
    corrections.write(w, w.values.copy(), axis=1)
    assert not corrections and corrections.read(w) is w.values
    corrections.write(w, new.astype(np.float64))  # another type: kept whole
    assert corrections.patches["w"].axis is None and corrections.read(w).dtype == np.float64
