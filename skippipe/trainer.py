"""The training loop, the same for the distributed run and the path-faithful single-process mode.

    trainer = Trainer(cfg, plan, LocalExecutor(device))        # or DistributedExecutor(ctx)
    records = trainer.train()                                   # setup(), then train_step() per step

One iteration (`Trainer.train_step`): draw every microbatch on its data node, run the plan (the
executor: executors.py), average each stage's gradient over its visitors and replicas (Note [gradient
scaling] in sync.py), clip by the global norm, one AdamW step. The iteration's loss is the mean over
microbatches of each microbatch's mean token cross entropy. Both executors draw the same data, so their
losses and gradients agree. Nothing here depends on which executor runs the plan.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scheduler.constraints import check
from topology.plan import Plan
from skippipe.checkpoint import checkpoint_meta, latest_checkpoint, load_checkpoint, save_checkpoint
from skippipe.config import Config, load_config, save_config
from skippipe.context import Context, pick_device
from skippipe.data import TokenStream, load_corpus
from skippipe.executors import DistributedExecutor, LocalExecutor
from skippipe.finite import NonFiniteError, is_finite, nonfinite_microbatches, step_message
from skippipe.flops import mfu, model_flops_per_token, node_flops, peak_tflops
from skippipe.identity import check_model, check_tokenizer, checkpoint_identity, recorded_spec
from skippipe.metrics import Metrics
from skippipe.optim import build_optimizer, lr_at, set_lr
from skippipe.path_schedule import SINGLE_PROCESS_ONLY, plan_schedule
from skippipe.precision import resolve_precision
from skippipe.rundir import check_resume_settings, claim_run_dir
from skippipe.shards import run_tokenizer
from skippipe.sync import average_stage_gradients, clip_gradients, stage_visits
from skippipe.worker import IterationResult
from topology.errors import ConfigError
from topology.model_spec import load_model_spec

Executor = LocalExecutor | DistributedExecutor
GradientHook = Callable[[int, dict[int, torch.nn.Module]], None]


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


class Trainer:
    """cfg.train.steps iterations of `plan` on `executor`.

    `resume`: continue from the run dir's newest checkpoint. `overwrite`: a fresh run replaces a run in
    the run dir (Note [run dir ownership] in rundir.py; a distributed run's dir was claimed by rank 0 at
    start-up, elastic.decide_resume). `on_gradients(step, stages)` sees the final gradients of the stages
    this process holds, before the optimizer step (tests compare them). `replanner`: the re-plan hook
    (skippipe/replan.py, Note [re-plan while training]); None: made from cfg.schedule.replan when enabled,
    else the plan stays as it is for the whole run.
    Raises ConfigError for a plan solved for another model, a context longer than the model's, an occupied
    run dir or a changed fixed setting on resume (Note [fixed on resume] in rundir.py); NonFiniteError at
    a non-finite step under train.nonfinite=stop (Note [non-finite steps] in finite.py).
    """

    def __init__(self, cfg: Config, plan: Plan, executor: Executor, *, resume: bool = False,
                 overwrite: bool = False, on_gradients: GradientHook | None = None, replanner=None):
        self.cfg, self.plan, self.executor = cfg, plan, executor
        self.resume, self.overwrite, self.on_gradients = resume, overwrite, on_gradients
        self.replanner = replanner
        self.start_step = 0
        self.plan_version = 0  # +1 per re-plan while training

    def setup(self) -> None:
        """Model, data streams, optimizers and validation batches; the checkpoint when resuming (its fixed
        settings, model spec and tokenizer checked first); the run dir claimed; the run's config and plan
        saved in it (rank 0)."""
        cfg, plan, executor = self.cfg, self.plan, self.executor
        spec = load_model_spec(cfg.model)
        if plan.model and plan.model != spec.name:
            raise ConfigError(f"the plan was solved for model {plan.model!r} but the config trains {spec.name!r}; "
                              f"re-solve the plan or set model={plan.model}")
        self.context = cfg.data.context or spec.context
        if self.context > spec.context:
            raise ConfigError(f"data.context {self.context} exceeds the model's context {spec.context}; lower it")
        self.run_dir = Path(cfg.train.run_dir)
        # A prepared folder's own tokenizer when none is named: the saved config, the checkpoint's identity,
        # evaluation and export all name the one the run trains with.
        cfg.data.tokenizer = run_tokenizer(cfg.data.corpus, cfg.data.tokenizer)
        folder = meta = fallback = None
        if self.resume:  # Note [fixed on resume] (rundir.py): refuse before anything is loaded or written
            folder = latest_checkpoint(self.run_dir)
            meta, saved = checkpoint_meta(folder), load_config(folder / "config.yaml")
            recorded, fallback = recorded_spec(meta, folder, saved.model)
            check_model(recorded, spec, folder=folder, model_setting=cfg.model)
            check_resume_settings(saved, cfg, saved_context=saved.data.context or recorded.context,
                                  context=self.context, where=folder)
        seed = cfg.train.seed
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        corpus = load_corpus(cfg.data.corpus, context=self.context, tokenizer=cfg.data.tokenizer,
                             val_fraction=cfg.data.val_fraction, vocab_size=spec.vocab_size)
        if self.resume:
            check_tokenizer(meta, corpus.tokenizer, folder)
        self.identity = checkpoint_identity(spec, corpus.tokenizer)
        self.spec = spec
        self.precision = resolve_precision(cfg.train.precision, executor.device)
        self.stages = executor.build(plan, spec, seed=seed, context=self.context, precision=self.precision)
        for module in self.stages.values():
            module.checkpoint_layers = cfg.train.activation_checkpointing == "layer"
        if cfg.train.init_from and not self.resume:
            from skippipe.hf_import import load_stage_weights
            load_stage_weights(cfg.train.init_from, self.stages, spec)
        self.streams = data_streams(plan, corpus, executor.data_nodes(plan), seed)
        self.optimizers = {s: build_optimizer(m, cfg.optim) for s, m in self.stages.items()}
        self.schedule = plan_schedule(cfg, plan)
        if self.schedule.varies and not isinstance(executor, LocalExecutor):
            raise ConfigError(SINGLE_PROCESS_ONLY)
        self.val_batches = [b for b in corpus.val_batches(plan.microbatch_size, cfg.train.eval_batches)
                            if len(b[0]) == plan.microbatch_size]  # full batches only: message shapes are fixed
        # The plan's microbatch size, not the config's: the plan is the contract (it may come from --plan).
        self.tokens_per_step = plan.num_microbatches * plan.microbatch_size * self.context
        device = executor.device
        self.peak_tflops = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                       self.precision.name, cfg.train.peak_tflops)
        self.resumed_from = folder
        if self.resume:
            self.start_step = load_checkpoint(folder, stages=self.stages, optimizers=self.optimizers,
                                              streams=self.streams, rank=executor.rank, device=executor.device)
            self.plan_version = int(meta.get("plan_version", 0))
            if fallback and executor.rank == 0:
                print(fallback, file=sys.stderr, flush=True)
            was, now = saved.optim.decay_steps or saved.train.steps, cfg.optim.decay_steps or cfg.train.steps
            if was != now and executor.rank == 0:
                print(f"warning: the learning-rate schedule spans {was} steps in the checkpoint and {now} now; "
                      f"set optim.decay_steps to keep it", file=sys.stderr)
        if executor.claims_run_dir:
            claim_run_dir(self.run_dir, resume=self.resume, overwrite=self.overwrite)  # Note [run dir ownership]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.val_batches and executor.rank == 0:
            print(f"warning: no validation batch: {_why_no_validation(cfg, corpus, plan.microbatch_size)}; "
                  f"val_loss is not measured (null in metrics.jsonl, 'val n/a' in the log)", file=sys.stderr, flush=True)
        if executor.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            plan.save(self.run_dir / "plan.json")
        if self.replanner is None and cfg.schedule.replan.enabled:
            from skippipe.planning import job_topology
            from skippipe.replan import Replanner
            topology = job_topology(cfg)
            if topology.num_nodes != len(plan.nodes):
                raise ConfigError(f"schedule.replan re-estimates the job's topology {cfg.schedule.topology!r}, which has "
                                  f"{topology.num_nodes} nodes, but the plan has {len(plan.nodes)}; pass the topology "
                                  f"the plan was solved for (--topology) or set schedule.replan.enabled=false")
            self.replanner = Replanner(cfg, topology, self.run_dir)

    def _due(self, step: int, every: int) -> bool:
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    def train_step(self, step: int) -> dict:
        """One iteration (1-based `step`); returns its record, gathered from every process (collective)."""
        cfg, executor, stages = self.cfg, self.executor, self.stages
        started, wall = time.perf_counter(), time.time()
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for s, module in stages.items():
            set_lr(self.optimizers[s], lr)
            module.zero_grad(set_to_none=True)
        plan = self.schedule.plan_at(step)  # the run's plan unless a schedule (path_schedule.py) says otherwise
        result = executor.run_iteration(draw_batches(plan, self.streams), plan, step=step)
        visits = stage_visits(plan)
        average_stage_gradients(stages, visits, sum_over_replicas=executor.sum_over_replicas)
        grad_norm = clip_gradients(stages, cfg.optim.grad_clip, counted=executor.counted_stages,
                                   sum_over_ranks=executor.sum_over_ranks)
        if self.on_gradients is not None:
            self.on_gradients(step, stages)
        # Note [non-finite steps] (finite.py): the norm is global, so every process takes the same branch.
        skipped = not math.isfinite(grad_norm)
        if skipped and cfg.train.nonfinite == "stop":
            raise NonFiniteError(step_message(step, None, grad_norm, self._where_nonfinite(result), self.run_dir))
        if not skipped:
            for stage, optimizer in self.optimizers.items():
                if visits[stage]:  # Note [idle stages] (sync.py): a stage no microbatch visited takes no step
                    optimizer.step()
        val_due = self._due(step, cfg.train.eval_every)
        val_loss = executor.evaluate(self.val_batches) if val_due and self.val_batches else None
        record = self._record(step, plan=plan, lr=lr, grad_norm=grad_norm, result=result,
                              iteration_s=time.perf_counter() - started, wall=wall,
                              with_timeline=self._due(step, cfg.train.log_every) or self.replanner is not None)
        record["val_loss"] = val_loss  # None (null) when not measured: never a stand-in number
        record["plan_version"] = self.plan_version  # the plan this step ran
        if not is_finite(record["loss"]) and cfg.train.nonfinite == "stop":  # finite gradients, non-finite loss
            raise NonFiniteError(step_message(step, record["loss"], grad_norm, self._where_nonfinite(result),
                                              self.run_dir))
        if skipped or not is_finite(record["loss"]):
            record["skipped"] = skipped
        return record

    def _where_nonfinite(self, result: IterationResult) -> list[str]:
        """Which microbatches' losses and which stages' gradients are non-finite, over every process.

        Collective, called only once a step has gone non-finite (every process then calls it together):
        healthy steps pay nothing for it."""
        bad_stages = sorted(s for s, m in self.stages.items()
                            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in m.parameters()))
        mine = {"microbatches": nonfinite_microbatches(result.losses), "stages": bad_stages}
        parts = self.executor.gather_json(mine, "gathering where the step went non-finite")
        microbatches = sorted({mb for part in parts for mb in part["microbatches"]})
        bad = sorted({s for part in parts for s in part["stages"]})
        where = []
        if microbatches:
            where.append(f"loss non-finite in microbatch(es) {', '.join(map(str, microbatches[:8]))}"
                         + (" ..." if len(microbatches) > 8 else ""))
        if bad:
            where.append(f"gradients non-finite in stage(s) {', '.join(map(str, bad))}")
        return where

    def train(self) -> list[dict]:
        """setup(), then every step to cfg.train.steps: logged, checkpointed. Returns the records (every
        process gets them)."""
        self.setup()
        cfg, executor = self.cfg, self.executor
        metrics = Metrics(self.run_dir, executor.rank == 0, cfg.train.steps, self.start_step)
        self._report_parameters(metrics)
        precision = self.precision
        metrics.info(f"precision {precision.name} (stage boundaries carry {precision.wire_bytes}-byte elements) | "
                     f"activation checkpointing {cfg.train.activation_checkpointing}")
        if self.spec.dtype_bytes != precision.wire_bytes:
            metrics.info(f"note: the model spec counts {self.spec.dtype_bytes}-byte activations (dtype_bytes) but this "
                         f"{precision.name} run sends {precision.wire_bytes}-byte ones, so the plan's predicted times "
                         f"count other bytes than the wire carries; set dtype_bytes: {precision.wire_bytes} in the "
                         f"model YAML (as llama-tiny-fp32 does) or train.precision to match")
        if len(self.schedule.rotation) > 1:
            from scheduler.rotation import distinct_stage_sets
            rotation = self.schedule.rotation
            metrics.info(f"rotating {len(rotation)} plans, one per step ({distinct_stage_sets(rotation)} distinct stage "
                         f"sets; {distinct_stage_sets([self.plan])} in the first plan), predicted "
                         + ", ".join(f"{p.predicted['iteration_s']:.3f}" for p in rotation) + " s per iteration")
        if self.resumed_from is not None:
            metrics.info(f"resumed from {self.resumed_from} after step {self.start_step}")
            if self.start_step >= cfg.train.steps:
                metrics.info(f"nothing to train: the run is already at step {self.start_step} and --steps is "
                             f"{cfg.train.steps}; pass a larger --steps to train on")
        records = []
        for step in range(self.start_step + 1, cfg.train.steps + 1):
            record = self.train_step(step)
            records.append(record)
            if self.replanner is not None and step < cfg.train.steps:
                self._maybe_replan(step, record, metrics)
            metrics.log(record, print_line=self._due(step, cfg.train.log_every),
                        val_due=self._due(step, cfg.train.eval_every))
            if self._due(step, cfg.train.checkpoint_every):
                folder = save_checkpoint(self.run_dir, step=step, stages=self.stages, optimizers=self.optimizers,
                                         streams=self.streams, plan=self.plan, cfg=cfg, rank=executor.rank,
                                         write_stages=executor.write_stages, barrier=executor.barrier,
                                         identity=self.identity, plan_version=self.plan_version)
                metrics.info(f"saved checkpoint {folder}")
        plot = metrics.close()
        if plot is not None:
            metrics.info(f"loss plot: {plot}")
        return records

    def _maybe_replan(self, step: int, record: dict, metrics: Metrics) -> None:
        """Between step and step + 1, on every process alike: ask the re-plan hook; when it says so, rank 0
        proposes a plan and shares it as JSON, and every process switches to it (Note [re-plan while
        training] in replan.py). The outcome goes into the step's record (metrics.jsonl) and the log."""
        reason = self.replanner.observe(record)
        if reason is None:
            return

        def make() -> dict:
            try:
                plan, info = self.replanner.propose(self.plan, reason=reason, step=step)
            except (ValueError, OSError) as exc:  # a failed re-plan keeps the plan; it does not end the run
                return {"plan": None, "info": {"error": f"{type(exc).__name__}: {exc}"}}
            return {"plan": None if plan is None else plan.to_dict(), "info": info}

        payload = self.executor.share_json(make, "sharing the re-plan from rank 0")
        new = Plan.from_dict(payload["plan"], where="the re-plan from rank 0") if payload.get("plan") else None
        if new is not None:
            check(new, world_size=len(self.plan.nodes))
            self.executor.switch(new)
            self.plan, self.schedule = new, plan_schedule(self.cfg, new)
            self.plan_version += 1
            if self.executor.rank == 0:
                (self.run_dir / "replans").mkdir(exist_ok=True)
                new.save(self.run_dir / "replans" / f"plan.v{self.plan_version}.json")
        self.replanner.took_force(new is not None)
        info = payload.get("info", {})
        record["replan"] = {"reason": reason, "switched": new is not None, "plan_version": self.plan_version,
                            "from_step": step + 1, **info}
        if new is not None:
            metrics.info(f"re-planned after step {step}: plan v{self.plan_version} from step {step + 1} "
                         f"(predicted {info.get('new_plan_predicted_s', float('nan')):.3f} s, the old plan "
                         f"{info.get('current_plan_predicted_s', float('nan')):.3f} s on the new estimate); reason: {reason}")
        else:
            metrics.info(f"re-plan check after step {step} kept plan v{self.plan_version} "
                         f"({info.get('error') or 'no faster plan for the estimated network'}); reason: {reason}")

    def _report_parameters(self, metrics: Metrics) -> None:
        """Each process holds only its stages' parameters and optimizer state: show it."""
        mine = [[self.executor.where(), s, count_parameters(m)] for s, m in self.stages.items()]
        for part in self.executor.gather_json(mine, "gathering parameter counts"):
            for where, stage, count in part:
                metrics.info(f"{where}stage {stage} | {count:,} parameters (and their AdamW state)")

    def _throughput(self, plan: Plan) -> dict:
        """This process's share of an iteration run with `plan` (Note [model FLOPs] in flops.py): model FLOPs,
        tokens through its stages and the model's FLOPs per token. Counted from the step's own plan: a
        full-depth step (path_schedule.py) or a re-planned one does other work than the run's first plan."""
        context = self.context
        nodes = set(self.executor.data_nodes(plan)) if isinstance(self.executor, DistributedExecutor) else None
        per_node = node_flops(plan, self.spec, context)
        flops = sum(v for n, v in per_node.items() if nodes is None or n in nodes)
        # tokens through this rank's stage; the single process runs every microbatch once, end to end
        visits = (sum(n in nodes for p in plan.paths for n in p.nodes) if nodes is not None
                  else plan.num_microbatches)
        return {"flops": flops, "tokens": visits * plan.microbatch_size * context,
                "flops_per_token": model_flops_per_token(self.spec, context)}

    def _record(self, step: int, *, plan: Plan, lr: float, grad_norm: float, result: IterationResult, iteration_s: float,
                wall: float, with_timeline: bool) -> dict:
        """The step's metrics, gathered from every process: one small collective, plus the action timelines
        on logged steps (a JSON gather is two more collectives, which cost latency on a slow network)."""
        loss_sum = sum(float(v) for v in result.losses.values())
        throughput = self._throughput(plan)
        mine = torch.tensor([loss_sum, result.compute_s, result.wait_s, iteration_s, wall, throughput["flops"],
                             throughput["tokens"]], dtype=torch.float64, device=self.executor.device)
        rows = [row.tolist() for row in self.executor.gather_rows(mine, "gathering the step's metrics")]
        timelines = self.executor.gather_json(result.timeline, "gathering the step's timelines") if with_timeline else None
        loss = sum(r[0] for r in rows) / self.plan.num_microbatches
        origin = rows[0][4]
        iteration = max(r[3] for r in rows)
        idle = [max(0.0, r[3] - r[1]) for r in rows]
        peak = self.peak_tflops
        return {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "iteration_s": iteration,
            "tokens_per_s": self.tokens_per_step / iteration,
            "idle_share": sum(i / r[3] for i, r in zip(idle, rows)) / len(rows),
            "model_flops_per_token": throughput["flops_per_token"], "peak_tflops": peak,
            "mfu": mfu(sum(r[5] for r in rows), iteration, peak, len(rows)),
            "tokens_per_s_per_rank": [r[6] / iteration for r in rows],
            "mfu_per_rank": [mfu(r[5], iteration, peak) for r in rows] if peak is not None else None,
            "compute_s": [r[1] for r in rows], "wait_s": [r[2] for r in rows], "idle_s": idle,
            "timeline": [[[name, round(a - origin, 6), round(b - origin, 6)] for name, a, b in tl] for tl in timelines]
            if with_timeline else None,
        }


def _why_no_validation(cfg: Config, corpus, microbatch_size: int) -> str:
    """Why a run has no full validation batch, and how to get one."""
    if cfg.train.eval_batches == 0:
        return "train.eval_batches is 0; set it to 1 or more to measure a validation loss"
    windows = max(0, (len(corpus.val) - 1) // corpus.context)
    return (f"the held-out split has {windows} window(s) of {corpus.context} tokens, fewer than one microbatch of "
            f"{microbatch_size}; raise data.val_fraction (now {cfg.data.val_fraction}) or use a larger corpus")


def train(cfg: Config, plan: Plan, ctx: Context | None = None, *, resume: bool = False, overwrite: bool = False,
          on_gradients: GradientHook | None = None, replanner=None) -> list[dict]:
    """Trainer(...).train() on this rank's stage when `ctx` is given, else path-faithful on cfg.train.device.
    The one place the executor is chosen; returns the per-step records."""
    executor = DistributedExecutor(ctx) if ctx is not None else LocalExecutor(pick_device(cfg.train.device))
    return Trainer(cfg, plan, executor, resume=resume, overwrite=overwrite, on_gradients=on_gradients,
                   replanner=replanner).train()
