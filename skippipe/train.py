"""The training loop, shared by the distributed run and the path-faithful single-process mode.

One iteration: draw every microbatch on its data node, run the plan (worker.py or single.py), average
each stage's gradient over its visitors and replicas (Note [gradient scaling] in sync.py), clip by the
global norm, one AdamW step. The iteration's loss is the mean over microbatches of each microbatch's
mean token cross entropy. Both modes draw the same data, so their losses and gradients agree.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from scheduler.constraints import check
from scheduler.plan import Plan
from skippipe import single
from skippipe.checkpoint import checkpoint_meta, latest_checkpoint, load_checkpoint, save_checkpoint
from skippipe.comm import all_gather_json, broadcast_json, connect_peers, peer_errors, wait_for
from skippipe.config import Config, load_config, save_config
from skippipe.context import Context, pick_device
from skippipe.data import TokenStream, load_corpus
from skippipe.finite import NonFiniteError, is_finite, nonfinite_microbatches, step_message
from skippipe.identity import check_model, check_tokenizer, checkpoint_identity, recorded_spec
from skippipe.metrics import Metrics
from skippipe.model import FullModel, Stage
from skippipe.optim import build_optimizer, lr_at, set_lr
from skippipe.rundir import check_resume_settings, claim_run_dir
from skippipe.sync import average_stage_gradients, clip_gradients, stage_visits
from skippipe.worker import IterationResult, Worker
from topology.errors import ConfigError
from topology.model_spec import load_model_spec


def make_plan(cfg: Config) -> Plan:
    """The plan file named by the config, or one solved for the configured topology and training shape."""
    if cfg.schedule.plan:
        return Plan.load(cfg.schedule.plan)
    from scheduler.problem import Problem
    from scheduler.solve import solve
    from topology.load import load_topology
    s = cfg.schedule
    problem = Problem(topology=load_topology(s.topology, s.num_nodes, cfg.train.seed), model=load_model_spec(cfg.model),
                      microbatch_size=s.microbatch_size, num_stages=s.num_stages, stage_sizes=s.stage_sizes,
                      num_microbatches=s.num_microbatches, memory=s.memory, skip_ratio=s.skip_ratio,
                      max_swaps=s.max_swaps, seed=cfg.train.seed,
                      topology_source={"spec": s.topology, "seed": cfg.train.seed})
    return solve(problem, s.strategy)


def plan_for_run(cfg: Config, resume: bool) -> Plan:
    """A resumed run keeps the plan of its checkpoint; a new one loads or solves it."""
    return Plan.load(latest_checkpoint(cfg.train.run_dir) / "plan.json") if resume else make_plan(cfg)


def share_plan(make: Callable[[], Plan], rank: int) -> Plan:
    """Rank 0 makes the plan and broadcasts it as JSON; a bad input fails on every rank, not only on 0.

    JSON bytes in a tensor, not broadcast_object_list: nothing from a peer is unpickled (Note [no pickles
    from peers] in comm.py)."""
    payload = None
    if rank == 0:
        try:
            payload = {"plan": make().to_dict()}
        except (ValueError, OSError) as exc:
            payload = {"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)}
    with peer_errors("receiving the plan from rank 0"):
        payload = broadcast_json(payload, src=0)
    if not isinstance(payload, dict) or not isinstance(payload.get("plan", payload.get("error")), (dict, str)):
        raise ConfigError("the plan from rank 0 is malformed; is every rank running the same skippipe version?")
    if "error" in payload:
        raise ConfigError(str(payload["error"]))
    return Plan.from_dict(payload["plan"], where="the plan from rank 0")


@contextlib.contextmanager
def quiet_errors():
    """On ranks other than 0: exit 2 on bad input without repeating the line rank 0 prints."""
    try:
        yield
    except (ValueError, OSError, KeyError):
        sys.exit(2)


def data_streams(plan: Plan, corpus, node_ids, seed: int) -> dict[int, TokenStream]:
    """One stream per data node among `node_ids`; the shard index is its place among the stage-0 nodes."""
    stage0 = sorted(n.id for n in plan.nodes if n.stage == 0)
    return {nid: corpus.stream(plan.microbatch_size, stage0.index(nid), len(stage0), seed)
            for nid in sorted(node_ids) if nid in stage0}


def draw_batches(plan: Plan, streams: dict[int, TokenStream]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each data node draws its microbatches in microbatch order, whatever order the plan runs them in."""
    batches = {}
    for node_id, stream in sorted(streams.items()):
        for path in sorted((p for p in plan.paths if p.data_node == node_id), key=lambda p: p.microbatch):
            batches[path.microbatch] = stream.next_batch()
    return batches


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(cfg: Config, plan: Plan, ctx: Context | None = None, resume: bool = False,
          on_gradients: Callable[[int, dict[int, torch.nn.Module]], None] | None = None,
          overwrite: bool = False) -> list[dict]:
    """Run cfg.train.steps iterations of `plan`; distributed when `ctx` is given, else single-process.

    Returns the per-step records (every rank gets them). `on_gradients(step, stages)` sees the final
    gradients of the stages this process holds, before the optimizer step (tests compare them).
    A fresh single-process run claims its run dir (rundir.claim_run_dir; `overwrite` replaces a run
    there); a distributed one was claimed by rank 0 at start-up (elastic.decide_resume). Raises
    ConfigError on bad input or a changed fixed setting on resume (Note [fixed on resume] in rundir.py),
    NonFiniteError at a non-finite step under train.nonfinite=stop (Note [non-finite steps] in finite.py).
    """
    distributed = ctx is not None
    rank = ctx.rank if distributed else 0
    device = ctx.device if distributed else pick_device(cfg.train.device)
    spec = load_model_spec(cfg.model)
    if plan.model and plan.model != spec.name:
        raise ConfigError(f"the plan was solved for model {plan.model!r} but the config trains {spec.name!r}; "
                          f"re-solve the plan or set model={plan.model}")
    context = cfg.data.context or spec.context
    if context > spec.context:
        raise ConfigError(f"data.context {context} exceeds the model's context {spec.context}; lower it")
    run_dir = Path(cfg.train.run_dir)
    folder = meta = None
    if resume:  # Note [fixed on resume] (rundir.py): refuse before anything is loaded or written
        folder = latest_checkpoint(run_dir)
        meta, saved = checkpoint_meta(folder), load_config(folder / "config.yaml")
        recorded, fallback = recorded_spec(meta, folder, saved.model)
        check_model(recorded, spec, folder=folder, model_setting=cfg.model)
        check_resume_settings(saved, cfg, saved_context=saved.data.context or recorded.context, context=context,
                              where=folder)
    seed, timeout = cfg.train.seed, (ctx.timeout if distributed else None)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    corpus = load_corpus(cfg.data.corpus, context, cfg.data.tokenizer, cfg.data.val_fraction, spec.vocab_size)
    if resume:
        check_tokenizer(meta, corpus.tokenizer, folder)
    if distributed:
        stages = {ctx.stage: Stage(spec, ctx.stage, plan.num_stages, seed, device)}
        streams = data_streams(plan, corpus, [ctx.node.id], seed)
        worker = Worker(plan, ctx, stages[ctx.stage], (plan.microbatch_size, context, spec.dim))
        pairs = {(ctx.node_rank[a], ctx.node_rank[b]) for p in plan.paths for a, b in zip(p.nodes, p.nodes[1:] + p.nodes[:1])}
        leaders = [ctx.stage_ranks[s][0] for s in range(plan.num_stages)]
        connect_peers(pairs | set(zip(leaders, leaders[1:] + leaders[:1])), rank, device, ctx.timeout)
    else:
        model = FullModel(spec, plan.num_stages, seed, device)
        stages = dict(enumerate(model.stages))
        streams = data_streams(plan, corpus, [n.id for n in plan.nodes], seed)
    optimizers = {s: build_optimizer(m, cfg.optim) for s, m in stages.items()}
    visits = stage_visits(plan)
    val_batches = [b for b in corpus.val_batches(plan.microbatch_size, cfg.train.eval_batches)
                   if len(b[0]) == plan.microbatch_size]  # full batches only: message shapes are fixed

    start_step = 0
    if resume:
        start_step = load_checkpoint(folder, stages, optimizers, streams, rank, device)
        if fallback and rank == 0:
            print(fallback, file=sys.stderr, flush=True)
        if (saved.optim.decay_steps or saved.train.steps) != (cfg.optim.decay_steps or cfg.train.steps) and rank == 0:
            print(f"warning: the learning-rate schedule spans {saved.optim.decay_steps or saved.train.steps} steps in "
                  f"the checkpoint and {cfg.optim.decay_steps or cfg.train.steps} now; set optim.decay_steps to keep it",
                  file=sys.stderr)
    if not distributed:
        claim_run_dir(run_dir, resume=resume, overwrite=overwrite)  # Note [run dir ownership] (rundir.py)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not val_batches and rank == 0:
        print(f"warning: no validation batch: {_why_no_validation(cfg, corpus, plan.microbatch_size)}; "
              f"val_loss is not measured (null in metrics.jsonl, 'val n/a' in the log)", file=sys.stderr, flush=True)
    identity = checkpoint_identity(spec, corpus.tokenizer)
    metrics = Metrics(run_dir, rank == 0, cfg.train.steps, start_step)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        plan.save(run_dir / "plan.json")
    _report_parameters(metrics, plan, stages, ctx)
    if resume:
        metrics.info(f"resumed from {folder} after step {start_step}")

    records = []
    # The plan's microbatch size, not the config's: the plan is the contract (it may come from --plan).
    tokens_per_step = plan.num_microbatches * plan.microbatch_size * context
    for step in range(start_step + 1, cfg.train.steps + 1):
        started, wall = time.perf_counter(), time.time()
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for s, module in stages.items():
            set_lr(optimizers[s], lr)
            module.zero_grad(set_to_none=True)
        batches = draw_batches(plan, streams)
        result = worker.run_iteration(batches) if distributed else single.run_iteration(model, plan, batches, device)
        average_stage_gradients(stages, visits, ctx.stage_groups if distributed else None, timeout)
        counted = ({ctx.stage} if ctx.is_stage_leader else set()) if distributed else set(stages)
        grad_norm = clip_gradients(stages, cfg.optim.grad_clip, counted, distributed, timeout)
        if on_gradients is not None:
            on_gradients(step, stages)
        # Note [non-finite steps] (finite.py): the norm is global, so every rank takes the same branch.
        skipped = not math.isfinite(grad_norm)
        if skipped and cfg.train.nonfinite == "stop":
            raise NonFiniteError(step_message(step, None, grad_norm, _where_nonfinite(stages, result, ctx), run_dir))
        if not skipped:
            for optimizer in optimizers.values():
                optimizer.step()
        last = step == cfg.train.steps
        val_loss = None
        if val_batches and (last or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
            val_loss = (_shared_value(worker.evaluate(val_batches), device, timeout) if distributed
                        else single.evaluate(model, val_batches, device))
        logged = last or step % cfg.train.log_every == 0
        val_due = last or bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
        record = _record(step, lr, grad_norm, result, time.perf_counter() - started, wall, ctx, device,
                         tokens_per_step, plan.num_microbatches, with_timeline=logged)
        record["val_loss"] = val_loss
        if not is_finite(record["loss"]) and cfg.train.nonfinite == "stop":  # finite gradients, non-finite loss
            raise NonFiniteError(step_message(step, record["loss"], grad_norm, _where_nonfinite(stages, result, ctx),
                                              run_dir))
        if skipped or not is_finite(record["loss"]):
            record["skipped"] = skipped
        records.append(record)
        metrics.log(record, print_line=logged, val_due=val_due)
        if last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            barrier = (lambda: _barrier(device, timeout)) if distributed else (lambda: None)
            write = ({ctx.stage} if ctx.is_stage_leader else set()) if distributed else None
            folder = save_checkpoint(run_dir, step, stages, optimizers, streams, plan, cfg, rank, write, barrier,
                                     identity=identity)
            metrics.info(f"saved checkpoint {folder}")
    plot = metrics.close()
    if plot is not None:
        metrics.info(f"loss plot: {plot}")
    return records


def _report_parameters(metrics: Metrics, plan: Plan, stages: dict, ctx: Context | None) -> None:
    """Each rank holds only its stage's parameters and optimizer state: show it."""
    mine = [(ctx.rank if ctx else 0, ctx.node.id if ctx else -1, s, count_parameters(m)) for s, m in stages.items()]
    rows = mine
    if ctx is not None:
        with peer_errors("gathering parameter counts"):
            gathered = all_gather_json(mine)
        rows = [row for part in gathered for row in part]
    for rank, node, stage, count in rows:
        where = f"rank {rank} | node {node} ({plan.nodes[node].name}) | " if node >= 0 else "single process | "
        metrics.info(f"{where}stage {stage} | {count:,} parameters (and their AdamW state)")


def _why_no_validation(cfg: Config, corpus, microbatch_size: int) -> str:
    """Why a run has no full validation batch, and how to get one."""
    if cfg.train.eval_batches == 0:
        return "train.eval_batches is 0; set it to 1 or more to measure a validation loss"
    windows = max(0, (len(corpus.val) - 1) // corpus.context)
    return (f"the held-out split has {windows} window(s) of {corpus.context} tokens, fewer than one microbatch of "
            f"{microbatch_size}; raise data.val_fraction (now {cfg.data.val_fraction}) or use a larger corpus")


def _where_nonfinite(stages: dict, result: IterationResult, ctx: Context | None) -> list[str]:
    """Which microbatches' losses and which stages' gradients are non-finite, over every rank.

    Called by every rank together, only when a step has already gone non-finite: the gather costs nothing
    on healthy steps."""
    bad_stages = sorted(s for s, m in stages.items()
                        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in m.parameters()))
    mine = {"microbatches": nonfinite_microbatches(result.losses), "stages": bad_stages}
    parts = [mine]
    if ctx is not None:
        with peer_errors("gathering where the step went non-finite"):
            parts = all_gather_json(mine)
    microbatches = sorted({mb for part in parts for mb in part["microbatches"]})
    bad = sorted({s for part in parts for s in part["stages"]})
    where = []
    if microbatches:
        where.append(f"loss non-finite in microbatch(es) {', '.join(map(str, microbatches[:8]))}"
                     + (" ..." if len(microbatches) > 8 else ""))
    if bad:
        where.append(f"gradients non-finite in stage(s) {', '.join(map(str, bad))}")
    return where


def _barrier(device: torch.device, timeout) -> None:
    wait_for(dist.all_reduce(torch.zeros(1, device=device), async_op=True), timeout, "waiting for every rank")


def _shared_value(value: float | None, device: torch.device, timeout) -> float:
    """A value known on one rank, on every rank (the others contribute zero to a sum; the caller makes sure
    some rank measured it, so a zero here is never a stand-in for "not measured")."""
    tensor = torch.tensor([value or 0.0], dtype=torch.float64, device=device)
    wait_for(dist.all_reduce(tensor, async_op=True), timeout, "sharing the validation loss")
    return float(tensor)


def _record(step: int, lr: float, grad_norm: float, result: IterationResult, iteration_s: float, wall: float,
            ctx: Context | None, device: torch.device, tokens_per_step: int, num_microbatches: int,
            with_timeline: bool = True) -> dict:
    """The step's metrics, gathered from every rank: one small collective, plus the action timelines
    on logged steps (a JSON gather is two more collectives, which cost latency on a slow network)."""
    loss_sum = sum(float(v) for v in result.losses.values())
    mine = torch.tensor([loss_sum, result.compute_s, result.wait_s, iteration_s, wall], dtype=torch.float64,
                        device=device)
    if ctx is not None:
        rows = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
        wait_for(dist.all_gather(rows, mine, async_op=True), ctx.timeout, "gathering the step's metrics")
        timelines = [None] * ctx.world_size
        if with_timeline:
            with peer_errors("gathering the step's timelines"):
                timelines = all_gather_json(result.timeline)
    else:
        rows, timelines = [mine], [result.timeline]
    rows = [row.tolist() for row in rows]
    loss = sum(r[0] for r in rows) / num_microbatches
    origin = rows[0][4]
    iteration = max(r[3] for r in rows)
    idle = [max(0.0, r[3] - r[1]) for r in rows]
    return {
        "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "iteration_s": iteration,
        "tokens_per_s": tokens_per_step / iteration,
        "idle_share": sum(i / r[3] for i, r in zip(idle, rows)) / len(rows),
        "compute_s": [r[1] for r in rows], "wait_s": [r[2] for r in rows], "idle_s": idle,
        "timeline": [[[name, round(a - origin, 6), round(b - origin, 6)] for name, a, b in tl] for tl in timelines]
        if with_timeline else None,
    }
