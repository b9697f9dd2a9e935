"""Recurrent layers (LSTM, GRU, RNN): hidden units as a group, input features as a consumer,
exactness where the maths allows it, and states that cross the signature kept with a reason."""

import json

import numpy as np
import onnx
import pytest
import recurrent_nets as R
from exactness import prune_units
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxprune.coupling import CONSUMER, BlockKind
from onnxprune.ir import random_inputs, session, signature, to_model
from onnxprune.pipeline import analyse, prune
from onnxprune.plan import GroupPlan, PruningPlan
from onnxprune.rewrite import apply_plan, fork

FORMS = [R.Form(op=op, direction=d, layout=layout, initial=init, bias=bias)
         for op in ("LSTM", "GRU", "RNN") for d in ("forward", "reverse", "bidirectional") for layout in (0, 1)
         for init, bias in (("none", True), ("zeros", False), ("const", True))]
FORMS += [R.Form(peephole=True, seq_lens=True, initial="const"), R.Form(op="GRU", linear_before_reset=1, initial="zeros"),
          R.Form(op="GRU", direction="bidirectional", seq_lens=True)]
#: onnxruntime's CPU kernels refuse layout=1 (batch first): those forms run in onnx's reference evaluator.
RUNNABLE = [f for f in FORMS if f.layout == 0]
UNITS = [1, 4, 6]  # of the 8 hidden units
FEATURE_UNITS = [0, 3]  # of the 6 input features


def _feeds(model):
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in model.graph.input}
    return random_inputs(model, shapes, np.random.default_rng(3))


def _run(model, feeds):
    if any(n.op_type in R.GATES and any(a.name == "layout" and a.i == 1 for a in n.attribute) for n in model.graph.node):
        return ReferenceEvaluator(model).run(None, feeds)
    return session(model).run(None, feeds)


def _initializers(model):
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def _replace(model, arrays):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return out


def _rewritten(model, group_id, units):
    """Analyse, remove ``units`` of a group and export, without the pipeline's onnxruntime check."""
    analysis = analyse(model)
    group = analysis.dep.groups[group_id]
    plan = PruningPlan("test", 0.5, 0, [GroupPlan(group.id, group.name, group.size, sorted(units))], compensate=False)
    graph, dep = fork(analysis.graph, analysis.dep)
    return to_model(apply_plan(graph, dep, plan), analysis.model)


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_hidden_units_and_input_features_are_groups(form):
    dep = analyse(R.recurrent(form)).dep
    hidden, features = R.hidden_group(dep), R.feature_group(dep)
    assert hidden.prunable and hidden.size == R.HIDDEN and [n.name for n in hidden.producers] == ["rnn"]
    assert features.prunable and features.size == R.CHANNELS
    consumers = {m.node.name for m in features.members if m.coupling.role == CONSUMER}
    assert consumers == {"rnn"}  # the columns of W read the projection's channels


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_units_that_reach_nothing_are_removed_exactly(form):
    """Zero contribution: unit h's recurrent columns of R and the head's rows for it (every
    direction) are zero, so nothing reads it; removing it must leave the outputs equal."""
    model = R.recurrent(form)
    arrays = _initializers(model)
    arrays["R"][:, :, UNITS] = 0
    for d in range(form.dirs):
        arrays["w1"][[d * R.HIDDEN + u for u in UNITS]] = 0
    reference = _replace(model, arrays)
    group = R.hidden_group(analyse(reference).dep)
    pruned = _rewritten(reference, group.id, UNITS)
    feeds = _feeds(model)
    for a, b in zip(_run(reference, feeds), _run(pruned, feeds)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    hidden = next(n for n in pruned.graph.node if n.op_type == form.op)
    assert next(a.i for a in hidden.attribute if a.name == "hidden_size") == R.HIDDEN - len(UNITS)
    assert signature(pruned) == signature(model)


@pytest.mark.parametrize("form", RUNNABLE, ids=str)
def test_input_features_zeroed_in_w_are_removed_exactly(form):
    model = R.recurrent(form)
    arrays = _initializers(model)
    arrays["W"][:, :, FEATURE_UNITS] = 0
    reference = _replace(model, arrays)
    group = R.feature_group(analyse(reference).dep)
    pruned = prune_units(reference, group.id, FEATURE_UNITS)
    feeds = _feeds(model)
    for a, b in zip(session(reference).run(None, feeds), session(pruned).run(None, feeds)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", [R.Form(initial="zeros", direction="bidirectional"), R.Form(peephole=True),
                                  R.Form(op="GRU", initial="zeros", direction="bidirectional"),
                                  R.Form(op="GRU", linear_before_reset=1)], ids=str)
def test_units_whose_gate_holds_them_at_zero_are_removed_exactly(form):
    """An LSTM unit with a zero-weight row still outputs sigmoid(0)*tanh(c), so zero rows are not
    zero contribution. A closed output gate (bias -100) holds h at 0; a GRU unit whose update
    gate is saturated open (bias +100) keeps its zero initial state. Such units feed nothing:
    neither the head nor the other units through R."""
    model = R.recurrent(form)
    arrays = _initializers(model)
    gate_block = 1 if form.op == "LSTM" else 0  # LSTM gates i o f c; GRU z r h
    for u in UNITS:
        arrays["B"][:, gate_block * R.HIDDEN + u] = -100.0 if form.op == "LSTM" else 100.0
    reference = _replace(model, arrays)
    group = R.hidden_group(analyse(reference).dep)
    pruned = prune_units(reference, group.id, UNITS)
    feeds = _feeds(model)
    for a, b in zip(session(reference).run(None, feeds), session(pruned).run(None, feeds)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", [R.Form(), R.Form(op="GRU", direction="bidirectional", initial="zeros"),
                                  R.Form(direction="bidirectional", initial="const", peephole=True)], ids=str)
def test_magnitude_removes_the_weak_units_and_the_model_still_runs(form):
    """Three hidden units with small (not zero) weights: magnitude pruning at 3/8 removes just
    those; the pruned model keeps its signature and its outputs stay close."""
    model = R.recurrent(form)
    arrays = _initializers(model)
    gates = R.GATES[form.op]
    rows = [g * R.HIDDEN + u for g in range(gates) for u in UNITS]
    for name in ("W", "R"):
        arrays[name][:, rows] *= 1e-3
    arrays["R"][:, :, UNITS] *= 1e-3
    for d in range(form.dirs):
        arrays["w1"][[d * R.HIDDEN + u for u in UNITS]] *= 1e-3
    weak = _replace(model, arrays)
    pruned, report = prune(weak, len(UNITS) / R.HIDDEN, exclude=["proj"], check=2, method="magnitude")
    hidden = R.hidden_group(analyse(weak).dep)
    assert [sorted(g.remove) for g in report.plan.groups if g.group == hidden.id] == [UNITS]
    assert signature(pruned) == signature(weak)
    feeds = _feeds(weak)
    a, b = session(weak).run(None, feeds)[0], session(pruned).run(None, feeds)[0]
    assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_state_fed_and_returned_through_the_signature_is_kept_and_says_why():
    dep = analyse(R.recurrent(R.Form(initial="input", state_output=True))).dep
    hidden = R.hidden_group(dep)
    assert not hidden.prunable
    first = hidden.reasons[0]
    assert first.kind is BlockKind.RECURRENT_STATE and first.node == "rnn"
    assert "both graph input and output" in first.message and "'h0'" in first.message and "'Y_h'" in first.message


def test_state_fed_as_graph_input_only_is_kept():
    dep = analyse(R.recurrent(R.Form(initial="input"))).dep
    first = R.hidden_group(dep).reasons[0]
    assert first.kind is BlockKind.RECURRENT_STATE and "is a graph input" in first.message


def test_zeros_state_follows_the_pruned_width_and_the_batch_stays_dynamic():
    """PyTorch's 'no state given' is ConstantOfShape([dirs, batch, H]) with the batch read at run
    time: the hidden width is scaled, the batch stays dynamic, in the graph and its signature."""
    model = R.recurrent(R.Form(initial="zeros", direction="bidirectional"), batch="N")
    shapes = {"x": (R.SEQ, 2, R.FEATURES)}
    group = R.hidden_group(analyse(model, shapes).dep)
    pruned = prune_units(model, group.id, UNITS, input_shapes=shapes)
    assert signature(pruned) == signature(model)
    assert pruned.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "N"
    feeds = {"x": np.random.default_rng(0).standard_normal((R.SEQ, 3, R.FEATURES)).astype(np.float32)}
    assert session(pruned).run(None, feeds)[0].shape == (R.SEQ, 3, R.OUT)  # another batch size


def test_inspect_says_the_state_is_kept_because_the_caller_carries_it(capsys, tmp_path):
    from onnxprune.cli import main

    path = tmp_path / "stateful.onnx"
    onnx.save(R.recurrent(R.Form(initial="input", state_output=True)), str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    kept = next(g for g in groups if any(r["kind"] == "recurrent_state" for r in g["reasons"]))
    assert kept["why"][0].startswith("recurrent state 'c0', 'h0' of LSTM 'rnn' is both graph input and output")
    assert main(["inspect", str(path)]) == 0
    assert "recurrent_state" in capsys.readouterr().out


def test_a_state_input_of_its_own_shape_is_fed_whole_to_every_probe():
    """h0 [dirs, batch, H] is fully static here and has no axis of the first input's leading
    size: the fidelity check feeds it unchanged with every sample instead of stacking it."""
    model = R.recurrent(R.Form(initial="input"))
    pruned, report = prune(model, 0.4, check=3, method="magnitude")
    assert report.groups_pruned == 1 and report.fidelity.probes == 3
    assert signature(pruned) == signature(model)


def test_a_model_onnxruntime_cannot_run_itself_is_a_clear_user_error():
    """onnxruntime has no CPU kernel for batch-first (layout=1) recurrent layers: the pruned
    model cannot be checked, and the message says the original does not run either."""
    from onnxprune.errors import UserError

    with pytest.raises(UserError, match="cannot run the model itself"):
        prune(R.recurrent(R.Form(layout=1)), 0.4, check=1, method="magnitude")
