"""AdamW with linear warmup and cosine decay; one optimizer per stage.

One optimizer per stage, also in single-process mode, so that optimizer state is saved per stage and a
checkpoint does not depend on how stages were spread over processes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from skippipe.config import OptimConfig


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # No weight decay on norm gains (1-d): decaying them pulls the normalisation towards zero.
    params = list(module.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the same per-tensor arithmetic on every device, so runs compare exactly.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of 1-based `step`: linear warmup to cfg.lr, then cosine down to cfg.min_lr."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.decay_steps or total_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
