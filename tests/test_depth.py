"""Depth remedies of a skipping plan (scheduler/depth.py: full-depth paths and plans, half-depth and even
stage sets, depths spread and even donors) and plans rotated across iterations (scheduler/rotation.py):
valid plans, kept loads, predicted costs. The per-step schedules that run them: tests/test_plan_schedules.py."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from scheduler.constraints import check, violations
from scheduler.depth import (all_full_depth, average_iteration_s, even_depth, even_stages, full_depth_count,
                             mix_full_depth, shallow_depth, spread_depth, step_rng, step_kind)
from scheduler.problem import Problem
from scheduler.rotation import TOLERANCE, distinct_stage_sets, rotation
from scheduler.solve import solve
from skippipe.config import load_config
from skippipe.path_schedule import plan_schedule
from skippipe.planning import make_plan
from topology.errors import ConfigError
from topology.load import load_topology
from topology.model_spec import load_model_spec
from topology.plan import Plan, Route

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(topology=load_topology("gcp-12-regions", 8, 0), model=load_model_spec("llama-tiny"),
                   num_stages=8, num_microbatches=16, memory=16, skip_ratio=0.25, microbatch_size=2)


def test_mixed_plan_is_valid_balanced_and_costs_what_the_simulator_says(problem):
    plain = solve(problem, "skippipe")
    mixed = mix_full_depth(problem, "skippipe", 0.125)
    check(mixed)  # CC2 accepts the declared full-depth paths, CC4 and TC1 still hold
    assert mixed.constraints["full_depth"] == [14, 15] and len(mixed.paths) == 16
    full = [p for p in mixed.paths if p.microbatch in (14, 15)]
    assert all(p.stages == tuple(range(8)) for p in full)
    assert all(len(p.stages) == 6 for p in mixed.paths if p.microbatch < 14)
    assert mixed.predicted["iteration_s"] > 0 and plain.predicted["iteration_s"] > 0
    assert mix_full_depth(problem, "skippipe", 0.0).to_dict() == plain.to_dict()


def test_a_declared_full_depth_path_must_visit_every_stage(problem):
    mixed = mix_full_depth(problem, "skippipe", 0.125)
    bad = dataclasses.replace(mixed, constraints={**mixed.constraints, "full_depth": [0, 14, 15]})
    with pytest.raises(ConfigError, match="full-depth path must visit every stage"):
        check(bad)
    with pytest.raises(ConfigError, match="list of microbatch ids"):
        check(dataclasses.replace(mixed, constraints={**mixed.constraints, "full_depth": "all"}))


def test_all_full_depth_keeps_the_placement(problem):
    plan = solve(problem, "skippipe")
    full = all_full_depth(problem, plan)
    check(full)
    assert [n.stage for n in full.nodes] == [n.stage for n in plan.nodes]
    assert all(p.stages == tuple(range(8)) for p in full.paths)
    assert average_iteration_s({"base": 10.0, "full": 20.0}, full_every=4) == pytest.approx(12.5)
    assert average_iteration_s({"base": 10.0}) == 10.0
    # one in 10 full (steps 10, 20), one in 4 shallow (steps 3, 7, 11, 15, 19): 2 + 5 of 20 steps
    assert average_iteration_s({"base": 10.0, "full": 20.0, "shallow": 6.0}, full_every=10, shallow_every=4) == \
        pytest.approx((13 * 10.0 + 2 * 20.0 + 5 * 6.0) / 20)


def test_shallow_depth_keeps_the_placement_and_halves_the_paths(problem):
    plan = solve(problem, "skippipe")
    shallow = shallow_depth(problem, plan, 0.5)
    check(shallow)
    assert shallow.placement() == plan.placement()
    assert {len(p.stages) for p in shallow.paths} == {4} and {len(p.stages) for p in plan.paths} == {6}
    assert shallow.predicted["iteration_s"] < plan.predicted["iteration_s"]


@pytest.mark.parametrize("num_stages, count, stages", [(8, 4, [0, 2, 4, 6]), (6, 3, [0, 2, 4]), (6, 4, [0, 1, 3, 4]),
                                                      (5, 5, [0, 1, 2, 3, 4]), (7, 1, [0])])
def test_even_stages_start_at_0_and_spread_the_gaps(num_stages, count, stages):
    assert even_stages(num_stages, count) == stages
    with pytest.raises(ConfigError, match="cannot keep 9 of 8 stages"):
        even_stages(8, 9)


def test_even_depth_runs_every_microbatch_on_the_evenly_spaced_half(problem):
    plan = solve(problem, "skippipe")
    even = even_depth(problem, plan, 0.5)
    check(even)  # CC4 balances the kept stages only; TC1 spreads each one's load over its replicas
    assert even.placement() == plan.placement() and even.skip_ratio == 0.5
    assert even.constraints["kept_stages"] == [0, 2, 4, 6]
    assert {p.stages for p in even.paths} == {(0, 2, 4, 6)}
    assert [p.data_node for p in even.paths] == [p.data_node for p in sorted(plan.paths, key=lambda p: p.microbatch)]
    assert even.predicted["iteration_s"] > 0


def test_a_declared_stage_set_must_be_every_path_and_well_formed(problem):
    even = even_depth(problem, solve(problem, "skippipe"), 0.5)
    other = dataclasses.replace(even, constraints={**even.constraints, "kept_stages": [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match=r"keeps stages \[0, 1, 2, 3\] on every path, not \[0, 2, 4, 6\]"):
        check(other)
    undeclared = dataclasses.replace(even, constraints={k: v for k, v in even.constraints.items() if k != "kept_stages"})
    assert any(v.rule == "CC4" for v in violations(undeclared))  # stages 1, 3, 5, 7 unvisited
    for bad in ([2, 4], [0, 4, 2], [0, 8], "even"):
        with pytest.raises(ConfigError, match="kept_stages must be ascending stage ids from 0 below 8"):
            check(dataclasses.replace(even, constraints={**even.constraints, "kept_stages": bad}))


def _loads(plan: Plan) -> tuple[Counter, Counter]:
    return Counter(s for p in plan.paths for s in p.stages), Counter(n for p in plan.paths for n in p.nodes)


def test_spread_depth_moves_visits_between_microbatches_and_keeps_every_load(problem):
    """Each microbatch gives or takes one stage visit: depths L - 1 and L + 1 (here 5 and 7 of 8), every
    stage's visits and every node's load as in the plan, a valid plan; the draws repeat per (seed, step)."""
    plan = solve(problem, "skippipe")
    spread = spread_depth(plan, 8, step_rng("spread", 0, 1))
    check(spread)
    assert spread.constraints["depth_spread"] is True and spread.placement() == plan.placement()
    assert Counter(len(p.stages) for p in spread.paths) == {5: 8, 7: 8}
    assert _loads(spread) == _loads(plan)
    assert [p.data_node for p in spread.paths] == [p.data_node for p in sorted(plan.paths, key=lambda p: p.microbatch)]
    assert spread.paths == spread_depth(plan, 8, step_rng("spread", 0, 1)).paths
    assert spread.paths != spread_depth(plan, 8, step_rng("spread", 0, 2)).paths
    assert Counter(len(p.stages) for p in spread_depth(plan, 3, step_rng("spread", 0, 1)).paths) == {5: 3, 6: 10, 7: 3}


def test_the_validator_holds_spread_depths_to_one_either_side_and_their_mean(problem):
    spread = spread_depth(solve(problem, "skippipe"), 8, step_rng("spread", 0, 1))
    short = next(p for p in spread.paths if len(p.stages) == 5)
    shorter = Route(short.microbatch, short.data_node, short.nodes[:-1], short.stages[:-1])
    broken = dataclasses.replace(spread, paths=[shorter if p is short else p for p in spread.paths])
    found = [str(v) for v in violations(broken) if v.rule == "CC2"]
    assert any("visits 4 stages; skip ratio 0.25 with 8 stages needs 5 to 7 (depths spread)" in v for v in found)
    assert any("spread depths must average the skip ratio's 6 stages, not 5.938" in v for v in found)
    undeclared = dataclasses.replace(spread, constraints={k: v for k, v in spread.constraints.items() if k != "depth_spread"})
    assert any("needs 6" in str(v) for v in violations(undeclared))


def test_even_donors_run_exactly_the_even_set_inside_a_spread_step(problem):
    """With even donors, that many microbatches whose paths hold the even half-depth set in order give
    every other stage away, one visit to each of as many receivers (the sandwich rule inside a step): they
    run the even set, the rest stay within one of L, every stage's visits and every node's load are the
    plan's, and the validator accepts the set only where the plan declares it. Without even donors the
    draws are the plain spread's."""
    plan = solve(problem, "skippipe")
    even = even_stages(8, 4)
    holders = [p for p in plan.paths if [s for s in p.stages if s in even] == even]
    assert len(holders) >= 2  # the solver's plan has microbatches that can give their other stages away
    sandwich = spread_depth(plan, 8, step_rng("spread", 0, 1), even=even, even_donors=2)
    check(sandwich)
    halves = [p for p in sandwich.paths if list(p.stages) == even]
    assert len(halves) == 2 and {p.microbatch for p in halves} <= {p.microbatch for p in holders}
    assert sandwich.constraints["spread_even"] == [0, 2, 4, 6] and sandwich.constraints["depth_spread"] is True
    assert all(5 <= len(p.stages) <= 7 for p in sandwich.paths if p not in halves)
    assert sum(len(p.stages) for p in sandwich.paths) == 6 * 16 and _loads(sandwich) == _loads(plan)
    assert sandwich.paths == spread_depth(plan, 8, step_rng("spread", 0, 1), even=even, even_donors=2).paths
    plain = spread_depth(plan, 8, step_rng("spread", 0, 1))
    assert spread_depth(plan, 8, step_rng("spread", 0, 1), even=even, even_donors=0).paths == plain.paths
    assert "spread_even" not in plain.constraints
    undeclared = dataclasses.replace(sandwich, constraints={k: v for k, v in sandwich.constraints.items() if k != "spread_even"})
    found = [str(v) for v in violations(undeclared) if v.rule == "CC2"]
    assert len(found) == 2 and all("visits 4 stages; skip ratio 0.25 with 8 stages needs 5 to 7 (depths spread)" in v
                                   for v in found)


def test_spread_even_trains_the_even_set_on_every_plan_step_and_repeats_on_resume():
    overrides = ["schedule.skip_ratio=0.25", "schedule.num_stages=8", "schedule.num_nodes=8", "schedule.full_every=10",
                 "schedule.depth_spread=1.0", "schedule.spread_even=0.125"]
    cfg = load_config(ROOT / "configs/train/omission.yaml", overrides)
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    for k in (1, 2, 3):
        step = schedule.plan_at(k)
        check(step)
        assert sum(list(p.stages) == [0, 2, 4, 6] for p in step.paths) == 2  # floor(0.125 x 16) microbatches
    assert Counter(len(p.stages) for p in schedule.plan_at(10).paths) == {8: 16}  # the full-depth step as it was
    again = plan_schedule(load_config(ROOT / "configs/train/omission.yaml", overrides), plan)
    assert [again.plan_at(k).paths for k in (1, 2)] == [schedule.plan_at(k).paths for k in (1, 2)]


def test_retime_prices_a_spread_plan_as_the_solver_runs_it_depths_kept(problem):
    from scheduler.skippipe import retime
    plan = solve(problem, "skippipe")
    spread = spread_depth(plan, 8, step_rng("spread", 0, 1))
    timed = retime(problem, spread)
    check(timed)
    assert Counter(len(p.stages) for p in timed.paths) == Counter(len(p.stages) for p in spread.paths)
    assert timed.placement() == plan.placement() and timed.constraints == spread.constraints
    assert 0 < timed.predicted["iteration_s"] < float("inf") and timed.order != spread.order


def test_a_spread_schedule_is_priced_on_its_plan_steps_draws(problem):
    """The study prices a spread iteration as the mean of the first plan steps' draws, each on the step's
    plan of the rotation, spread as training spreads it and re-timed (skippipe.experiments.omission_study)."""
    from skippipe.experiments.omission_study import SPREAD_DRAWS_PRICED, spread_plans
    plan = solve(problem, "skippipe")
    other = rotation(problem, plan, 2)[-1]
    remedy = {"full_every": 10, "shallow_every": 4, "depth_spread": 1.0}
    priced = spread_plans(problem, [plan, other], remedy)
    assert len(priced) == SPREAD_DRAWS_PRICED
    steps = [k for k in range(1, 20) if step_kind(k, full_every=10, shallow_every=4) == "base"][:SPREAD_DRAWS_PRICED]
    assert steps == [1, 2, 4, 5, 6, 8, 9, 12]  # 3, 7, 11 shallow, 10 full
    for k, timed in zip(steps, priced):
        check(timed)
        drawn = spread_depth([plan, other][(k - 1) % 2], 8, step_rng("spread", 0, k))
        assert Counter(len(p.stages) for p in timed.paths) == Counter(len(p.stages) for p in drawn.paths)
        assert _loads(timed)[0] == _loads(drawn)[0]


def test_depth_spread_runs_on_the_plan_steps_only_and_repeats_on_resume():
    overrides = ["schedule.skip_ratio=0.25", "schedule.full_every=10", "schedule.shallow_every=4",
                 "schedule.depth_spread=1.0"]
    cfg = load_config(ROOT / "configs/train/debug.yaml", overrides)
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    depths = {k: Counter(len(p.stages) for p in schedule.plan_at(k).paths) for k in (1, 2, 3, 10)}
    m = len(plan.paths)
    for k in (1, 2):  # 3 of 4 stages, spread one either side; a last pair may find no stage to move
        assert set(depths[k]) <= {2, 3, 4} and depths[k][2] == depths[k][4] >= m // 2 - 1
    assert depths[3] == {2: m} and depths[10] == {4: m}  # the shallow and full-depth steps as they were
    assert _loads(schedule.plan_at(1)) == _loads(plan)
    again = plan_schedule(load_config(ROOT / "configs/train/debug.yaml", overrides), plan)
    assert [again.plan_at(k).paths for k in (1, 2)] == [schedule.plan_at(k).paths for k in (1, 2)]


@pytest.mark.parametrize("fraction, count", [(0.0, 0), (0.125, 2), (0.1, 2), (1.0, 16), (0.03, 0)])
def test_full_depth_count(fraction, count):
    assert full_depth_count(16, fraction) == count


def test_full_depth_fraction_outside_the_unit_interval_is_refused():
    with pytest.raises(ConfigError, match=r"outside \[0, 1\]"):
        full_depth_count(16, 1.5)
    with pytest.raises(ConfigError, match="full_fraction"):
        load_config(ROOT / "configs/train/debug.yaml", ["schedule.full_fraction=2"])
    with pytest.raises(ConfigError, match="layerdrop replaces"):
        load_config(ROOT / "configs/train/debug.yaml", ["schedule.layerdrop=0.25", "schedule.skip_ratio=0.25"])


def test_a_rotation_keeps_placement_validity_and_time_and_adds_stage_sets(problem):
    base = solve(problem, "skippipe")
    plans = rotation(problem, base, 4)
    assert plans[0] is base and len(plans) > 1
    assert len({tuple(sorted((p.microbatch, p.stages) for p in plan.paths)) for plan in plans}) == len(plans)
    for plan in plans:
        assert plan.placement() == base.placement()
        assert violations(plan) == []  # CC1-CC4, TC1, TC2
        assert plan.predicted["iteration_s"] <= base.predicted["iteration_s"] * (1 + TOLERANCE)
    assert distinct_stage_sets(plans) > distinct_stage_sets([base])
    assert [p.paths for p in rotation(problem, base, 4)] == [p.paths for p in plans]  # deterministic
    strict = rotation(problem, base, 4, tolerance=-1.0)  # nothing is faster than -100%: the plan alone
    assert strict == [base]
