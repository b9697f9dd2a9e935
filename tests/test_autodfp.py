"""AutoDFP: its pieces (DBSCAN, removal order, the action wall, the numpy SAC, the plan probe)
and the method end to end on small nets."""

from pathlib import Path

import nets
import numpy as np
import pytest
from onnxprune.passes.action_wall import ActionWall, CountCost
from onnxprune.passes.autodfp import AutoDfp, Episode
from onnxprune.passes.cost import MacModel
from onnxprune.passes.methods import Budget
from onnxprune.passes.sac import Adam, Mlp, SoftActorCritic
from onnxprune.passes.similarity import cosine_matrix, dbscan, least_squares_order, redundancy_order

from onnxprune import prune
from onnxprune.analysis import analyse
from onnxprune.ir import input_specs, session
from onnxprune.plan import PruningPlan

MODELS = Path(__file__).resolve().parent.parent / "models"
FEW = {"episodes": 32, "batch": 8, "warmup": 16, "probes": 16}


def test_dbscan_finds_two_clusters_and_the_noise():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.05, (6, 2)), rng.normal(5, 0.05, (5, 2)), [[2.5, 10.0]]])
    distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
    labels = dbscan(distance, eps=0.5, min_samples=3)
    assert list(labels) == [0] * 6 + [1] * 5 + [-1]


def test_redundancy_order_takes_one_of_a_pair_of_look_alikes_first_and_keeps_the_other():
    # 0 and 1 are twins, 2 and 3 alike (cos 0.8), 4 stands alone
    vectors = np.array([[1.0, 0, 0, 0], [0.999, 0.03, 0, 0], [0, 1.0, 0, 0], [0, 0.8, 0.6, 0], [0, 0, 0, 1.0]])
    rank = redundancy_order(cosine_matrix(vectors), np.ones(5))
    first = int(np.argmin(rank))
    assert first in (0, 1)
    # the other twin lost its look-alike: one of the 2-3 pair goes before it
    assert rank[1 - first] > min(rank[2], rank[3])


def test_least_squares_order_is_greedy_on_what_the_kept_channels_leave_unexplained():
    """Downdating the precision as units go gives the ranks of refitting on the kept channels
    at every step (brute force); one of a pair of twins goes first."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    x[:, 1] = x[:, 0] + 0.01 * rng.normal(size=200)  # units 0 and 1 are twins
    cov = np.cov(x.T)
    weight, lam = rng.uniform(0.5, 2.0, 6), 0.05
    unit = np.arange(6)
    rank = least_squares_order([(cov, lam, unit)], weight)
    kept, brute = list(range(6)), []
    while kept:
        inv = np.linalg.inv(cov[np.ix_(kept, kept)] + lam * np.eye(len(kept)))
        saliency = weight[kept] * np.maximum(1 / np.diag(inv) - lam, 0)
        brute.append(kept.pop(int(np.argmin(saliency))))
    assert list(np.argsort(rank)) == brute
    assert brute[0] in (0, 1)


def test_cosine_matrix_keeps_merges_inside_conv_group_blocks():
    cos = cosine_matrix(np.ones((4, 3)), balance=np.array([0, 0, 1, 1]))
    assert np.isfinite(cos[0, 1]) and np.isneginf(cos[0, 2]) and np.isneginf(cos[1, 1])


def _resnet_wall(share: float):
    analysis = analyse(nets.resnet())
    groups = analysis.dep.prunable_groups([])
    model = MacModel(analysis.dep, groups)
    cost = CountCost(groups, model)
    goal = Budget(0.0, target="macs", share=share).goal(analysis, model)
    options = [np.arange(0, g.size) for g in groups]  # every count up to all but one
    return analysis, groups, model, cost, ActionWall(cost, goal, options)


def test_count_cost_agrees_with_the_mac_model():
    _, groups, model, cost, _ = _resnet_wall(0.5)
    counts = {g.id: g.size // 3 for g in groups}
    vector = np.array([[counts[g.id] for g in groups]])
    assert cost.totals(vector)[0] == pytest.approx(model.after_uniform(groups, counts))
    assert cost.base == pytest.approx(model.base)


@pytest.mark.parametrize("want", ["none", "all", "random"])
def test_the_action_wall_keeps_the_target_reachable_and_lands_on_it(want):
    _, groups, _, cost, wall = _resnet_wall(0.5)
    rng = np.random.default_rng(1)
    for _ in range(5):
        counts = np.zeros(len(groups))
        for t, g in enumerate(groups):
            asked = {"none": 0.0, "all": float(g.size), "random": rng.uniform(0, g.size)}[want]
            lo, hi = wall.bounds(counts, t)
            counts[t] = wall.clamp(counts, t, asked)
            assert counts[t] in wall.options[t]
            assert min(lo, hi) <= counts[t] <= max(hi, lo)
        left = cost.totals(counts)[0]
        step = max(np.max(np.abs(np.diff(cost.totals(np.eye(len(groups)) * 1.0)))), 1.0)  # a unit's saving, roughly
        assert abs(left - wall.goal) <= step + 1e-6


def test_settling_with_one_group_free_to_move_takes_its_own_steps():
    """Only one group has options besides 0: its steps down and up pair with nothing, and
    settling must still move it (it raised, and the CLI exited 1, on models/encoders/mha.onnx
    at --ratio 0.4)."""
    _, groups, _, cost, _ = _resnet_wall(0.5)
    options = [np.arange(0, groups[0].size)] + [np.zeros(1) for _ in groups[1:]]
    goal = float(cost.totals(np.eye(len(groups))[:1] * 3)[0])  # three units of the first group
    wall = ActionWall(cost, goal, options)
    settled = wall.settle(np.zeros(len(groups)))
    assert settled[0] == 3 and not settled[1:].any()


def test_mlp_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    net = Mlp([3, 5, 2], rng)
    x = rng.normal(size=(4, 3))
    out, cache = net.forward(x)
    grads, dx = net.backward(cache, np.ones_like(out))
    eps = 1e-6
    w = net.params[0]
    w[1, 2] += eps
    up = net(x).sum()
    w[1, 2] -= 2 * eps
    down = net(x).sum()
    w[1, 2] += eps
    assert grads[0][1, 2] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    x2 = x.copy()
    x2[0, 1] += eps
    assert dx[0, 1] == pytest.approx((net(x2).sum() - net(x).sum()) / eps, rel=1e-4, abs=1e-6)


def test_adam_minimises_a_quadratic():
    p = np.array([3.0, -2.0])
    opt = Adam([p], lr=0.1)
    for _ in range(300):
        opt.step([2 * p])
    assert np.abs(p).max() < 1e-2


def test_sac_learns_a_one_step_bandit():
    # reward -(a - 0.5)^2 whatever the state: the policy's mean action should move to 0.5
    rng = np.random.default_rng(0)
    agent = SoftActorCritic(2, 1, np.random.default_rng(1))
    state = np.array([0.3, 0.7])
    for _ in range(600):
        a = agent.act(state)
        agent.buffer.add(state, a, -float((a[0] - 0.5) ** 2) * 10, np.zeros(2), True)
        if agent.buffer.size >= 32:
            agent.update()
    assert abs(agent.act(state, deterministic=True)[0] - 0.5) < 0.15
    assert agent.alpha < 1.0  # the temperature was tuned down from its start
    del rng


def _mlp_environment(reconstruction: str):
    analysis = analyse(MODELS / "mlp.onnx", input_range=(0.0, 1.0))
    budget = Budget(0.0, target="macs", share=0.5, reconstruction=reconstruction)
    return analysis, budget, AutoDfp(**FEW).environment(analysis, budget)


@pytest.mark.parametrize("reconstruction", ["pair", "least-squares"])
def test_a_plan_probe_row_is_the_pruned_compensated_model(reconstruction):
    """What the agent is rewarded on is what gets written (the MLP has no padding to differ on)."""
    analysis, budget, env = _mlp_environment(reconstruction)
    rng = np.random.default_rng(3)
    episode = env.rollout(lambda s: rng.uniform(-1, 1, env.action_dim))
    row = env.probe.run([env.rows.rows(env.group_plans(episode), env.probe)])[0]
    plan = PruningPlan("autodfp", 0.0, budget.seed, env.group_plans(episode), reconstruction=reconstruction)
    assert plan.removed_units > 0 and (reconstruction == "least-squares" or any(
        v >= 0 for gp in plan.groups for v in gp.merge_into))
    pruned, _ = prune(MODELS / "mlp.onnx", plan=plan, input_range=(0.0, 1.0), check=0)
    written = session(pruned).run(None, env.probe.inputs)[0]
    np.testing.assert_allclose(row, written, rtol=1e-3, atol=1e-3 * np.abs(written).max())


def _check_signature(original, pruned):
    before, after = input_specs(original), input_specs(pruned)
    assert [(s.name, s.dims) for s in before] == [(s.name, s.dims) for s in after]
    x = {s.name: np.random.default_rng(0).normal(size=s.dims).astype(np.float32) for s in after}
    y0, y1 = session(original).run(None, x), session(pruned).run(None, x)
    assert [a.shape for a in y0] == [b.shape for b in y1]


@pytest.mark.parametrize("share", [0.5, 0.35])
def test_autodfp_writes_a_valid_model_at_the_mac_target(share):
    model = nets.resnet()
    pruned, report = prune(model, method="autodfp", target=f"macs={share}", method_options=FEW, check=2)
    _check_signature(nets.resnet(), pruned)
    assert abs(report.after.macs / report.before.macs - share) < 0.02
    assert report.plan.details["episodes"] == FEW["episodes"]


def test_autodfp_is_seeded_and_its_plan_replays_to_the_same_bytes():
    a, report = prune(nets.mobile_net(), method="autodfp", target="macs=0.5", seed=4, method_options=FEW, check=0)
    b, _ = prune(nets.mobile_net(), method="autodfp", target="macs=0.5", seed=4, method_options=FEW, check=0)
    assert a.SerializeToString() == b.SerializeToString()
    plan = PruningPlan.from_json(report.plan.to_json())
    again, _ = prune(nets.mobile_net(), plan=plan, check=0)
    assert again.SerializeToString() == a.SerializeToString()


def test_autodfp_with_a_ratio_spends_the_uniform_plans_macs():
    _, uniform = prune(nets.concat_net(), 0.4, method="magnitude", target="macs", check=0)
    _, auto = prune(nets.concat_net(), 0.4, method="autodfp", method_options=FEW, check=0)
    assert abs(auto.after.macs - uniform.after.macs) < 0.02 * uniform.before.macs


def test_autodfp_beats_random_at_equal_macs_on_the_synthetic_evidence():
    """The MLP digits net at macs=0.5, fidelity on held-out synthetic inputs (not real data)."""
    kwargs = {"target": "macs=0.5", "input_range": (0.0, 1.0), "check": 16}
    _, rand = prune(MODELS / "mlp.onnx", method="random", **kwargs)
    _, auto = prune(MODELS / "mlp.onnx", method="autodfp", method_options=FEW, **kwargs)
    assert abs(auto.after.macs - rand.after.macs) < 0.02 * rand.before.macs
    assert auto.fidelity.cosine > rand.fidelity.cosine + 0.02


def test_the_agent_finds_better_plans_than_its_warm_up():
    _, _, env = _mlp_environment("pair")
    best, trace, top = AutoDfp(**FEW)._search(env, 0, None)
    assert best.distance <= min(trace[:FEW["warmup"]])
    assert isinstance(best, Episode) and best.distance == min(trace)
    # the best distinct plans, best first, for scoring again on other inputs
    assert top[0] is best and [e.distance for e in top] == sorted(e.distance for e in top) and len(top) > 1
    again = env.rescore(top)
    assert again is not None and len(again) == len(top) and np.all(again >= 0)
    # the same plan scored on the same inputs reads the same distance: the second set is other inputs
    assert not np.allclose(again, [e.distance for e in top])


def test_rescoring_never_inverts_again(monkeypatch):
    """Where the statistics' pool holds fewer than twice the probes (a model of several GMACs
    measures statistics on 16 inputs), more would mean a new inversion: no second set."""
    analysis, _, env = _mlp_environment("pair")
    _, _, top = AutoDfp(**FEW)._search(env, 0, None)
    monkeypatch.setattr(type(analysis), "statistics_count", property(lambda self: 2 * env.probe.probes - 1))
    monkeypatch.setattr(type(analysis), "_pool", lambda *a, **k: pytest.fail("inverted again"))
    assert env.rescore(top) is None


def test_the_answer_is_the_best_plan_on_both_sets_of_probes(monkeypatch):
    """The best of hundreds of plans on one set of probes is partly the best at fitting them:
    the search's best few are scored again on the pool's next inputs, and the best on both wins."""
    from onnxprune.passes import autodfp

    chosen = {}

    def rescore(self, episodes):
        chosen["top"] = list(episodes)
        out = np.full(len(episodes), 1.0)
        out[2] = 0.0  # the third-best on the probes is the best on the other inputs
        return out

    monkeypatch.setattr(autodfp.Environment, "rescore", rescore)
    _, report = prune(MODELS / "mlp.onnx", method="autodfp", method_options=FEW, target="macs=0.5",
                      input_range=(0.0, 1.0), check=0)
    third = chosen["top"][2]
    assert report.plan.details["rescored"] == len(chosen["top"]) == autodfp.RESCORED
    assert report.plan.details["best_cosine_distance"] == third.distance > chosen["top"][0].distance
