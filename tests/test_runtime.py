"""Tier 2: the distributed runtime (gloo, CPU, spawned processes) against the path-faithful reference.

For hand-written plans with skips, reordering and several replicas per stage, and for a solver plan, the
distributed loss and every parameter's gradient equal the single-process path-faithful run's; with skip
ratio 0 both equal a plain model trained the ordinary way. A peer that hangs or dies ends the run with an
error within the configured timeout.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from scheduler.constraints import violations
from topology.plan import Plan
from skippipe.config import Config
from skippipe.data import load_corpus
from skippipe.model import FullModel
from skippipe.trainer import data_streams, draw_batches, train
from tests.handplan import hand_plan
from tests.spawn import spawn_ranks

TINY = "name: test-tiny\ndim: 32\nnum_layers: 4\nnum_heads: 2\nnum_kv_heads: 1\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n"
STEPS = 2

# 6 nodes, 4 stages, skip ratio 0.25: every path visits 3 stages; stages 0 and 2 have two replicas;
# microbatches 1 and 3 go back one stage (CC3 swaps). Node 2 runs F2@1 before F0@1 although node 0
# sends them the other way round, so an early message must be parked until its action runs.
SKIP = dict(stages="0 0 1 2 3 2",
            paths=["0@0 1@2 2@3", "0@1 2@5 1@2", "0@0 1@2 3@4", "0@1 3@4 2@3", "0@0 2@5 3@4", "0@1 1@2 3@4"],
            order={0: "F0@0 F2@0 F4@0 L0@0 L2@0 B0@0 B2@0 L4@0 B4@0",
                   1: "F1@0 F3@0 F5@0 L3@0 B3@0 L1@0 B1@0 L5@0 B5@0",
                   2: "F2@1 F0@1 F5@1 B2@1 F1@1 B0@1 B1@1 B5@1",
                   3: "F0@2 F3@2 B3@2 B0@2",
                   4: "F3@3 F2@3 F5@3 B2@3 F4@3 B3@3 B5@3 B4@3",
                   5: "F1@2 F4@2 B1@2 B4@2"},
            skip_ratio=0.25)
# Skip ratio 0: a full pipeline over replicas 2, 2, 1, 1.
FULL = dict(stages="0 0 1 1 2 3",
            paths=["0@0 1@2 2@4 3@5", "0@1 1@3 2@4 3@5", "0@0 1@3 2@4 3@5", "0@1 1@2 2@4 3@5"],
            order={0: "F0@0 F2@0 L0@0 B0@0 L2@0 B2@0", 1: "F1@0 F3@0 L1@0 B1@0 L3@0 B3@0",
                   2: "F0@1 F3@1 B0@1 B3@1", 3: "F1@1 F2@1 B1@1 B2@1",
                   4: "F0@2 F1@2 F2@2 B0@2 F3@2 B1@2 B2@2 B3@2", 5: "F0@3 F1@3 F2@3 B0@3 F3@3 B1@3 B2@3 B3@3"})
WORLD = 6


@pytest.fixture(autouse=True)
def _restore_threads():
    """One thread while these tests run (tiny models; a busy 2-core machine), the old count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_ranks(plan: Plan, ranks: list[int]) -> Plan:
    """Rank r need not play node r: the plan maps ranks to nodes."""
    plan.nodes = [dataclasses.replace(node, rank=rank) for node, rank in zip(plan.nodes, ranks)]
    return plan


def make_config(tmp: Path, name: str, **train) -> Config:
    model = tmp / "tiny.yaml"
    model.write_text(TINY)
    cfg = Config(model=str(model))
    cfg.data.context = 16
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.decay_steps = 1, 1e-2, 4  # fixed: resumed runs compare
    cfg.train.steps, cfg.train.eval_batches, cfg.train.run_dir = STEPS, 2, str(tmp / name)
    cfg.train.comm_timeout_s, cfg.train.num_threads = 60, 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def grad_collector(into: dict):
    def collect(step: int, stages: dict) -> None:
        for s, module in stages.items():
            for name, p in module.named_parameters():
                into[(step, f"stages.{s}.{name}")] = p.grad.detach().clone()
    return collect


def _misbehave(how: str, collect):
    """Rank 1's gradient hook: after step 1's backward, go silent or die mid-run."""
    def hook(step: int, stages: dict) -> None:
        collect(step, stages)
        if how == "die":
            os._exit(3)
        time.sleep(120)  # "hang": alive and connected, but silent
    return hook


def _spawned(rank: int, world: int, init_file: str, jobs: list, out: str, misbehave: str | None = None) -> None:
    """One rank: join the group, then run each (name, plan dict, config[, resume]) job; save what it saw."""
    from skippipe.comm import PeerError
    from skippipe.context import build_context, init_process_group
    torch.set_num_threads(1)
    init_process_group(torch.device("cpu"), timeout_s=jobs[0][2].train.comm_timeout_s, init_method=f"file://{init_file}",
                       rank=rank, world_size=world)
    for name, plan_dict, cfg, *resume in jobs:
        plan = Plan.from_dict(plan_dict)
        ctx = build_context(plan, torch.device("cpu"), cfg.train.comm_timeout_s)
        grads: dict = {}
        hook = grad_collector(grads)
        if misbehave and rank == 1:
            hook = _misbehave(misbehave, hook)
        started = time.monotonic()
        try:
            records = train(cfg, plan, ctx, resume=bool(resume and resume[0]), on_gradients=hook)
            torch.save({"records": records, "grads": grads}, Path(out) / f"{name}_{rank}.pt")
        except PeerError as exc:
            torch.save({"error": str(exc), "after_s": time.monotonic() - started}, Path(out) / f"{name}_{rank}.pt")
            os._exit(0)  # leave at once: tearing down a group with a dead peer could wait
    torch.distributed.destroy_process_group()


def run_ranks(tmp: Path, world: int, jobs: list, misbehave: str | None = None, timeout: float = 150) -> list:
    """Start `world` spawned processes; return the exit codes (the results are files in tmp/out).

    With `misbehave`, only rank 0 is waited for; the misbehaving rank is then killed.
    """
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    return spawn_ranks(_spawned, lambda r: (r, world, str(tmp / "init"), jobs, str(out), misbehave), world,
                       timeout, wait_for=[0] if misbehave else None)


def at_most_two_replicas(plan: Plan) -> bool:
    """Where every stage has at most two replicas the all-reduce's sum is a + b, exact in either order, and the
    path-faithful mode equals the distributed run bit for bit (Note [one process, every node], executors.py)."""
    return all(len(plan.stage_nodes(s)) <= 2 for s in range(plan.num_stages))


def assert_same(dist_grads: dict, single_grads: dict, rank: int, *, exact: bool) -> None:
    assert dist_grads, f"rank {rank} collected no gradients"
    for key, grad in dist_grads.items():
        if exact:
            assert torch.equal(grad, single_grads[key]), f"rank {rank} {key}: not bit for bit equal"
        else:
            torch.testing.assert_close(grad, single_grads[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {key}: {m}")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """One spawn of 6 ranks runs every plan, so the processes start once."""
    tmp = tmp_path_factory.mktemp("runtime")
    skip = with_ranks(hand_plan(**SKIP), [5, 4, 0, 2, 1, 3])  # rank 0 plays node 2 (stage 1)
    full = hand_plan(**FULL)
    plans = {"skip": skip, "full": full}
    from scheduler.problem import Problem
    from scheduler.solve import solve
    from topology.load import load_topology
    from topology.model_spec import load_model_spec
    cfg = make_config(tmp, "probe")
    topo, spec = load_topology("gcp-12-regions", WORLD, 0), load_model_spec(cfg.model)
    # The solvers' plans: the full pipeline's placement, and SkipPipe's skips and swaps chosen for the network.
    plans["full-solver"] = solve(Problem(topo, spec, microbatch_size=4, num_stages=3, num_microbatches=4, memory=3),
                                 "full")
    plans["skippipe"] = solve(Problem(topo, spec, microbatch_size=4, num_stages=4, num_microbatches=6, memory=3,
                                      skip_ratio=0.25), "skippipe")
    for name, plan in plans.items():
        assert violations(plan) == [], name
    jobs = [(name, plan.to_dict(), make_config(tmp, f"dist_{name}")) for name, plan in plans.items()]
    jobs.append(("skip-bf16", skip.to_dict(), make_config(tmp, "dist_skip-bf16", precision="bf16")))
    codes = run_ranks(tmp, WORLD, jobs)
    assert codes == [0] * WORLD, f"exit codes {codes}"
    return tmp, plans


@pytest.mark.parametrize("name", ["skip", "full", "skippipe", "full-solver"])
def test_distributed_equals_path_faithful_single_process(distributed_runs, name):
    tmp, plans = distributed_runs
    single_grads: dict = {}
    single = train(make_config(tmp, f"single_{name}"), plans[name], on_gradients=grad_collector(single_grads))
    exact = at_most_two_replicas(plans[name])
    for rank in range(WORLD):
        result = torch.load(tmp / "out" / f"{name}_{rank}.pt", weights_only=False)
        losses = [r["loss"] for r in result["records"]]
        if exact:
            assert losses == [r["loss"] for r in single]
            assert result["records"][-1]["val_loss"] == single[-1]["val_loss"]
        else:
            assert losses == pytest.approx([r["loss"] for r in single], rel=1e-5)
            assert result["records"][-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)
        assert_same(result["grads"], single_grads, rank, exact=exact)
        # Each rank holds exactly one stage: its gradients name only that stage's parameters.
        assert len({key.split(".")[1] for _, key in result["grads"]}) == 1


def test_bf16_distributed_equals_path_faithful_bf16(distributed_runs):
    """bf16 messages on the wire; the single-process mode rounds at stage boundaries the same way and
    accumulates each node's gradient in the node's order, so every step is bit for bit the distributed one."""
    tmp, plans = distributed_runs
    single_grads: dict = {}
    single = train(make_config(tmp, "single_skip-bf16", precision="bf16"), plans["skip"],
                   on_gradients=grad_collector(single_grads))
    fp32 = train(make_config(tmp, "single_skip-fp32", precision="fp32"), plans["skip"])
    assert single[0]["loss"] != fp32[0]["loss"]  # bf16 really computes in bfloat16
    assert single[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=1e-2)
    for rank in range(WORLD):
        result = torch.load(tmp / "out" / f"skip-bf16_{rank}.pt", weights_only=False)
        assert at_most_two_replicas(plans["skip"])
        assert [r["loss"] for r in result["records"]] == [r["loss"] for r in single]
        assert_same(result["grads"], single_grads, rank, exact=True)
        assert all(grad.dtype == torch.float32 for grad in result["grads"].values())  # master gradients


def test_skip_ratio_zero_equals_a_plain_model(distributed_runs):
    """The full-pipeline plan's run against ordinary training: mean loss over microbatches, one backward."""
    tmp, plans = distributed_runs
    plan, cfg = plans["full"], make_config(tmp, "plain")
    from topology.model_spec import load_model_spec
    spec = load_model_spec(cfg.model)
    model = FullModel(spec, plan.num_stages, cfg.train.seed)
    corpus = load_corpus("builtin", context=16, vocab_size=256)
    streams = data_streams(plan, corpus, range(len(plan.nodes)), cfg.train.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": other, "weight_decay": 0}],
                            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    rank0 = torch.load(tmp / "out" / "full_0.pt", weights_only=False)
    for step in range(1, STEPS + 1):
        batches = draw_batches(plan, streams)
        opt.zero_grad()
        loss = torch.stack([FullModel.loss(model(x), y) for x, y in (batches[m] for m in sorted(batches))]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        for key, grad in rank0["grads"].items():
            if key[0] == step:
                torch.testing.assert_close(grad, model.get_parameter(key[1]).grad, rtol=1e-4, atol=1e-6)
        assert rank0["records"][step - 1]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for group in opt.param_groups:
            group["lr"] = rank0["records"][step - 1]["lr"]
        opt.step()


@pytest.mark.parametrize("how", ["hang", "die"])
def test_a_silent_or_dead_peer_ends_the_run_with_an_error(tmp_path, how):
    plan = hand_plan("0 1", ["0@0 1@1", "0@0 1@1"])
    cfg = make_config(tmp_path, how, comm_timeout_s=3, steps=3)
    codes = run_ranks(tmp_path, 2, [(how, plan.to_dict(), cfg)], misbehave=how, timeout=60)
    assert codes[0] == 0, f"rank 0 did not end cleanly: exit code {codes[0]}"
    result = torch.load(tmp_path / "out" / f"{how}_0.pt", weights_only=False)
    assert "error" in result, "rank 0 finished although its peer stopped after step 1"
    assert result["after_s"] < 20, f"the error took {result['after_s']:.0f} s with a 3 s timeout"
    assert "died or hung" in result["error"]


def test_each_stage_gradient_is_the_mean_over_the_microbatches_that_visited_it(tmp_path):
    """Note [gradient scaling], checked against per-microbatch gradients computed one at a time."""
    plan, cfg = hand_plan(**SKIP), make_config(tmp_path, "scaling", steps=1)
    cfg.optim.grad_clip = 0  # compare before any clipping
    got: dict = {}
    train(cfg, plan, on_gradients=grad_collector(got))
    from topology.model_spec import load_model_spec
    model = FullModel(load_model_spec(cfg.model), plan.num_stages, cfg.train.seed)
    batches = draw_batches(plan, data_streams(plan, load_corpus("builtin", context=16, vocab_size=256),
                                              range(len(plan.nodes)), cfg.train.seed))
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    visitors = {s: sum(s in path.stages for path in plan.paths) for s in range(plan.num_stages)}
    assert visitors == {0: 6, 1: 4, 2: 4, 3: 4}
    for path in plan.paths:
        model.zero_grad()
        x, y = batches[path.microbatch]
        FullModel.loss(model.forward_path(x, path.stages), y).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                expected[name] += p.grad / visitors[int(name.split(".")[1])]
    for name, grad in expected.items():
        torch.testing.assert_close(got[(1, name)], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_a_stage_no_microbatch_visits_takes_no_optimizer_step(tmp_path):
    """Note [idle stages]: step 2 runs every microbatch on the even half (0, 2); stages 1 and 3 keep their
    weights through it (AdamW's weight decay and moments would move them on a zero gradient)."""
    from skippipe.config import load_config
    from skippipe.path_schedule import plan_schedule
    from skippipe.planning import make_plan
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/train/debug.yaml",
                      ["schedule.skip_ratio=0.25", "schedule.shallow_every=2", "schedule.shallow_sets=even",
                       "train.steps=3", f"train.run_dir={tmp_path / 'idle'}"])
    plan = make_plan(cfg)
    idle = set(range(4)) - {s for path in plan_schedule(cfg, plan).plan_at(2).paths for s in path.stages}
    assert idle == {1, 3}
    weights: dict = {}  # step -> stage -> its parameters before that step's optimizer step

    def snapshot(step: int, stages: dict) -> None:
        weights[step] = {s: [p.detach().clone() for p in m.parameters()] for s, m in stages.items()}
    train(cfg, plan, on_gradients=snapshot)
    for stage in range(4):
        moved = any(not torch.equal(a, b) for a, b in zip(weights[2][stage], weights[3][stage]))
        assert moved == (stage not in idle), stage


def test_path_faithful_mode_refuses_an_order_that_cannot_finish(tmp_path):
    """Node 0 would run its loss before the forward that feeds it: one line naming where each node waits."""
    from skippipe.executors import LocalExecutor
    from topology.model_spec import load_model_spec
    plan = hand_plan("0 1", ["0@0 1@1"], order={0: "L0@0 F0@0 B0@0", 1: "F0@1 B0@1"})
    executor = LocalExecutor(torch.device("cpu"))
    executor.build(plan, load_model_spec(make_config(tmp_path, "x").model), seed=0, context=16)
    tokens = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"cannot finish: nodes wait on each other at \{0: 'L0@0', 1: 'F0@1'\}"):
        executor.run_iteration({0: (tokens, tokens)})
