"""Zero-contribution exactness: the invariant every coupling rule is tested against.

If every consumer weight reading channel k of a group is zero, removing k must leave the
outputs equal. The helper zeroes those weights, prunes exactly those units with a plan, and
returns both models' outputs on the same seeded inputs.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.coupling import CONSUMER
from onnxprune.ir import random_inputs, session, to_model
from onnxprune.pipeline import analyse, prune
from onnxprune.plan import GroupPlan, PruningPlan


def zero_consumers(model: onnx.ModelProto, group_id: int, units: list[int], input_shapes=None,
                   options=None) -> onnx.ModelProto:
    analysis = analyse(model, input_shapes, options)
    group = analysis.dep.groups[group_id]
    gone = group.removed_indices(np.asarray(units))
    for member in group.members:
        if member.coupling.role != CONSUMER:
            continue
        for p in member.coupling.params:
            if p.kind != "weight":
                continue
            idx = p.param[np.isin(p.space, gone[member.space])]
            values = np.array(p.tensor.values, copy=True)
            if p.groups > 1:
                per = values.shape[1]
                rows = values.shape[0] // p.groups
                for c in idx:
                    values[(c // per) * rows:(c // per + 1) * rows, c % per] = 0
            else:
                index = [slice(None)] * values.ndim
                index[p.axis] = idx
                values[tuple(index)] = 0
            p.tensor.values = values
    return to_model(analysis.graph, analysis.model)


def prune_units(model: onnx.ModelProto, group_id: int, units: list[int], input_shapes=None,
                options=None) -> onnx.ModelProto:
    group = analyse(model, input_shapes, options).dep.groups[group_id]
    plan = PruningPlan("test", 0.5, 0, [GroupPlan(group.id, group.name, group.size, sorted(units))])
    pruned, _ = prune(model, 0.5, plan=plan, input_shapes=input_shapes, check=1, options=options, method="magnitude")
    return pruned


def outputs_after_zero_and_prune(model: onnx.ModelProto, group_id: int, units: list[int],
                                 input_shapes=None, feeds=None, options=None):
    reference = zero_consumers(model, group_id, units, input_shapes, options)
    pruned = prune_units(reference, group_id, units, input_shapes, options)
    if feeds is None:
        shapes = analyse(model, input_shapes).input_shapes
        feeds = random_inputs(model, shapes, np.random.default_rng(1), batch=None)
    return session(reference).run(None, feeds), session(pruned).run(None, feeds), pruned


def assert_exact(model: onnx.ModelProto, group_id: int, units: list[int], input_shapes=None, tol=1e-5,
                 options=None):
    ref, new, pruned = outputs_after_zero_and_prune(model, group_id, units, input_shapes, options=options)
    for a, b in zip(ref, new):
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, atol=tol * scale, rtol=0)
    return pruned
