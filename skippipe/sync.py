"""After the microbatches: each stage's gradient averaged as the plan demands, then global-norm clipping.

Note [gradient scaling]: every microbatch backpropagates its own mean-token loss unscaled, so a stage's
parameters accumulate the sum of the gradients of the microbatches that visited it. Dividing that sum by
the number of microbatches that visited the stage *in the whole plan* (over all its replicas) makes each
stage's gradient the mean over its visitors. Dividing by the total number of microbatches instead would
shrink the gradient of every stage but 0 by about (1 - skip ratio): skipped stages would be under-trained
by a factor that depends on the skip ratio. Stage 0 (embedding, head) is visited by every microbatch.
The replicas' sums are all-reduced (SUM) before the division, so each replica ends with the same gradient.

Note [idle stages]: a plan may leave a stage unvisited for an iteration (schedule.shallow_sets: even
runs every microbatch on half the stages; skippipe/path_schedule.py). Such a stage has no gradient: the
zeros `_grads` puts in for the all-reduce and the norm stand for nothing measured. The trainer therefore
skips its optimizer step, so its weights, AdamW moments and step count stay as they were, as a layer that
LayerDrop drops from a batch is left alone; a zero gradient would still move it by the moments' stale
direction and by weight decay. Every replica of the stage sees the same visit count (the whole plan's),
so all of them skip together.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from topology.plan import Plan


def stage_visits(plan: Plan) -> dict[int, int]:
    """Microbatches whose path visits each stage, over the whole plan."""
    counts = Counter(stage for path in plan.paths for stage in path.stages)
    return {stage: counts.get(stage, 0) for stage in range(plan.num_stages)}


def _grads(module: nn.Module) -> list[torch.Tensor]:
    params = list(module.parameters())  # shared (tied) parameters appear once
    for p in params:
        if p.grad is None:  # a replica no microbatch visited still takes part in the all-reduce
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def average_stage_gradients(stages: dict[int, nn.Module], visits: dict[int, int], *,
                            sum_over_replicas: Callable[[int, torch.Tensor], None]) -> None:
    """Note [gradient scaling]: sum over the stage's replicas, divide by the stage's visit count.

    `sum_over_replicas(stage, flat)` sums the stage's flat gradient over its replicas in place (the
    executor's: an all-reduce over the stage's data-parallel group, or nothing in one process).
    """
    for stage, module in stages.items():
        grads = _grads(module)
        flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce per stage, not one per tensor
        sum_over_replicas(stage, flat)
        flat /= max(visits[stage], 1)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_gradients(stages: dict[int, nn.Module], max_norm: float, *, counted: set[int],
                   sum_over_ranks: Callable[[torch.Tensor], None]) -> float:
    """Clip by the global norm over all stages; returns the norm before clipping.

    `counted`: the stages whose squared norm this process contributes. Replicas hold equal gradients after
    averaging, so only one replica of each stage (its leader) counts it; the others add nothing.
    `sum_over_ranks(total)` sums the float64 squared norm over the processes in place.
    """
    device = next(next(iter(stages.values())).parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for stage in sorted(counted):
        for g in _grads(stages[stage]):
            total += g.double().pow(2).sum()
    sum_over_ranks(total)
    norm = float(total.sqrt())
    if max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))  # the same rule as torch.nn.utils.clip_grad_norm_
        if scale < 1.0:
            for module in stages.values():
                for g in _grads(module):
                    g.mul_(scale)
    return norm
