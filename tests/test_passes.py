"""Pass infrastructure and planning: idempotent lowering, determinism, plans, budgets."""

import nets
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from light_models import materialise
from onnxprune.passes.lower import DedupeConstants, FoldConstants, NameNodes, UnshareWeights
from onnxprune.passes.planning import removal_count

from onnxprune import UserError, prune
from onnxprune.pass_infra import PassManager
from onnxprune.pipeline import analyse
from onnxprune.plan import PruningPlan


@pytest.mark.parametrize("pass_", [NameNodes(), FoldConstants(), UnshareWeights(), DedupeConstants()],
                         ids=lambda p: type(p).__name__)
def test_a_second_run_of_each_lowering_pass_changes_nothing(pass_):
    graph = gs.import_onnx(materialise("squeezenet"))
    first = pass_(graph)
    assert not pass_(first.value).modified


def test_fold_constants_turns_constant_of_shape_weights_into_constants():
    graph = gs.import_onnx(materialise("bvlc_alexnet"))
    fill = gs.Variable("fill", dtype=np.float32)
    graph.nodes.append(gs.Node("ConstantOfShape", inputs=[gs.Constant("shp", np.array([3], np.int64))],
                               outputs=[fill]))
    out = gs.Variable("fill_out", dtype=np.float32)
    graph.nodes.append(gs.Node("Identity", inputs=[fill], outputs=[out]))
    graph.outputs.append(out)  # keeps the chain alive through cleanup; graph outputs are never folded
    result = PassManager([FoldConstants()], fixed_point=True).call(graph)
    assert result.modified and "ConstantOfShape" not in {n.op for n in result.value.nodes}
    folded = next(n for n in result.value.nodes if n.op == "Identity" and n.outputs[0].name == "fill_out")
    np.testing.assert_array_equal(folded.inputs[0].values, np.zeros(3, np.float32))


def test_same_seed_gives_the_same_bytes():
    a, _ = prune(nets.mobile_net(), 0.4, method="random", seed=3)
    b, _ = prune(nets.mobile_net(), 0.4, method="random", seed=3)
    c, _ = prune(nets.mobile_net(), 0.4, method="random", seed=4)
    assert a.SerializeToString() == b.SerializeToString() != c.SerializeToString()


def test_plan_json_round_trip_reapplies_to_the_same_model():
    pruned, report = prune(nets.concat_net(), 0.5, method="magnitude")
    plan = PruningPlan.from_json(report.plan.to_json())
    again, _ = prune(nets.concat_net(), 0.5, plan=plan, method="magnitude")
    assert again.SerializeToString() == pruned.SerializeToString()
    with pytest.raises(UserError, match="another model"):
        prune(nets.resnet(), 0.5, plan=plan, method="magnitude")


def test_ratio_removes_rounded_share_and_keeps_one():
    for group in analyse(nets.resnet()).dep.prunable_groups():
        assert removal_count(group, 0.4) == round(0.4 * group.size)
        assert removal_count(group, 0.99) == group.size - 1


def test_round_to_keeps_aligned_widths():
    pruned, report = prune(materialise("resnet50"), 0.3, round_to=8, check=1, method="magnitude")
    widths = [t.dims[0] for t in pruned.graph.initializer if len(t.dims) == 4]
    assert widths and all(w % 8 == 0 for w in widths)


def test_exclude_protects_the_groups_touching_matching_nodes():
    model = nets.resnet()  # parser models have unnamed nodes: lowering names them Op_index
    assert all(n.name for n in analyse(model).graph.nodes)
    base = analyse(model).dep.prunable_groups()
    target = next(g for g in base if len(g.producers) == 1)
    name = target.producers[0].name  # a Conv touches its output group and the group it reads
    left = {g.id for g in analyse(model).dep.prunable_groups([name])}
    assert target.id not in left
    assert left == {g.id for g in base if name not in {n.name for n in g.nodes}}
    assert len(left) == len(base) - 2


def test_invalid_ratio_and_method_are_user_errors():
    with pytest.raises(UserError):
        prune(nets.mlp(), 1.0, method="magnitude")
    with pytest.raises(UserError):
        prune(nets.mlp(), 0.5, method="nope")
