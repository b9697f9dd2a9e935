"""Property-based: random graphs of Conv/BN/Relu/Add/Concat/Gemm and a random ratio always
give a valid model (onnx.checker, onnxruntime) with the same output shapes; zeroed consumers
always make pruning exact; and a grouped Conv weight's index arithmetic (ParamSlice) agrees
with the equivalent dense weight."""

import nets
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from exactness import assert_exact
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from onnxprune import prune
from onnxprune.coupling import ParamSlice, identity
from onnxprune.ir import random_inputs, session
from onnxprune.pipeline import analyse


@st.composite
def random_nets(draw):
    widths = {"x": 3}
    blocks, extra, tail = [], [], ""
    for i in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "add", "concat", "depthwise"]))
        names = sorted(widths)
        src = draw(st.sampled_from(names))
        name = f"t{i}"
        if kind == "add":
            same = [n for n in names if n != "x" and widths[n] == widths[src] and n != src]
            if src == "x" or not same:
                kind = "conv"
            else:
                tail += f"  {name} = Add({src}, {draw(st.sampled_from(same))})\n"
                widths[name] = widths[src]
                continue
        if kind == "concat":
            other = draw(st.sampled_from(names))
            if "x" in (src, other):
                kind = "conv"
            else:
                tail += f"  {name} = Concat<axis=1>({src}, {other})\n"
                widths[name] = widths[src] + widths[other]
                continue
        if kind == "depthwise" and src != "x":
            blocks.append(nets.conv_bn(name, src, widths[src], widths[src], group=widths[src]))
            widths[name] = widths[src]
            continue
        cout = draw(st.integers(2, 12))
        blocks.append(nets.conv_bn(name, src, widths[src], cout, k=draw(st.sampled_from([1, 3]))))
        widths[name] = cout
    last = max((n for n in widths if n != "x"), key=lambda n: int(n[1:]))
    tail += f"  g = GlobalAveragePool({last})\n  f = Flatten(g)\n  y = Gemm<transB=1>(f, fc_w, fc_b)\n"
    extra.append(f"float[5,{widths[last]}] fc_w, float[5] fc_b")
    text = nets.graph("(float[1,3,6,6] x) => (float[1,5] y)", blocks, tail, ", ".join(extra))
    return nets.from_text(text, seed=draw(st.integers(0, 2**16)))


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(model=random_nets(), ratio=st.floats(0.05, 0.95))
def test_random_graph_prunes_to_a_valid_model(model, ratio):
    pruned, report = prune(model, ratio, check=1, method="magnitude")
    feeds = random_inputs(model, {"x": (1, 3, 6, 6)}, np.random.default_rng(0))
    (a,), (b,) = session(model).run(None, feeds), session(pruned).run(None, feeds)
    assert a.shape == b.shape
    assert report.after.params <= report.before.params


@SETTINGS
@given(model=random_nets(), data=st.data())
def test_random_graph_zeroed_consumers_prune_exactly(model, data):
    groups = analyse(model).dep.prunable_groups()
    assume(groups)
    group = data.draw(st.sampled_from(groups))
    assume(group.balance is None)  # balanced groups need equal removals per block; covered by the rule tests
    units = data.draw(st.lists(st.integers(0, group.size - 1), min_size=1, max_size=group.size - 1, unique=True))
    assert_exact(model, group.id, sorted(units))


# ------------------------------------------------------------- grouped weights, index arithmetic
@st.composite
def grouped_weights(draw):
    """A grouped Conv weight [groups*rows, per, k] and the ParamSlice reading its input channels."""
    groups, per, rows, k = (draw(st.integers(lo, hi)) for lo, hi in ((1, 4), (1, 4), (1, 3), (1, 3)))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((groups * rows, per, k))
    channels = identity(groups * per)
    return ParamSlice(gs.Constant("w", values), 1, channels, channels, "weight", groups)


def _dense(p: ParamSlice, values: np.ndarray) -> np.ndarray:
    """The ungrouped weight [outputs, channels, k] computing the same Conv: zero where a conv
    group does not read a channel. The oracle for every grouped index computation."""
    rows, per = values.shape[0] // p.groups, values.shape[1]
    dense = np.zeros((values.shape[0], p.groups * per) + values.shape[2:])
    for g in range(p.groups):
        dense[g * rows:(g + 1) * rows, g * per:(g + 1) * per] = values[g * rows:(g + 1) * rows]
    return dense


def _plain(p: ParamSlice, dense: np.ndarray) -> ParamSlice:
    return ParamSlice(gs.Constant("d", dense), 1, p.space, p.param, "weight")


@SETTINGS
@given(p=grouped_weights())
def test_grouped_weight_columns_and_norms_match_the_dense_conv(p):
    values = np.asarray(p.tensor.values)
    dense = _dense(p, values)
    rows_per_group = values.shape[0] // p.groups
    np.testing.assert_allclose(p.squared_norms(), _plain(p, dense).squared_norms())
    for c in range(dense.shape[1]):
        col, rows = p.columns(values, c)
        full, everyone = _plain(p, dense).columns(dense, c)
        assert p.block_of(c) == rows[0] // rows_per_group and len(rows) == rows_per_group
        np.testing.assert_array_equal(col, full[rows])
        assert not np.delete(full, rows, axis=0).any()  # no other output reads channel c
        assert np.array_equal(everyone, np.arange(values.shape[0]))
    assert np.array_equal(p.block_of(p.param), [p.block_of(int(c)) for c in p.param])


@SETTINGS
@given(p=grouped_weights(), data=st.data())
def test_grouped_merge_and_delete_match_the_dense_conv(p, data):
    values = np.asarray(p.tensor.values)
    channels = p.groups * values.shape[1]
    dst, src = data.draw(st.integers(0, channels - 1)), data.draw(st.integers(0, channels - 1))
    merged, dense = values.copy(), _dense(p, values)
    p.add_columns(merged, dst, src, 0.5)
    if p.block_of(dst) == p.block_of(src):
        _plain(p, dense).add_columns(dense, dst, src, 0.5)
        np.testing.assert_allclose(_dense(p, merged), dense)
    else:  # a conv group cannot absorb a channel it does not read
        np.testing.assert_array_equal(merged, values)
    drop = data.draw(st.integers(0, values.shape[1] - 1))
    gone = np.array([g * values.shape[1] + j for g in range(p.groups) for j in range(drop)], dtype=np.int64)
    kept = p.deleted(values, gone)
    assert kept.shape == (values.shape[0], values.shape[1] - drop, *values.shape[2:])
    np.testing.assert_array_equal(_dense(p, kept), np.delete(_dense(p, values), gone, axis=1))
    if p.groups > 1:  # one group losing a channel the others keep
        with pytest.raises(ValueError, match="unequal"):
            p.deleted(values, np.array([0]))
