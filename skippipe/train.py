"""The training loop, shared by the distributed run and the path-faithful single-process mode.

One iteration: draw every microbatch on its data node, run the plan (worker.py or single.py), average
each stage's gradient over its visitors and replicas (Note [gradient scaling] in sync.py), clip by the
global norm, one AdamW step. The iteration's loss is the mean over microbatches of each microbatch's
mean token cross entropy. Both modes draw the same data, so their losses and gradients agree.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from scheduler.constraints import check
from scheduler.plan import Plan
from skippipe import single
from skippipe.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from skippipe.comm import all_gather_json, broadcast_json, connect_peers, peer_errors, wait_for
from skippipe.config import Config, load_config, save_config
from skippipe.context import Context, pick_device
from skippipe.data import TokenStream, load_corpus
from skippipe.flops import device_memory_gb, mfu, model_flops_per_token, node_flops, peak_tflops
from skippipe.metrics import Metrics
from skippipe.model import FullModel, Stage
from skippipe.optim import build_optimizer, lr_at, set_lr
from skippipe.precision import resolve_precision
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
    topology, spec = load_topology(s.topology, s.num_nodes, cfg.train.seed), load_model_spec(cfg.model)
    memory, explanation = schedule_memory(cfg, topology, spec, s.num_stages)
    problem = Problem(topology=topology, model=spec,
                      microbatch_size=s.microbatch_size, num_stages=s.num_stages, stage_sizes=s.stage_sizes,
                      num_microbatches=s.num_microbatches, memory=memory, skip_ratio=s.skip_ratio,
                      max_swaps=s.max_swaps, seed=cfg.train.seed, memory_explanation=explanation,
                      topology_source={"spec": s.topology, "seed": cfg.train.seed})
    return solve(problem, s.strategy)


def schedule_memory(cfg: Config, topology, spec, num_stages: int) -> tuple[int, dict | None]:
    """schedule.memory as TC1's cap: a fixed number, or `auto` from each node's memory_gb, else this
    process's device memory as measured now (topology/memory.py, Note [memory arithmetic])."""
    from topology.memory import describe, resolve_memory
    if cfg.schedule.memory != "auto":
        return int(cfg.schedule.memory), None
    device = pick_device(cfg.train.device)
    cap, explanation = resolve_memory(
        "auto", topology=topology, spec=spec, num_stages=num_stages, microbatch_size=cfg.schedule.microbatch_size,
        precision=resolve_precision(cfg.train.precision, device).name, checkpointing=cfg.train.activation_checkpointing,
        measured_gb=device_memory_gb(device))
    print(describe(explanation), flush=True)
    return cap, explanation


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
          on_gradients: Callable[[int, dict[int, torch.nn.Module]], None] | None = None) -> list[dict]:
    """Run cfg.train.steps iterations of `plan`; distributed when `ctx` is given, else single-process.

    Returns the per-step records (every rank gets them). `on_gradients(step, stages)` sees the final
    gradients of the stages this process holds, before the optimizer step (tests compare them).
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
    run_dir.mkdir(parents=True, exist_ok=True)
    seed, timeout = cfg.train.seed, (ctx.timeout if distributed else None)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    precision = resolve_precision(cfg.train.precision, device)

    corpus = load_corpus(cfg.data.corpus, context, cfg.data.tokenizer, cfg.data.val_fraction, spec.vocab_size)
    if distributed:
        stages = {ctx.stage: Stage(spec, ctx.stage, plan.num_stages, seed, device)}
        streams = data_streams(plan, corpus, [ctx.node.id], seed)
        worker = Worker(plan, ctx, stages[ctx.stage], (plan.microbatch_size, context, spec.dim), precision)
        pairs = {(ctx.node_rank[a], ctx.node_rank[b]) for p in plan.paths for a, b in zip(p.nodes, p.nodes[1:] + p.nodes[:1])}
        leaders = [ctx.stage_ranks[s][0] for s in range(plan.num_stages)]
        connect_peers(pairs | set(zip(leaders, leaders[1:] + leaders[:1])), rank, device, ctx.timeout)
    else:
        model = FullModel(spec, plan.num_stages, seed, device)
        stages = dict(enumerate(model.stages))
        streams = data_streams(plan, corpus, [n.id for n in plan.nodes], seed)
    for module in stages.values():
        module.checkpoint_layers = cfg.train.activation_checkpointing == "layer"
    optimizers = {s: build_optimizer(m, cfg.optim) for s, m in stages.items()}
    visits = stage_visits(plan)
    val_batches = [b for b in corpus.val_batches(plan.microbatch_size, cfg.train.eval_batches)
                   if len(b[0]) == plan.microbatch_size]  # full batches only: message shapes are fixed

    start_step = 0
    if resume:
        folder = latest_checkpoint(run_dir)
        start_step = load_checkpoint(folder, stages, optimizers, streams, rank, device)
        saved = load_config(folder / "config.yaml")
        if (saved.optim.decay_steps or saved.train.steps) != (cfg.optim.decay_steps or cfg.train.steps) and rank == 0:
            print(f"warning: the learning-rate schedule spans {saved.optim.decay_steps or saved.train.steps} steps in "
                  f"the checkpoint and {cfg.optim.decay_steps or cfg.train.steps} now; set optim.decay_steps to keep it",
                  file=sys.stderr)
    metrics = Metrics(run_dir, rank == 0, cfg.train.steps, start_step)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        plan.save(run_dir / "plan.json")
    _report_parameters(metrics, plan, stages, ctx)
    metrics.info(f"precision {precision.name} (stage boundaries carry {precision.wire_bytes}-byte elements) | "
                 f"activation checkpointing {cfg.train.activation_checkpointing}")
    if spec.dtype_bytes != precision.wire_bytes:
        metrics.info(f"note: the model spec counts {spec.dtype_bytes}-byte activations (dtype_bytes) but this "
                     f"{precision.name} run sends {precision.wire_bytes}-byte ones, so the plan's predicted times "
                     f"count other bytes than the wire carries; set dtype_bytes: {precision.wire_bytes} in the model "
                     f"YAML (as llama-tiny-fp32 does) or train.precision to match")
    if resume:
        metrics.info(f"resumed from {folder} after step {start_step}")

    # Throughput (Note [model FLOPs] in flops.py): what this process's share of an iteration is worth.
    per_node = node_flops(plan, spec, context)
    throughput = {
        "flops": per_node[ctx.node.id] if distributed else sum(per_node.values()),
        # tokens through this rank's stage; the single process runs every microbatch once (end to end)
        "tokens": (sum(p.nodes.count(ctx.node.id) for p in plan.paths) * plan.microbatch_size * context
                   if distributed else plan.num_microbatches * plan.microbatch_size * context),
        "flops_per_token": model_flops_per_token(spec, context),
        "peak": peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, precision.name,
                            cfg.train.peak_tflops),
    }
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
        result = worker.run_iteration(batches) if distributed else single.run_iteration(model, plan, batches, device, precision)
        average_stage_gradients(stages, visits, ctx.stage_groups if distributed else None, timeout)
        counted = ({ctx.stage} if ctx.is_stage_leader else set()) if distributed else set(stages)
        grad_norm = clip_gradients(stages, cfg.optim.grad_clip, counted, distributed, timeout)
        if on_gradients is not None:
            on_gradients(step, stages)
        for optimizer in optimizers.values():
            optimizer.step()
        last = step == cfg.train.steps
        val_loss = None
        if last or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            val_loss = (_shared_value(worker.evaluate(val_batches), device, timeout) if distributed
                        else single.evaluate(model, val_batches, device, precision))
        logged = last or step % cfg.train.log_every == 0
        record = _record(step, lr, grad_norm, result, time.perf_counter() - started, wall, ctx, device,
                         tokens_per_step, plan.num_microbatches, with_timeline=logged, throughput=throughput)
        record["val_loss"] = val_loss
        records.append(record)
        metrics.log(record, print_line=logged)
        if last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            barrier = (lambda: _barrier(device, timeout)) if distributed else (lambda: None)
            write = ({ctx.stage} if ctx.is_stage_leader else set()) if distributed else None
            folder = save_checkpoint(run_dir, step, stages, optimizers, streams, plan, cfg, rank, write, barrier)
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


def _barrier(device: torch.device, timeout) -> None:
    wait_for(dist.all_reduce(torch.zeros(1, device=device), async_op=True), timeout, "waiting for every rank")


def _shared_value(value: float | None, device: torch.device, timeout) -> float:
    """A value known on one rank, on every rank (the others contribute zero to a sum)."""
    tensor = torch.tensor([value or 0.0], dtype=torch.float64, device=device)
    wait_for(dist.all_reduce(tensor, async_op=True), timeout, "sharing the validation loss")
    return float(tensor)


def _record(step: int, lr: float, grad_norm: float, result: IterationResult, iteration_s: float, wall: float,
            ctx: Context | None, device: torch.device, tokens_per_step: int, num_microbatches: int,
            with_timeline: bool = True, throughput: dict | None = None) -> dict:
    """The step's metrics, gathered from every rank: one small collective, plus the action timelines
    on logged steps (a JSON gather is two more collectives, which cost latency on a slow network).

    `throughput`: this process's model FLOPs and tokens per iteration, the model's FLOPs per token and the
    device's peak TFLOP/s (None: MFU is null)."""
    loss_sum = sum(float(v) for v in result.losses.values())
    throughput = throughput or {"flops": 0.0, "tokens": 0, "flops_per_token": None, "peak": None}
    mine = torch.tensor([loss_sum, result.compute_s, result.wait_s, iteration_s, wall, throughput["flops"],
                         throughput["tokens"]], dtype=torch.float64, device=device)
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
    peak = throughput["peak"]
    return {
        "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "iteration_s": iteration,
        "tokens_per_s": tokens_per_step / iteration,
        "idle_share": sum(i / r[3] for i, r in zip(idle, rows)) / len(rows),
        "model_flops_per_token": throughput["flops_per_token"], "peak_tflops": peak,
        "mfu": mfu(sum(r[5] for r in rows), iteration, peak, len(rows)),
        "tokens_per_s_per_rank": [r[6] / iteration for r in rows],
        "mfu_per_rank": [mfu(r[5], iteration, peak) for r in rows] if peak is not None else None,
        "compute_s": [r[1] for r in rows], "wait_s": [r[2] for r in rows], "idle_s": idle,
        "timeline": [[[name, round(a - origin, 6), round(b - origin, 6)] for name, a, b in tl] for tl in timelines]
        if with_timeline else None,
    }
