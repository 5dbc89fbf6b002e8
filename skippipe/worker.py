"""One rank's share of the plan: its node's actions, strictly in the plan's order.

    F mb@s   forward of stage s; at stage 0 (on the microbatch's data node) embedding first
    L mb@0   on the data node: final norm + LM head + loss, then its backward to the last hidden state
    B mb@s   backward through stage s (for stage 0 also the embedding)

Activations go from path position i to i + 1 and from the last position back to the data node for L;
gradients retrace the path. Communication is comm.Messenger's job; this file only computes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from topology.plan import Action, Plan
from skippipe.comm import Messenger, exchange
from skippipe.context import Context
from skippipe.model import FullModel, Stage
from skippipe.precision import Precision, resolve_precision


@dataclass
class IterationResult:
    losses: dict[int, torch.Tensor]  # microbatch -> its mean-token loss (computed on its data node)
    compute_s: float = 0.0
    wait_s: float = 0.0  # blocked on a peer's message
    timeline: list[tuple[str, float, float]] = field(default_factory=list)  # (action, start, end), time.time()


Saved = dict[int, tuple[torch.Tensor | None, torch.Tensor]]  # microbatch -> (stage input, output) until its B


def run_action(stage: Stage, action: Action, received: torch.Tensor, *, targets: torch.Tensor | None,
               saved: Saved, precision: Precision) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One action's computation on `stage`: (what it sends on, in the wire dtype, or None; the loss for L).

    `received`: the token ids (batch, seq_len) for F at stage 0, else the incoming message: hidden states
    (batch, seq_len, dim) for F and L, their gradient for B. `targets` (batch, seq_len): L's token ids.
    F keeps its input and output in `saved` for the microbatch's B; parameter gradients accumulate
    unscaled (Note [gradient scaling] in sync.py). The distributed worker and the path-faithful executor
    both call this, so the two modes compute bit for bit the same thing per action.
    """
    mb = action.microbatch
    if action.kind == "F":
        with precision.autocast():
            if action.stage == 0:
                inputs, hidden = None, stage.embed(received)
            else:
                inputs = received.requires_grad_()
                hidden = precision.from_wire(inputs)
            output = precision.to_wire(stage(hidden))
        saved[mb] = (inputs, output)
        return output, None
    if action.kind == "L":
        hidden = received.requires_grad_()
        with precision.autocast():
            logits = stage.head(precision.from_wire(hidden))
        loss = FullModel.loss(logits, targets)
        loss.backward()
        return hidden.grad, loss.detach()
    inputs, output = saved.pop(mb)
    torch.autograd.backward(output, received)
    return (inputs.grad if inputs is not None else None), None


class Worker:
    """Executes one node's plan order (ctx.node) on its stage; messages of `message_shape` (microbatch size,
    context, model dim)."""

    def __init__(self, plan: Plan, ctx: Context, stage: Stage, message_shape: tuple[int, ...],
                 precision: Precision | None = None):
        self.ctx, self.stage, self.plan = ctx, stage, plan
        self.node_id = ctx.node.id
        self.actions = list(plan.order.get(self.node_id, []))
        self.paths = {p.microbatch: p for p in plan.paths}
        # Messages cross stage boundaries in the wire dtype (Note [mixed precision] in precision.py).
        self.precision = precision or resolve_precision("fp32", ctx.device)
        self.messenger = Messenger(plan, ctx, shape=message_shape, dtype=self.precision.wire_dtype)
        # Per-action timestamps need the device idle at each boundary; on CPU that is free.
        self._sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    def run_iteration(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], *, step: int | None = None
                      ) -> IterationResult:
        """Run this node's actions for one iteration (1-based `step`, for ctx.slowdown); gradients accumulate
        unscaled (Note [gradient scaling])."""
        result = IterationResult(losses={})
        slow = self.ctx.slowdown
        stretch = slow[1] - 1.0 if slow is not None and step is not None and step >= slow[0] else 0.0
        saved: Saved = {}
        messenger, device = self.messenger, self.ctx.device
        messenger.start_iteration()
        for action in self.actions:
            mb = action.microbatch
            if action.kind == "F" and action.stage == 0:
                assert self.paths[mb].data_node == self.node_id, f"{action} must run on its data node"
                received = batches[mb][0].to(device, non_blocking=True)
            else:
                received = messenger.recv(action)
            start = time.time()
            targets = batches[mb][1].to(device, non_blocking=True) if action.kind == "L" else None
            outgoing, loss = run_action(self.stage, action, received, targets=targets, saved=saved,
                                        precision=self.precision)
            if loss is not None:
                result.losses[mb] = loss
            self._sync()
            end = time.time()
            floor = (self.ctx.compute_floor_s or {}).get(action.kind, 0.0)
            if end - start < floor:  # the emulated cluster's compute (Note [emulated compute])
                time.sleep(floor - (end - start))
                end = time.time()
            if stretch > 0:  # a straggler: the action takes `factor` times as long
                time.sleep(stretch * (end - start))
                end = time.time()
            result.compute_s += end - start
            result.timeline.append((str(action), start, end))
            if outgoing is not None:
                messenger.send(outgoing, action)
        messenger.finish_iteration()
        assert not saved, f"node {self.node_id}: forwards without backwards: {sorted(saved)}"
        result.wait_s = messenger.wait_s
        return result

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
        """Mean token loss of the full model (every stage, in order) through the stages' lowest ranks.

        Called by every rank after an iteration, when no training message is in flight; the loss is
        known on the lowest rank of stage 0 (None elsewhere).
        """
        leaders = [self.ctx.stage_ranks[s][0] for s in range(self.plan.num_stages)]
        if self.ctx.rank not in leaders:
            return None
        ctx = self.ctx
        rank, stage_index = ctx.rank, ctx.stage
        precision, dtype = self.precision, self.precision.wire_dtype
        total, count = 0.0, 0
        for inputs, targets in batches:
            shape = (*inputs.shape, self.stage.spec.dim)
            if stage_index == 0:
                with precision.autocast():
                    hidden = precision.to_wire(self.stage(self.stage.embed(inputs.to(ctx.device))))
            else:
                hidden = exchange(ctx, None, src=leaders[stage_index - 1], dst=rank, shape=shape, dtype=dtype,
                                  what=f"evaluation, stage {stage_index}")
                with precision.autocast():
                    hidden = precision.to_wire(self.stage(precision.from_wire(hidden)))
            after = leaders[(stage_index + 1) % len(leaders)]
            if after != rank:
                exchange(ctx, hidden, src=rank, dst=after, shape=shape, dtype=dtype, what="evaluation")
            if stage_index == 0:
                if leaders[-1] != rank:
                    hidden = exchange(ctx, None, src=leaders[-1], dst=rank, shape=shape, dtype=dtype,
                                      what="evaluation, loss")
                with precision.autocast():
                    logits = self.stage.head(precision.from_wire(hidden))
                loss = FullModel.loss(logits, targets.to(ctx.device))
                total += float(loss) * targets.numel()
                count += targets.numel()
        return total / max(count, 1) if stage_index == 0 else None
