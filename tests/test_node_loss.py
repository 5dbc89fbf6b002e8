"""Surviving node loss (Note [node loss] in skippipe/elastic.py).

Pure: stage sizes for the survivors, node identities, the re-plan (every stage kept, shape kept, ranks by
name), the resume decision, and the checkpoint carried over to a new plan, which a resumed run then loads
(weights bit-equal, data positions continued or re-cut). One elastic run on localhost: four torchrun
agents, one killed mid-run; the job finishes on three with the loss continuous.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scheduler.constraints import check
from skippipe import elastic
from skippipe.checkpoint import latest_checkpoint
from skippipe.config import load_config
from skippipe.elastic import (Shape, World, assign_ranks, check_identities, decide_resume,
                              plan_for_world, replan, resolve_names, survivor_stage_sizes)
from skippipe.planning import make_plan
from skippipe.trainer import train
from topology.errors import ConfigError
from topology.load import load_topology
from topology.plan import Plan

TINY = "name: test-tiny\ndim: 32\nnum_layers: 4\nnum_heads: 2\nnum_kv_heads: 1\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n"
EMULATED = "configs/topologies/emulated-8.yaml"


@pytest.mark.parametrize("sizes, nodes, expected", [
    ([2, 2, 2, 2], 8, [2, 2, 2, 2]),
    ([2, 2, 2, 2], 7, [2, 2, 2, 1]),  # the highest of the largest non-zero stages gives a node
    ([2, 2, 2, 2], 5, [2, 1, 1, 1]),  # stage 0 (the data nodes) keeps its size while it can
    ([2, 2, 2, 2], 4, [1, 1, 1, 1]),
    ([3, 2, 2, 1], 7, [3, 2, 1, 1]),
    ([2, 1, 1], 3, [1, 1, 1]),
    ([2, 2, 2, 1], 8, [2, 2, 2, 2]),  # a node (re)joins: the smallest stage grows
    ([1, 1, 1, 1], 6, [2, 2, 1, 1]),
])
def test_survivor_stage_sizes(sizes, nodes, expected):
    assert survivor_stage_sizes(sizes, nodes) == expected


def test_fewer_nodes_than_stages_is_an_error():
    with pytest.raises(ConfigError, match="3 node.* left for 4 stages"):
        survivor_stage_sizes([2, 2, 2, 2], 3)


def test_identities():
    topo = load_topology(EMULATED)
    assert check_identities([None, None]) is None
    assert resolve_names(["us1", "0", "asia1"], topo) == ["us1", "eu0", "asia1"]
    with pytest.raises(ConfigError, match="not on rank"):
        check_identities(["eu0", None])
    with pytest.raises(ConfigError, match="eu0 is set on 2 ranks"):
        check_identities(["eu0", "eu0"])
    with pytest.raises(ConfigError, match="names no node"):
        resolve_names(["mars0"], topo)
    with pytest.raises(ConfigError, match="same node"):
        resolve_names(["eu0", "0"], topo)


def _cfg(tmp_path: Path, overrides=()):
    model = tmp_path / "tiny.yaml"
    model.write_text(TINY)
    return load_config("configs/train/debug.yaml", [
        f"model={model}", "data.context=16", f"schedule.topology={EMULATED}", "schedule.stage_sizes=[3,2,2,1]",
        "schedule.skip_ratio=0.25", "schedule.num_microbatches=8", f"train.run_dir={tmp_path / 'run'}",
        "train.steps=3", "train.checkpoint_every=2", "train.eval_every=0", "optim.warmup_steps=1", *overrides])


def test_replan_keeps_every_stage_and_the_shape(tmp_path):
    cfg = _cfg(tmp_path)
    full = make_plan(cfg)
    sole = next(n for n in full.nodes if n.stage == 3)  # stage 3's only replica
    live = [n.name for n in full.nodes if n.name != sole.name]
    random.Random(0).shuffle(live)  # torchrun re-ranks the survivors however it likes
    plan = replan(load_topology(EMULATED), live, Shape.of_plan(full), cfg)
    check(plan, world_size=7)
    assert [len(plan.stage_nodes(s)) for s in range(4)] == [3, 2, 1, 1]
    assert plan.num_stages == full.num_stages and plan.skip_ratio == full.skip_ratio
    assert plan.num_microbatches == full.num_microbatches and plan.microbatch_size == full.microbatch_size
    assert {n.name: n.rank for n in plan.nodes} == {name: rank for rank, name in enumerate(live)}
    # The same survivors in another rank order: the same placement and paths.
    again = replan(load_topology(EMULATED), sorted(live), Shape.of_plan(full), cfg)
    assert {n.name: n.stage for n in again.nodes} == {n.name: n.stage for n in plan.nodes}
    assert again.paths == plan.paths


def test_assign_ranks_refuses_other_nodes(tmp_path):
    plan = make_plan(_cfg(tmp_path))
    with pytest.raises(ConfigError, match="not the plan's"):
        assign_ranks(plan, [n.name for n in plan.nodes][:-1])


def test_decide_resume(tmp_path):
    run = tmp_path / "run"
    assert decide_resume(run, explicit=True, run_id=None)
    assert not decide_resume(run, explicit=False, run_id=None)
    assert not decide_resume(run, explicit=False, run_id="job1")  # a new job: starts, records the run dir
    assert not decide_resume(run, explicit=False, run_id="job1")  # restarted before its first checkpoint
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000002\n")
    assert decide_resume(run, explicit=False, run_id="job1")  # restarted after saving one
    # Another job in an old run dir is refused (Note [run dir ownership], rundir.py), unless it overwrites.
    with pytest.raises(ConfigError, match="holds a run up to step 2; pass --resume to continue it"):
        decide_resume(run, explicit=False, run_id="job2")
    assert not decide_resume(run, explicit=False, run_id="job2", overwrite=True)  # the old run's files go
    assert not (run / "checkpoints").exists()
    assert not decide_resume(run, explicit=False, run_id="job2")  # restarted before its first checkpoint


def _save_single(cfg, plan: Plan) -> Path:
    """Train the plan in the path-faithful mode up to the first checkpoint (step 2)."""
    train(cfg, plan)
    return latest_checkpoint(cfg.train.run_dir)


@pytest.mark.parametrize("lost_stage", [3, 0])
def test_carried_over_checkpoint_resumes(tmp_path, lost_stage):
    """Lose a node; the carried-over checkpoint has every stage's weights bit-equal, data continued per shard
    (a stage-3 node lost: 3 data nodes stay) or re-cut (stage-0 nodes lost below 3), and a resumed run loads it."""
    cfg = _cfg(tmp_path, ["train.steps=2"] if lost_stage == 3 else ["train.steps=2", "schedule.stage_sizes=[4,2,1,1]"])
    full = make_plan(cfg)
    folder = _save_single(cfg, full)
    lost = [n.name for n in full.nodes if n.stage == lost_stage][:1 if lost_stage == 3 else 2]
    live = [n.name for n in full.nodes if n.name not in lost]
    world = World(rank=0, world_size=len(live), identities=live, emulated=None)
    logged = []
    plan = plan_for_world(cfg, world, resume=True, make_plan=make_plan, log=logged.append)
    check(plan, world_size=len(live))
    new = latest_checkpoint(cfg.train.run_dir)
    assert new.name == "step_000002-replan1" and "node loss" in logged[0]
    meta = json.loads((new / "meta.json").read_text())
    assert meta["lost"] == sorted(lost) and meta["step"] == 2
    assert meta["data_shards"] == ("continued" if lost_stage == 3 else "re-cut")
    assert Plan.load(new / "plan.json").to_dict() == plan.to_dict()
    for s in range(plan.num_stages):
        old, got = load_file(str(folder / f"stage{s}.safetensors")), load_file(str(new / f"stage{s}.safetensors"))
        assert old.keys() == got.keys() and all(torch.equal(old[k], got[k]) for k in old)
    data = {int(p.stem[4:]): torch.load(p, weights_only=True) for p in new.glob("data*.pt")}
    assert sorted(data) == sorted(plan.stage_nodes(0))
    assert [data[n]["shard_index"] for n in sorted(data)] == list(range(len(data)))
    if lost_stage == 3:  # shard i goes on where it stopped, now on the i-th data node
        old_data = {torch.load(p, weights_only=True)["shard_index"]: torch.load(p, weights_only=True)
                    for p in folder.glob("data*.pt")}
        for node, state in data.items():
            assert torch.equal(state["generator"], old_data[state["shard_index"]]["generator"])
    # The resumed run (path-faithful mode, the new plan) loads it and trains on from step 3.
    cfg.train.steps = 3
    records = train(cfg, plan, resume=True)
    assert [r["step"] for r in records] == [3] and records[0]["loss"] == pytest.approx(5.5, abs=0.5)


def test_plan_for_world_without_names_is_the_plain_plan(tmp_path):
    cfg = _cfg(tmp_path)
    plan = plan_for_world(cfg, World(0, 8, None, None), resume=False, make_plan=make_plan)
    assert plan.to_dict() == make_plan(cfg).to_dict()


def test_plan_for_world_fresh_on_fewer_nodes(tmp_path):
    """A node lost before the first checkpoint: the survivors start afresh on a plan of their own."""
    cfg = _cfg(tmp_path)
    names = [n.name for n in load_topology(EMULATED).nodes][:-1]
    plan = plan_for_world(cfg, World(0, 7, names, None), resume=False, make_plan=make_plan, log=lambda text: None)
    check(plan, world_size=7)
    assert sorted(n.name for n in plan.nodes) == sorted(names)


def test_plan_for_world_when_a_node_joins(tmp_path):
    """A node (re)joins after a loss: the same path re-plans, the smallest stage grows."""
    cfg = _cfg(tmp_path, ["train.steps=2"])
    full = make_plan(cfg)
    _save_single(cfg, full)
    names = [n.name for n in full.nodes]
    logged = []
    seven = plan_for_world(cfg, World(0, 7, names[:-1], None), resume=True, make_plan=make_plan, log=logged.append)
    eight = plan_for_world(cfg, World(0, 8, names[::-1], None), resume=True, make_plan=make_plan, log=logged.append)
    check(eight, world_size=8)
    assert [len(eight.stage_nodes(s)) for s in range(4)] == [3, 2, 2, 1] != [len(seven.stage_nodes(s)) for s in range(4)]
    assert logged[-2].startswith(f"nodes joined: 7 -> 8 nodes (joined {names[-1]})")
    assert json.loads((latest_checkpoint(cfg.train.run_dir) / "meta.json").read_text())["joined"] == [names[-1]]


def test_emulated_latency_follows_the_node_not_the_rank(tmp_path, monkeypatch):
    """After a loss rank r plays some other node; its sends take that node's link latencies."""
    import skippipe.emulation.latency as latency
    path = tmp_path / "latency.json"
    latency.write_latency_file(path, [[0, 10, 20], [10, 0, 30], [20, 30, 0]])
    monkeypatch.setenv(latency.ENV, str(path))
    monkeypatch.setenv(latency.NODE_ENV, "2")
    # node 1 is gone: rank 1 is node 2
    assert latency.link_latency_from_env(1, [0, 2]).latency_s_to == {0: 0.020}
    # without the mapping, rank 1 in node 2's namespace is refused
    with pytest.raises(RuntimeError, match="rank 1 runs in emulated node 2"):
        latency.link_latency_from_env(1, None)


@pytest.mark.slow
def test_elastic_run_survives_a_killed_node(tmp_path):
    """Four torchrun agents on localhost (c10d, --nnodes 3:4); the sole replica of a stage is killed
    mid-run; the job completes every step on three nodes, the lost stage taken over, the loss continuous."""
    from skippipe.emulation.chaos import ChaosSettings, run_chaos
    model = tmp_path / "tiny.yaml"
    model.write_text(TINY)
    settings = ChaosSettings(
        topology="single-cluster", num_nodes=4, config="configs/train/debug.yaml", steps=14, checkpoint_every=4,
        kill_after_step=9, bandwidth_scale=1.0, max_restarts=2, timeout_s=240,
        overrides=[f"model={model}", "data.context=16", "schedule.num_nodes=4", "schedule.num_stages=3",
                   "schedule.stage_sizes=null", "train.comm_timeout_s=20", "train.eval_every=0",
                   "optim.warmup_steps=2"])
    report = run_chaos(settings, tmp_path / "chaos", namespaces=False)
    assert report["completed"] and report["steps_completed"] == 14, report["log_lines"]
    assert (report["nodes_before"], report["nodes_after"]) == (4, 3)
    # Steps take milliseconds here, so the kill lands a step or two after step 9: resumed from the last
    # checkpoint before it (or the one before, if the kill hit its save), never redoing more than an interval.
    killed = report["killed_during_step"]
    assert killed >= 10 and report["resumed_after_step"] in ((killed - 1) // 4 * 4, (killed - 2) // 4 * 4)
    assert report["steps_redone"] == killed - 1 - report["resumed_after_step"] <= 4
    assert report["replicas_of_that_stage_before"] == 1 and len(report["taken_over_by"]) == 1
    assert report["microbatches_after"] == report["microbatches_before"]
    assert report["loss_continuity"]["continuous"], report["loss_continuity"]
    assert any(line.startswith("node loss: 4 -> 3 nodes") for line in report["log_lines"])
