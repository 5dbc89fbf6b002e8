"""The runtime's overhead: skippipe at skip ratio 0 against torch.distributed.pipelining's ScheduleGPipe.

Both run the same model (skippipe.model stages, same seeded init), the same microbatches (count and size,
from the same corpus) on the same ranks of one gloo group on localhost, one rank per stage, in the same
processes. An iteration is, for both: every microbatch's forward and backward through the pipeline, the
global-norm gradient clip and the AdamW step; its time is the slowest rank's. GPipe's last rank computes
the loss (a linear pipeline); skippipe's loop returns to the data node (stage 0 holds the head), so
skippipe moves one more hop per microbatch.

Note [interleaved steps]: development machines are shared, and other jobs make step times swing by 2-5x
over seconds. Whole rounds of one method then the other compare different machine loads. So the two
alternate step by step (ABBA: skippipe first on even steps, GPipe first on odd ones), a barrier before
every step, and the first `warmup` steps of each are left out. `SkippipeRunner.step` calls
skippipe.trainer.Trainer.train_step, the body of the training loop without its metrics and checkpoints.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from skippipe.config import Config
from skippipe.model import FullModel, Stage
from topology.model_spec import ModelSpec
from topology.plan import Plan


class GPipeStage(nn.Module):
    """A skippipe stage rearranged for a linear pipeline: the embedding on the first rank, the final norm
    and LM head on the last (skippipe keeps both on stage 0, its data node)."""

    def __init__(self, spec: ModelSpec, index: int, num_stages: int, seed: int):
        super().__init__()
        self.body = Stage(spec, index, num_stages, seed)
        self.first, self.last = index == 0, index == num_stages - 1
        if self.last and not self.first:
            head = Stage(spec, 0, num_stages, seed)  # same seeded init as skippipe's stage 0 head
            self.norm, self.lm_head = head.norm, head.lm_head
        elif self.last:
            self.norm, self.lm_head = self.body.norm, self.body.lm_head
        if not self.first and hasattr(self.body, "embed_tokens"):
            del self.body.embed_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body.embed(x) if self.first else x
        hidden = self.body(hidden)
        return self.lm_head(self.norm(hidden)) if self.last else hidden


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return FullModel.loss(logits, targets)


class GPipeRunner:
    def __init__(self, cfg: Config, spec: ModelSpec, *, rank: int, world: int):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
        from skippipe.data import load_corpus
        from skippipe.optim import build_optimizer
        s = cfg.schedule
        self.rank, self.world, self.clip = rank, world, cfg.optim.grad_clip
        self.module = GPipeStage(spec, rank, world, cfg.train.seed)
        context = cfg.data.context or spec.context
        example = (torch.zeros(s.microbatch_size, context, dtype=torch.long) if rank == 0
                   else torch.zeros(s.microbatch_size, context, spec.dim))
        stage = PipelineStage(self.module, rank, world, torch.device("cpu"), input_args=(example,))
        self.schedule = ScheduleGPipe(stage, n_microbatches=s.num_microbatches, loss_fn=_loss)
        self.optimizer = build_optimizer(self.module, cfg.optim)
        corpus = load_corpus(cfg.data.corpus, context=context, tokenizer=cfg.data.tokenizer,
                             val_fraction=cfg.data.val_fraction, vocab_size=spec.vocab_size)
        self.stream = corpus.stream(s.microbatch_size * s.num_microbatches, 0, 1, cfg.train.seed)

    def step(self) -> float:
        """One iteration; this rank's seconds."""
        tokens, targets = (t.contiguous() for t in self.stream.next_batch())  # same batch everywhere; ends use it
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if self.rank == 0:
            self.schedule.step(tokens)
        elif self.rank == self.world - 1:
            self.schedule.step(target=targets, losses=[])
        else:
            self.schedule.step()
        _clip(self.module, self.clip)
        self.optimizer.step()
        return time.perf_counter() - started


def _clip(module: nn.Module, max_norm: float) -> None:
    """Global-norm clip over all ranks (one all-reduce), as skippipe does."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    total = torch.stack([g.pow(2).sum() for g in grads]).sum().reshape(1) if grads else torch.zeros(1)
    dist.all_reduce(total)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale)


class SkippipeRunner:
    """skippipe's training step itself (Trainer.train_step on this rank's stage; Note [interleaved steps])."""

    def __init__(self, cfg: Config, plan: Plan):
        from skippipe.context import build_context
        from skippipe.executors import DistributedExecutor
        from skippipe.trainer import Trainer
        ctx = build_context(plan, torch.device("cpu"), cfg.train.comm_timeout_s)
        self.trainer = Trainer(cfg, plan, DistributedExecutor(ctx))
        self.trainer.setup()
        self.step_index = 0

    def step(self) -> float:
        """One iteration; this rank's seconds."""
        self.step_index += 1
        started = time.perf_counter()
        self.trainer.train_step(self.step_index)
        return time.perf_counter() - started


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _total(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def interleaved(skippipe: SkippipeRunner, gpipe: GPipeRunner, steps: int, warmup: int) -> dict[str, list]:
    """Note [interleaved steps]: ABBA order, a barrier before each step. Per step and method: the slowest
    rank's wall seconds, and the CPU seconds of all ranks together (every thread, gloo's included), which
    machine load does not inflate: the work each runtime does, overhead included."""
    out = {"skippipe": [], "gpipe": [], "skippipe_cpu": [], "gpipe_cpu": []}
    for k in range(warmup + steps):
        order = [("skippipe", skippipe), ("gpipe", gpipe)] if k % 2 == 0 else [("gpipe", gpipe), ("skippipe", skippipe)]
        for name, runner in order:
            dist.barrier()
            cpu = time.process_time()
            wall = runner.step()
            cpu = time.process_time() - cpu
            wall, cpu = _slowest(wall), _total(cpu)
            if k >= warmup:
                out[name].append(wall)
                out[f"{name}_cpu"].append(cpu)
    return out


def summary(times: dict[str, list]) -> dict:
    sp, gp = statistics.median(times["skippipe"]), statistics.median(times["gpipe"])
    sp_cpu, gp_cpu = statistics.median(times["skippipe_cpu"]), statistics.median(times["gpipe_cpu"])
    pairs = [a / b for a, b in zip(times["skippipe"], times["gpipe"])]
    return {"skippipe_iteration_s": sp, "gpipe_iteration_s": gp, "overhead_ratio": sp / gp,
            "paired_ratio_median": statistics.median(pairs),
            "min_ratio": min(times["skippipe"]) / min(times["gpipe"]),
            "skippipe_cpu_s": sp_cpu, "gpipe_cpu_s": gp_cpu, "cpu_ratio": sp_cpu / gp_cpu,
            "skippipe_steps_s": times["skippipe"], "gpipe_steps_s": times["gpipe"],
            "skippipe_cpu_steps_s": times["skippipe_cpu"], "gpipe_cpu_steps_s": times["gpipe_cpu"]}
