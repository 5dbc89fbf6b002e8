"""The runtime's overhead: skippipe at skip ratio 0 against torch.distributed.pipelining's ScheduleGPipe.

Both run the same model (skippipe.model stages), the same microbatches (count and size, drawn from the
same corpus) on the same ranks of one gloo group on localhost, one rank per stage, in the same processes,
alternating rounds so that both see the same machine load. An iteration is, for both: every microbatch's
forward and backward through the pipeline, the global-norm gradient clip (one all-reduce) and the AdamW
step; its time is the slowest rank's. GPipe's last rank computes the loss (a linear pipeline); skippipe's
loop returns to the data node (stage 0 holds the head), so skippipe moves one more hop per microbatch.

Note [steps compared]: the first step of every round warms up (connections, allocator, autograd
graph caching) and the last step of a skippipe run also evaluates and checkpoints inside its iteration
time; both are left out, for both methods alike.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from skippipe.config import Config
from skippipe.model import FullModel, Stage
from topology.model_spec import ModelSpec


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


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def gpipe_steps(cfg: Config, spec: ModelSpec, rank: int, world: int, steps: int) -> list[float]:
    """`steps` GPipe iterations (forward/backward of every microbatch, clip, AdamW); each one's slowest-rank time."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    from skippipe.data import load_corpus
    from skippipe.optim import build_optimizer
    s = cfg.schedule
    module = GPipeStage(spec, rank, world, cfg.train.seed)
    context = cfg.data.context or spec.context
    example = (torch.zeros(s.microbatch_size, context, dtype=torch.long) if rank == 0
               else torch.zeros(s.microbatch_size, context, spec.dim))
    stage = PipelineStage(module, rank, world, torch.device("cpu"), input_args=(example,))
    schedule = ScheduleGPipe(stage, n_microbatches=s.num_microbatches, loss_fn=_loss)
    optimizer = build_optimizer(module, cfg.optim)
    corpus = load_corpus(cfg.data.corpus, context, cfg.data.tokenizer, cfg.data.val_fraction, spec.vocab_size)
    stream = corpus.stream(s.microbatch_size * s.num_microbatches, 0, 1, cfg.train.seed)
    times = []
    for _ in range(steps):
        tokens, targets = (t.contiguous() for t in stream.next_batch())  # same batch on every rank; the ends use it
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(tokens)
        elif rank == world - 1:
            schedule.step(target=targets, losses=[])
        else:
            schedule.step()
        _clip(module, cfg.optim.grad_clip)
        optimizer.step()
        times.append(_slowest(time.perf_counter() - started))
    return times


def _clip(module: nn.Module, max_norm: float) -> None:
    """Global-norm clip over all ranks (one all-reduce), as skippipe does."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    total = torch.stack([g.pow(2).sum() for g in grads]).sum().reshape(1) if grads else torch.zeros(1)
    dist.all_reduce(total)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale)


def skippipe_steps(cfg: Config, plan, run_dir: Path) -> list[float]:
    """`cfg.train.steps` skippipe iterations of `plan`; each one's slowest-rank time (from its metrics)."""
    from skippipe.context import build_context
    from skippipe.train import train
    cfg.train.run_dir = str(run_dir)
    ctx = build_context(plan, torch.device("cpu"), cfg.train.comm_timeout_s)
    records = train(cfg, plan, ctx)
    return [r["iteration_s"] for r in records]


def compared(times: list[float], drop_last: bool) -> list[float]:
    """Note [steps compared]: leave out the first step, and the last when it also evaluated."""
    kept = times[1:-1] if drop_last else times[1:]
    return kept or times


def summary(skippipe_times: list[float], gpipe_times: list[float]) -> dict:
    sp, gp = statistics.median(skippipe_times), statistics.median(gpipe_times)
    return {"skippipe_iteration_s": sp, "gpipe_iteration_s": gp, "overhead_ratio": sp / gp,
            "skippipe_steps_s": skippipe_times, "gpipe_steps_s": gpipe_times}
