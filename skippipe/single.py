"""Path-faithful single-process mode: the whole model on one device, each microbatch along its own path.

The same plan, data, loss and gradient semantics as the distributed run (Note [gradient scaling] in
sync.py), without communication: a feature for studying a plan's convergence without a cluster, and the
reference the distributed run is tested against.
"""
from __future__ import annotations

import time

import torch

from topology.plan import Plan
from skippipe.model import FullModel
from skippipe.worker import IterationResult


def run_iteration(model: FullModel, plan: Plan, batches: dict[int, tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device) -> IterationResult:
    """Forward and backward of every microbatch through the stages of its path, in path order."""
    result = IterationResult(losses={})
    for path in sorted(plan.paths, key=lambda p: p.microbatch):
        inputs, targets = batches[path.microbatch]
        start = time.time()
        loss = FullModel.loss(model.forward_path(inputs.to(device), path.stages), targets.to(device))
        loss.backward()  # unscaled: each stage divides by its own visit count afterwards
        result.losses[path.microbatch] = loss.detach()
        end = time.time()
        result.compute_s += end - start
        result.timeline.append((f"mb{path.microbatch}", start, end))
    return result


@torch.no_grad()
def evaluate(model: FullModel, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean token loss of the full model (every stage, in order), as Worker.evaluate computes it."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        loss = FullModel.loss(model(inputs.to(device)), targets.to(device))
        total += float(loss) * targets.numel()
        count += targets.numel()
    return total / max(count, 1)
