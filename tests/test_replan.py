"""Re-planning while training: a switch mid-run, distributed (tier 2: gloo, spawned ranks) against the
path-faithful single process with the same plan sequence, and the real re-plan hook on synthetic timelines."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from scheduler.constraints import violations
from scheduler.problem import Problem
from scheduler.solve import solve
from skippipe.checkpoint import checkpoint_meta, latest_checkpoint
from skippipe.metrics import read_metrics
from skippipe.replan import Replanner
from skippipe.trainer import train
from tests.spawn import spawn_ranks
from tests.test_drift import changed, emulated_problem, emulated_topology, timelines_on
from tests.test_runtime import WORLD, make_config
from topology.load import load_topology
from topology.model_spec import load_model_spec
from topology.plan import Plan

STEPS = 3
SWITCH_AFTER = 1


class Scripted:
    """A re-plan hook that switches to `plan` after step `at` (what the drift detector decides, scripted)."""

    def __init__(self, at: int, plan: Plan):
        self.at, self.plan, self.steps = at, plan, 0

    def observe(self, record: dict) -> str | None:
        return "scripted" if record["step"] == self.at else None

    def propose(self, plan: Plan, *, reason: str, step: int):
        assert self.plan.placement() == plan.placement()
        return self.plan, {"note": "scripted"}

    def took_force(self, switched: bool) -> None:
        pass


def two_plans(cfg) -> tuple[Plan, Plan]:
    """A SkipPipe plan, and one re-solved with its placement for a network where its busiest link is slow."""
    topo, spec = load_topology("gcp-12-regions", WORLD, 0), load_model_spec(cfg.model)
    fields = dict(model=spec, microbatch_size=4, num_stages=4, num_microbatches=6, memory=3, skip_ratio=0.25)
    first = solve(Problem(topo, **fields), "skippipe")
    busiest = Counter((n, m) for p in first.paths for n, m in zip(p.nodes, p.nodes[1:])).most_common(1)[0][0]
    second = solve(Problem(changed(topo, link=busiest, factor=0.01), fixed_placement=first.placement(), **fields),
                   "skippipe")
    return first, second


def _rank(rank: int, init_file: str, first: dict, second: dict, cfg, out: str) -> None:
    from skippipe.context import build_context, init_process_group
    torch.set_num_threads(1)
    init_process_group(torch.device("cpu"), timeout_s=60, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    plan = Plan.from_dict(first)
    ctx = build_context(plan, torch.device("cpu"), 60)
    records = train(cfg, plan, ctx, replanner=Scripted(SWITCH_AFTER, Plan.from_dict(second)))
    torch.save({"records": records}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def switched_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replan")
    cfg = make_config(tmp, "dist", steps=STEPS, checkpoint_every=SWITCH_AFTER)
    first, second = two_plans(cfg)
    (tmp / "out").mkdir()
    codes = spawn_ranks(_rank, lambda r: (r, str(tmp / "init"), first.to_dict(), second.to_dict(), cfg,
                                          str(tmp / "out")), WORLD, 150)
    assert codes == [0] * WORLD, f"exit codes {codes}"
    return tmp, cfg, first, second


def test_the_two_plans_differ_only_in_paths_and_order(switched_runs):
    _, _, first, second = switched_runs
    assert first.placement() == second.placement()
    assert violations(first) == [] and violations(second) == []
    assert [p.nodes for p in first.paths] != [p.nodes for p in second.paths]


def test_switch_mid_run_equals_path_faithful_with_the_same_plan_sequence(switched_runs):
    tmp, cfg, first, second = switched_runs
    single = train(make_config(tmp, "single", steps=STEPS), first, replanner=Scripted(SWITCH_AFTER, second))
    assert [r["plan_version"] for r in single] == [0, 1, 1]
    for rank in range(WORLD):
        records = torch.load(tmp / "out" / f"rank{rank}.pt", weights_only=False)["records"]
        assert [r["plan_version"] for r in records] == [0, 1, 1]
        assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in single], rel=1e-5)
        assert records[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)
    # and the run without the switch differs after it: the second plan really ran
    static = train(make_config(tmp, "static", steps=STEPS), first)
    assert static[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-6)
    assert static[-1]["loss"] != pytest.approx(single[-1]["loss"], rel=1e-6)


def test_switch_is_recorded_in_metrics_log_and_checkpoint(switched_runs):
    tmp, cfg, first, second = switched_runs
    run_dir = Path(cfg.train.run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["plan_version"] for r in rows] == [0, 1, 1]
    assert rows[0]["replan"]["reason"] == "scripted" and rows[0]["replan"]["switched"]
    assert rows[0]["replan"]["from_step"] == SWITCH_AFTER + 1
    assert Plan.load(run_dir / "replans" / "plan.v1.json").to_dict() == second.to_dict()
    folder = latest_checkpoint(run_dir)
    assert checkpoint_meta(folder)["plan_version"] == 1
    assert Plan.load(folder / "plan.json").to_dict() == second.to_dict()  # the plan in force
    first_ckpt = folder.parent / f"step_{SWITCH_AFTER:06d}"
    assert checkpoint_meta(first_ckpt)["plan_version"] == 1  # saved after the switch: step 2 runs plan v1


def test_resume_keeps_the_plan_version(switched_runs, tmp_path):
    tmp, cfg, first, second = switched_runs
    single_cfg = make_config(tmp, "single_resume", steps=2, checkpoint_every=1)
    train(single_cfg, first, replanner=Scripted(SWITCH_AFTER, second))
    single_cfg.train.steps = 3
    plan = Plan.load(latest_checkpoint(single_cfg.train.run_dir) / "plan.json")
    records = train(single_cfg, plan, resume=True)
    assert [r["plan_version"] for r in records] == [1]


def test_replanner_on_synthetic_timelines_switches_to_a_faster_plan_with_the_same_placement(tmp_path):
    """The real hook: drift on a link cut to a quarter, re-estimate from the timelines, re-solve."""
    prior = emulated_topology()
    problem = emulated_problem(prior)
    plan = solve(problem, "skippipe")
    busiest = Counter((n, m) for p in plan.paths for n, m in zip(p.nodes, p.nodes[1:])).most_common(1)[0][0]
    truth = changed(prior, link=busiest, factor=0.25)
    cfg = make_config(tmp_path, "hook")
    cfg.model = "llama-tiny-fp32"
    cfg.schedule.replan.enabled = True
    cfg.schedule.strategy, cfg.schedule.skip_ratio, cfg.schedule.memory = "skippipe", 0.25, 3
    hook = Replanner(cfg, prior, tmp_path)
    before = timelines_on(plan, prior, problem)
    after = timelines_on(plan, truth, problem)
    fired = None
    for step in range(1, 12):
        timeline = before if step <= 5 else after
        span = max(end for rows in timeline for _, _, end in rows)
        fired = hook.observe({"step": step, "iteration_s": span, "timeline": timeline})
        if fired:
            break
    assert fired is not None and step == 5 + cfg.schedule.replan.patience
    new, info = hook.propose(plan, reason=fired, step=step)
    assert new is not None and new.placement() == plan.placement() and violations(new) == []
    assert info["new_plan_predicted_s"] < info["current_plan_predicted_s"]
    estimate = load_topology(info["estimate"])
    a, b = busiest
    assert estimate.bandwidth_gbit_s[a, b] == pytest.approx(truth.bandwidth_gbit_s[a, b], rel=0.1)
    hook.took_force(True)
    assert hook.remaining == cfg.schedule.replan.max_replans - 1


def test_replan_on_a_topology_of_another_size_is_refused(tmp_path):
    from topology.errors import ConfigError
    cfg = make_config(tmp_path, "wrong", steps=1)
    first, _ = two_plans(cfg)
    cfg.schedule.replan.enabled = True
    cfg.schedule.topology, cfg.schedule.num_nodes = "gcp-12-regions", 8  # the plan has 6 nodes
    with pytest.raises(ConfigError, match="schedule.replan"):
        train(cfg, first)
