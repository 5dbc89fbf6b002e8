"""Re-solving with the node-to-stage placement fixed (a re-plan while training moves no weights)."""
from collections import Counter

import pytest

from scheduler.constraints import violations
from scheduler.problem import Problem
from scheduler.solve import STRATEGIES, solve
from topology.cost import CostModel
from topology.errors import ConfigError
from topology.model_spec import load_model_spec
from topology.simulator import simulate
from tests.test_drift import changed, emulated_topology


def problem_on(topology, **changes):
    fields = dict(topology=topology, model=load_model_spec("llama-tiny-fp32"), microbatch_size=4,
                  stage_sizes=[2, 2, 2, 2], num_microbatches=8, memory=3, skip_ratio=0.25, seed=0)
    fields.update(changes)
    return Problem(**fields)


def test_resolve_keeps_placement_and_constraints_and_avoids_the_slow_link():
    prior = emulated_topology()
    plan = solve(problem_on(prior), "skippipe")
    placement = [n.stage for n in sorted(plan.nodes, key=lambda n: n.id)]
    used = Counter((n, m) for p in plan.paths for n, m in zip(p.nodes, p.nodes[1:]))
    slow = changed(prior, link=used.most_common(1)[0][0], factor=0.25)
    again = solve(problem_on(slow, stage_sizes=None, fixed_placement=placement), "skippipe")
    assert [n.stage for n in sorted(again.nodes, key=lambda n: n.id)] == placement
    assert [n.rank for n in again.nodes] == [n.rank for n in plan.nodes]
    assert violations(again) == []  # CC1-CC4 and TC1 (and the order's rules)
    old_on_slow = simulate(plan.workload(), cost=CostModel(slow, plan_model(), 4, 4), memory=3).iteration_s
    assert again.predicted["iteration_s"] < 0.9 * old_on_slow  # the new paths route around the slow link


def plan_model():
    return load_model_spec("llama-tiny-fp32")


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "full"])
def test_every_partial_strategy_keeps_a_fixed_placement(strategy):
    placement = [3, 2, 1, 0, 0, 1, 2, 3]  # not what any strategy would choose
    plan = solve(problem_on(emulated_topology(), stage_sizes=None, fixed_placement=placement), strategy)
    assert [n.stage for n in sorted(plan.nodes, key=lambda n: n.id)] == placement
    assert violations(plan) == []


def test_full_pipeline_keeps_a_fixed_placement():
    placement = [3, 2, 1, 0, 0, 1, 2, 3]
    plan = solve(problem_on(emulated_topology(), stage_sizes=None, skip_ratio=0.0, fixed_placement=placement), "full")
    assert [n.stage for n in sorted(plan.nodes, key=lambda n: n.id)] == placement


@pytest.mark.parametrize("placement, words", [
    ([0, 1, 2], "each of the 8 nodes"),
    ([0, 0, 1, 1, 3, 3, 3, 3], "without a node"),
    ([0, 0, 0, 1, 1, 2, 2, 3], "stage sizes [3, 2, 2, 1]"),
])
def test_bad_fixed_placement(placement, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        problem_on(emulated_topology(), fixed_placement=placement)
