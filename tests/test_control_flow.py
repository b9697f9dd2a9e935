"""Control flow: If branches are analysed and sliced, Loop/Scan bodies keep their channels with a
reason, and shapes given for analysis never reach the written model."""

import numpy as np
import pytest
import recurrent_nets as R
from exactness import prune_units, zero_consumers
from onnx import numpy_helper

from onnxprune.coupling import BlockKind
from onnxprune.ir import control_values, session, signature
from onnxprune.pipeline import analyse, prune


def _group(dep, space):
    return next(g for g in dep.groups if space in g.spaces)


def _feeds(mode, batch=1):
    x = np.random.default_rng(mode).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    return {"x": x, "mode": np.array(mode, np.int64)}


def test_a_sample_rate_like_scalar_gets_the_value_it_is_compared_with():
    assert control_values(R.if_model()) == {"mode": 1}


def test_if_branches_read_outer_channels_and_return_one_group():
    dep = analyse(R.if_model()).dep
    outer = _group(dep, ("a", 1))
    assert outer.prunable and {"t_conv", "e_conv"} <= {n.name for n in outer.nodes}
    returned = _group(dep, ("b", 1))
    assert returned.prunable and sorted(n.name for n in returned.producers) == ["e_conv", "t_conv"]
    assert {("t", 1), ("e", 1)} <= set(returned.spaces)


@pytest.mark.parametrize("space", [("a", 1), ("b", 1)])
def test_if_groups_prune_exactly_in_both_branches(space):
    model = R.if_model()
    group = _group(analyse(model).dep, space)
    units = [0, 3, 5]
    reference = zero_consumers(model, group.id, units)
    pruned = prune_units(reference, group.id, units)
    assert signature(pruned) == signature(model)
    for mode in (0, 1):  # the branch the synthetic inputs take, and the other one
        a, b = session(reference).run(None, _feeds(mode)), session(pruned).run(None, _feeds(mode))
        np.testing.assert_allclose(b[0], a[0], atol=1e-5 * max(1.0, float(np.abs(a[0]).max())), rtol=0)


def test_analysis_shapes_are_not_written_into_the_model():
    """The batch is symbolic in the model and 1 for analysis: the pruned model keeps it symbolic
    (in its signature and inside the branches) and runs at another batch size, both branches."""
    model = R.if_model(batch="N")
    pruned, report = prune(model, 0.4, check=2, method="magnitude")
    assert report.groups_pruned >= 2
    assert signature(pruned) == signature(model)
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for mode in (0, 1):
        assert session(pruned).run(None, _feeds(mode, batch=3))[0].shape == (3, 4, 8, 8)


def test_loop_body_reads_keep_their_channels_and_say_why():
    model = R.loop_model()
    dep = analyse(model).dep
    read_inside = _group(dep, ("a", 1))
    assert not read_inside.prunable and read_inside.reasons[0].kind is BlockKind.CONTROL_FLOW
    assert "body of Loop 'repeat'" in read_inside.reasons[0].message
    carried = _group(dep, ("c", 1))
    assert not carried.prunable and carried.reasons[0].kind is BlockKind.CONTROL_FLOW
    assert _group(dep, ("z", 1)).prunable
    pruned, report = prune(model, 0.4, check=2, method="magnitude")
    assert report.groups_pruned == 1 and signature(pruned) == signature(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert session(pruned).run(None, {"x": x})[0].shape == (1, 4, 8, 8)


def test_the_report_counts_the_weights_inside_branches():
    model = R.if_model()
    _, report = prune(model, 0.4, check=1, method="magnitude")
    branch_weights = 2 * (6 * 8 * 9 + 6)  # conv t and conv e
    assert report.before.params == (8 * 3 * 9 + 8) + branch_weights + (4 * 6 * 9 + 4)
    assert report.after.params < report.before.params and report.after.macs < report.before.macs


@pytest.mark.parametrize("make", [R.if_model, lambda: R.recurrent(R.Form(direction="bidirectional", initial="zeros"))],
                         ids=["if", "bilstm"])
def test_the_same_seed_gives_the_same_bytes(make):
    model = make()
    first, _ = prune(model, 0.4, check=1, method="magnitude")
    second, _ = prune(model, 0.4, check=1, method="magnitude")
    assert first.SerializeToString() == second.SerializeToString()


def test_cells_in_both_branches_returning_their_state_prune_together_exactly():
    """An LSTM in one branch and a GRU in the other return Y_h as the If's output: their hidden
    units are one group (through the If), and units whose head rows and recurrent columns are
    zero in both cells go exactly, whichever branch runs."""
    model = R.if_recurrent_model()
    analysis = analyse(model)
    group = _group(analysis.dep, ("h", 2))
    assert group.prunable and sorted(n.name for n in group.producers) == ["cell_e", "cell_t"]
    units = [1, 4, 6]
    reference = zero_consumers(model, group.id, units)  # the head's rows
    for tag in ("t", "e"):  # ... and each cell's recurrent columns for them
        cell = next(n for n in reference.graph.node if n.op_type == "If")
        branch = next(a.g for a in cell.attribute if a.name == ("then_branch" if tag == "t" else "else_branch"))
        recurrent = next(t for t in branch.initializer if t.name == f"R_{tag}")
        values = numpy_helper.to_array(recurrent).copy()
        values[:, :, units] = 0
        recurrent.CopyFrom(numpy_helper.from_array(values, recurrent.name))
    pruned = prune_units(reference, group.id, units)
    assert signature(pruned) == signature(model)
    for mode in (0, 1):
        x = np.random.default_rng(mode).standard_normal((R.SEQ, R.BATCH, R.FEATURES)).astype(np.float32)
        feeds = {"x": x, "mode": np.array(mode, np.int64)}
        a, b = session(reference).run(None, feeds)[0], session(pruned).run(None, feeds)[0]
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [R.if_model, lambda: R.recurrent(R.Form())])
def test_the_default_method_falls_back_where_its_probes_cannot_batch(make):
    # an If chosen by a scalar input, a sequence-first LSTM: probe rows cannot stack on axis 0
    pruned, report = prune(make(), 0.4, method="paoding", check=2)
    assert report.plan.method == "magnitude" and report.groups_pruned > 0
    assert any("paoding cannot plan this model" in w for w in report.warnings)
    assert signature(pruned) == signature(make())
