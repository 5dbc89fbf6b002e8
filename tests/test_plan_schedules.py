"""Per-step plan schedules (skippipe/path_schedule.py): the full-depth plan one step in K and over a tail,
half-depth steps and their stage sets, rotated plans in turn, LayerDrop's draws, and the settings that
choose them, refused when bad or when a distributed run cannot follow them."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from scheduler.constraints import check
from scheduler.depth import average_iteration_s, step_kind, tail_start
from skippipe.config import load_config
from skippipe.evaluation.omission import kept_stages
from skippipe.path_schedule import PlanSchedule, layerdrop_keep_prob, plan_schedule
from skippipe.planning import make_plan
from topology.errors import ConfigError
from topology.plan import Plan, Route

ROOT = Path(__file__).resolve().parent.parent


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
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    assert schedule.varies and schedule.full_from == 7
    got = [schedule.plan_at(s) for s in range(1, 9)]
    assert [p is plan for p in got] == [True] * 6 + [False] * 2
    assert all(p.stages == tuple(range(cfg.schedule.num_stages)) for s in (7, 8) for p in got[s - 1].paths)
    decayed = load_config(ROOT / "configs/train/debug.yaml", ["schedule.skip_ratio=0.25", "schedule.full_tail=0.25",
                                                             "train.steps=8", "optim.decay_steps=20"])
    assert plan_schedule(decayed, plan).full_from == 16  # the learning-rate schedule's end, not train.steps


def test_shallow_sets_even_trains_the_set_an_even_omission_keeps():
    cfg = load_config(ROOT / "configs/train/omission.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.num_stages=8", "schedule.num_nodes=8",
                       "schedule.shallow_every=4", "schedule.shallow_sets=even"])
    plan = make_plan(cfg)
    schedule = plan_schedule(cfg, plan)
    shallow = schedule.plan_at(3)
    assert schedule.plan_at(1) is plan and schedule.plan_at(7) is shallow
    assert {p.stages for p in shallow.paths} == {tuple(kept_stages(8, 0.5, "even"))}


def test_even_drawn_alternates_the_even_set_and_fresh_draws():
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


def test_rotate_runs_the_plans_in_turn_and_full_every_still_wins():
    cfg = load_config(ROOT / "configs/train/debug.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.rotate=3", "schedule.full_every=4"])
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
def test_bad_schedule_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/train/debug.yaml", overrides)


@pytest.mark.parametrize("setting", ["schedule.full_tail=0.1", "schedule.shallow_every=4", "schedule.rotate=2",
                                     "schedule.depth_spread=1.0", "schedule.spread_even=0.125", "schedule.layerdrop=0.25"])
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
