"""Zero-contribution exactness on every architecture family, for every prunable group."""

import nets
import numpy as np
import pytest
from exactness import assert_exact

from onnxprune.pipeline import analyse


@pytest.mark.parametrize("name", sorted(nets.ALL))
def test_every_group_prunes_exactly_when_its_consumers_are_zero(name):
    model = nets.ALL[name]()
    groups = analyse(model).dep.prunable_groups()
    assert groups, f"{name}: nothing prunable"
    for g in groups:
        units = list(range(0, g.size, 2))[: max(1, g.size // 2)]
        pruned = assert_exact(model, g.id, units)
        before = {i.name: i.dims for i in model.graph.initializer}
        after = {i.name: i.dims for i in pruned.graph.initializer}
        assert sum(np.prod(d) for d in after.values()) < sum(np.prod(d) for d in before.values())


def test_residual_spine_is_one_group_with_all_its_producers():
    dep = analyse(nets.resnet()).dep
    spine = [g for g in dep.groups if {"s_c", "a2_c"} <= {n.outputs[0].name for n in g.producers}]
    assert len(spine) == 1 and spine[0].prunable


def test_concat_keeps_one_group_per_branch():
    dep = analyse(nets.concat_net()).dep
    producers = sorted(tuple(sorted(n.name for n in g.producers)) for g in dep.prunable_groups())
    assert len(producers) == 4  # a, b, c and d: the concat does not merge its branches
