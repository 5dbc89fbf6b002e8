"""Full-depth work in a skipping plan (scheduler/depth.py), plans rotated across iterations
(scheduler/rotation.py) and the per-step plan schedules (skippipe/path_schedule.py): valid plans,
predicted costs, LayerDrop's expected depth."""
from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from pathlib import Path

import pytest

from scheduler.constraints import check, violations
from scheduler.depth import (all_full_depth, average_iteration_s, even_depth, even_stages, full_depth_count,
                             mix_full_depth, shallow_depth, spread_depth, step_rng, step_kind, tail_start)
from scheduler.problem import Problem
from scheduler.rotation import TOLERANCE, distinct_stage_sets, rotation
from scheduler.solve import solve
from skippipe.config import load_config
from skippipe.path_schedule import PlanSchedule, layerdrop_keep_prob, plan_schedule
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


def test_step_kind_puts_shallow_steps_clear_of_full_ones():
    kinds = [step_kind(k, full_every=10, shallow_every=4) for k in range(1, 21)]
    assert [k for k, kind in enumerate(kinds, 1) if kind == "full"] == [10, 20]
    assert [k for k, kind in enumerate(kinds, 1) if kind == "shallow"] == [3, 7, 11, 15, 19]
    assert step_kind(12, full_every=4, shallow_every=2) == "full"  # full wins where both fall
    assert {step_kind(k) for k in range(1, 9)} == {"base"}


def test_a_full_depth_tail_covers_the_last_steps_of_the_schedule():
    assert tail_start(700, 0.1) == 631 and tail_start(700, 0.0) is None and tail_start(5, 0.1) == 5  # 0.5 steps round up to the last
    assert tail_start(4, 0.1) is None  # 0.4 steps round to none
    kinds = [step_kind(k, full_every=10, shallow_every=4, full_from=15) for k in range(1, 21)]
    assert [k for k, kind in enumerate(kinds, 1) if kind == "full"] == [10, 15, 16, 17, 18, 19, 20]
    assert [k for k, kind in enumerate(kinds, 1) if kind == "shallow"] == [3, 7, 11]
    assert average_iteration_s({"base": 10.0, "full": 20.0}, full_every=4, full_tail=0.1) == \
        pytest.approx(0.9 * 12.5 + 0.1 * 20.0)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="schedule.full_tail=0.1"):
            tail_start(100, bad)


def test_full_tail_runs_the_full_depth_plan_over_the_end_of_the_learning_rate_schedule():
    cfg = load_config(ROOT / "configs/train/debug.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.full_tail=0.25", "train.steps=8", "optim.decay_steps=null"])
    from skippipe.planning import make_plan
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    assert schedule.varies and schedule.full_from == 7
    got = [schedule.plan_at(s) for s in range(1, 9)]
    assert [p is plan for p in got] == [True] * 6 + [False] * 2
    assert all(p.stages == tuple(range(cfg.schedule.num_stages)) for s in (7, 8) for p in got[s - 1].paths)
    decayed = load_config(ROOT / "configs/train/debug.yaml", ["schedule.skip_ratio=0.25", "schedule.full_tail=0.25",
                                                             "train.steps=8", "optim.decay_steps=20"])
    assert plan_schedule(decayed, plan).full_from == 16  # the learning-rate schedule's end, not train.steps


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
    from skippipe.planning import make_plan
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
    from skippipe.planning import make_plan
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


def test_shallow_sets_even_trains_the_set_an_even_omission_keeps():
    from skippipe.evaluation.omission import kept_stages
    from skippipe.planning import make_plan
    cfg = load_config(ROOT / "configs/train/omission.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.num_stages=8", "schedule.num_nodes=8",
                       "schedule.shallow_every=4", "schedule.shallow_sets=even"])
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    shallow = schedule.plan_at(3)
    assert schedule.plan_at(1) is plan and schedule.plan_at(7) is shallow
    assert {p.stages for p in shallow.paths} == {tuple(kept_stages(8, 0.5, "even"))}


def test_even_drawn_alternates_the_even_set_and_fresh_draws():
    from skippipe.planning import make_plan
    cfg = load_config(ROOT / "configs/train/omission.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.num_stages=8", "schedule.num_nodes=8",
                       "schedule.shallow_every=4", "schedule.shallow_sets=even_drawn"])
    schedule = plan_schedule(cfg, make_plan(cfg))
    shallow = [schedule.plan_at(k) for k in (3, 7, 11, 15)]
    assert [p.constraints.get("kept_stages") for p in shallow] == [[0, 2, 4, 6], None, [0, 2, 4, 6], None]
    for drawn in shallow[1::2]:
        check(drawn)
        assert all(len(p.stages) == 4 and list(p.stages) == sorted(p.stages) for p in drawn.paths)
    assert {p.stages for p in shallow[1].paths} != {p.stages for p in shallow[3].paths}


def test_shallow_every_runs_the_shallow_plan_one_step_in_k():
    cfg = load_config(ROOT / "configs/train/debug.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.full_every=4", "schedule.shallow_every=2"])
    from skippipe.planning import make_plan
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    got = [schedule.plan_at(s) for s in range(1, 9)]
    assert schedule.varies and [got[s - 1] is plan for s in range(1, 9)] == [True, False, True, False] * 2
    assert all(len(p.stages) == 2 for s in (2, 6) for p in got[s - 1].paths)  # skip 0.5 of 4 stages
    assert all(len(p.stages) == 4 for s in (4, 8) for p in got[s - 1].paths)  # full wins on step 4 and 8


def test_drawn_shallow_sets_cover_the_shallow_sets_in_order_and_repeat_on_resume():
    overrides = ["schedule.skip_ratio=0.33", "schedule.num_stages=6", "schedule.num_nodes=6", "schedule.max_swaps=0",
                 "schedule.full_every=10", "schedule.shallow_every=4", "schedule.shallow_sets=drawn"]
    cfg = load_config(ROOT / "configs/train/omission.yaml", overrides)
    from skippipe.planning import make_plan
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    shallow_steps = [k for k in range(1, 81) if step_kind(k, full_every=10, shallow_every=4) == "shallow"]
    draws = [schedule.plan_at(k) for k in shallow_steps]
    sets = set()
    for drawn in draws:
        check(drawn)  # CC1-CC4 (balanced stage visits), TC1, TC2
        assert drawn.placement() == plan.placement()
        assert all(len(p.stages) == 3 and list(p.stages) == sorted(p.stages) for p in drawn.paths)
        sets |= {p.stages for p in drawn.paths}
    assert len(sets) == 10  # all C(5, 2) sets of stage 0 and two others, the even (0, 2, 4) among them
    assert len({tuple(p.stages for p in d.paths) for d in draws}) == len(draws)  # a fresh draw each shallow step
    again = plan_schedule(load_config(ROOT / "configs/train/omission.yaml", overrides), plan)
    assert [again.plan_at(k).paths for k in shallow_steps] == [d.paths for d in draws]  # a resumed run draws the same
    assert schedule.plan_at(10).paths == schedule.full.paths and schedule.plan_at(1) is plan


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


def test_layerdrop_keeps_stage_0_natural_order_and_the_expected_depth():
    assert layerdrop_keep_prob(6, 0.33) == pytest.approx(3 / 5)
    nodes = [{"id": i, "name": f"n{i}", "region": "r", "stage": i, "rank": i} for i in range(6)]
    base = Plan.from_dict({"version": 1, "skip_ratio": 0.0, "num_stages": 6, "constraints": {}, "nodes": nodes,
                           "paths": [{"microbatch": m, "data_node": 0, "nodes": list(range(6)), "stages": list(range(6))}
                                     for m in range(16)], "order": {}, "predicted": {}})
    schedule = PlanSchedule(base, keep_prob=layerdrop_keep_prob(6, 0.33), seed=0)
    draws = [schedule.plan_at(step) for step in range(1, 201)]
    paths = [p for plan in draws for p in plan.paths]
    assert all(p.stages[0] == 0 and list(p.stages) == sorted(p.stages) and p.nodes == p.stages for p in paths)
    assert statistics.fmean(len(p.stages) for p in paths) == pytest.approx(4.0, abs=0.05)  # 3200 draws
    assert len({p.stages for p in paths}) > 16
    for plan in draws[:5]:  # each draw's order runs exactly its own paths' actions (the executor follows it)
        assert sorted(a for acts in plan.order.values() for a in acts) == sorted(a for p in plan.paths for a, _ in p.chain())
    assert schedule.plan_at(7).paths == PlanSchedule(base, keep_prob=0.6, seed=0).plan_at(7).paths  # resumable
    assert schedule.plan_at(7).paths != PlanSchedule(base, keep_prob=0.6, seed=1).plan_at(7).paths


def test_full_every_runs_the_full_depth_plan_one_step_in_k():
    cfg = load_config(ROOT / "configs/train/debug.yaml", ["schedule.skip_ratio=0.25", "schedule.full_every=3"])
    from skippipe.planning import make_plan
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    assert schedule.varies
    assert [schedule.plan_at(s) is plan for s in range(1, 7)] == [True, True, False, True, True, False]
    assert all(p.stages == tuple(range(cfg.schedule.num_stages)) for p in schedule.plan_at(3).paths)
    assert not plan_schedule(load_config(ROOT / "configs/train/debug.yaml"), plan).varies


def test_a_route_the_schedule_draws_names_real_nodes():
    nodes = [{"id": i, "name": f"n{i}", "region": "r", "stage": [0, 1, 1, 2][i], "rank": i} for i in range(4)]
    base = Plan.from_dict({"version": 1, "skip_ratio": 0.0, "num_stages": 3, "constraints": {}, "nodes": nodes,
                           "paths": [{"microbatch": 0, "data_node": 0, "nodes": [0, 1, 3], "stages": [0, 1, 2]}],
                           "order": {}, "predicted": {}})
    plan = PlanSchedule(base, keep_prob=1.0).plan_at(1)
    assert plan.paths == [Route(0, 0, (0, 1, 3), (0, 1, 2))]


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


def test_rotate_runs_the_plans_in_turn_and_full_every_still_wins():
    cfg = load_config(ROOT / "configs/train/debug.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.rotate=3", "schedule.full_every=4"])
    from skippipe.planning import make_plan
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    plans = schedule.rotation
    assert schedule.varies and plans[0] is plan and 1 < len(plans) <= 3
    expected = [plans[(s - 1) % len(plans)] for s in range(1, 9)]
    got = [schedule.plan_at(s) for s in range(1, 9)]
    for step in (1, 2, 3, 5, 6, 7):
        assert got[step - 1] is expected[step - 1]
    for step in (4, 8):
        assert all(p.stages == tuple(range(cfg.schedule.num_stages)) for p in got[step - 1].paths)


@pytest.mark.parametrize("overrides, message", [
    (["schedule.rotate=0"], "schedule.rotate must be a positive integer"),
    (["schedule.rotate=true"], "schedule.rotate: expected int"),
    (["schedule.layerdrop=0.25", "schedule.rotate=2"], "layerdrop replaces the plan's paths"),
    (["schedule.layerdrop=0.25", "schedule.shallow_every=4"], "layerdrop replaces the plan's paths"),
    (["schedule.shallow_every=-1"], "schedule.shallow_every must not be negative"),
    (["schedule.skip_ratio=0.5", "schedule.shallow_every=4"], r"shallow_ratio must be above schedule.skip_ratio \(0.5\)"),
    (["schedule.skip_ratio=0.25", "schedule.shallow_sets=drawn"], "set schedule.shallow_every too"),
    (["schedule.skip_ratio=0.25", "schedule.shallow_every=4", "schedule.shallow_sets=evenly"],
     "schedule.shallow_sets must be one of solver, drawn, even, even_drawn, got 'evenly'"),
    (["schedule.full_tail=1"], r"schedule.full_tail must be in \[0, 1\), got 1"),
    (["schedule.full_tail=-0.1"], r"schedule.full_tail must be in \[0, 1\)"),
    (["schedule.layerdrop=0.25", "schedule.full_tail=0.1"], "layerdrop replaces the plan's paths"),
    (["schedule.skip_ratio=0.25", "schedule.depth_spread=1.5"], r"schedule.depth_spread must be in \[0, 1\], got 1.5"),
    (["schedule.skip_ratio=0", "schedule.depth_spread=1.0"], "depth_spread spreads the depths of a skipping plan"),
    (["schedule.skip_ratio=0.25", "schedule.layerdrop=0.25", "schedule.depth_spread=1.0"], "layerdrop replaces the plan's paths"),
    (["schedule.skip_ratio=0.25", "schedule.spread_even=0.75"], r"schedule.spread_even must be in \[0, 0.5\], got 0.75"),
    (["schedule.skip_ratio=0.5", "schedule.spread_even=0.125"],
     r"spread_even trains the even stages of schedule.shallow_ratio's depth: shallow_ratio must be above"),
    (["schedule.skip_ratio=0", "schedule.spread_even=0.125"], "spread_even spreads the depths of a skipping plan"),
    (["schedule.skip_ratio=0.25", "schedule.layerdrop=0.25", "schedule.spread_even=0.125"], "layerdrop replaces the plan's paths"),
])
def test_bad_rotation_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/train/debug.yaml", overrides)


@pytest.mark.parametrize("setting", ["schedule.full_tail=0.1", "schedule.shallow_every=4", "schedule.rotate=2",
                                     "schedule.depth_spread=1.0", "schedule.layerdrop=0.25"])
def test_a_distributed_run_refuses_a_schedule_that_switches_plans_before_the_rendezvous(setting, tmp_path):
    """Every rank refuses at once, from the config alone (rank 0 says why), so no rank is left waiting and
    torchrun does not stop rank 0 before it has printed the reason."""
    import os
    import subprocess
    import sys
    ratio = "0" if "layerdrop" in setting else "0.25"
    for rank, expected in (("0", "error: schedule.full_every, full_tail, shallow_every, rotate, depth_spread, "
                                 "spread_even and layerdrop switch plans between steps, which only the single-process mode supports"),
                           ("3", "")):
        out = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--config", "debug", "--steps", "2",
                              "--run-dir", str(tmp_path / "run"), f"schedule.skip_ratio={ratio}", setting],
                             capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "RANK": rank, "WORLD_SIZE": "8", "LOCAL_RANK": rank})
        assert out.returncode == 2 and len(out.stderr.splitlines()) == (1 if expected else 0)
        assert out.stderr.startswith(expected)  # rank 0's one line; the other ranks leave quietly
        assert not (tmp_path / "run").exists()
