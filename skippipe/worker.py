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


@dataclass
class IterationResult:
    losses: dict[int, torch.Tensor]  # microbatch -> its mean-token loss (computed on its data node)
    compute_s: float = 0.0
    wait_s: float = 0.0  # blocked on a peer's message
    timeline: list[tuple[str, float, float]] = field(default_factory=list)  # (action, start, end), time.time()


class Worker:
    """Executes one node's plan order (ctx.node) on its stage; messages of `message_shape` (microbatch size,
    context, model dim)."""

    def __init__(self, plan: Plan, ctx: Context, stage: Stage, message_shape: tuple[int, ...]):
        self.ctx, self.stage, self.plan = ctx, stage, plan
        self.node_id = ctx.node.id
        self.actions = list(plan.order.get(self.node_id, []))
        self.paths = {p.microbatch: p for p in plan.paths}
        dtype = next(stage.parameters()).dtype
        self.messenger = Messenger(plan, ctx, shape=message_shape, dtype=dtype)
        # Per-action timestamps need the device idle at each boundary; on CPU that is free.
        self._sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    def run_iteration(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> IterationResult:
        """Run this node's actions for one iteration; gradients accumulate unscaled (Note [gradient scaling])."""
        result = IterationResult(losses={})
        saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # microbatch -> (stage input, output)
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
            if action.kind == "F":
                if action.stage == 0:
                    inputs, hidden = None, self.stage.embed(received)
                else:
                    inputs = hidden = received.requires_grad_()
                output = self.stage(hidden)
                saved[mb] = (inputs, output)
                outgoing = output
            elif action.kind == "L":
                hidden = received.requires_grad_()
                loss = FullModel.loss(self.stage.head(hidden), batches[mb][1].to(device, non_blocking=True))
                loss.backward()
                result.losses[mb] = loss.detach()
                outgoing = hidden.grad
            else:
                inputs, output = saved.pop(mb)
                torch.autograd.backward(output, received)
                outgoing = inputs.grad if inputs is not None else None
            self._sync()
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
        dtype = next(self.stage.parameters()).dtype
        total, count = 0.0, 0
        for inputs, targets in batches:
            shape = (*inputs.shape, self.stage.spec.dim)
            if stage_index == 0:
                hidden = self.stage(self.stage.embed(inputs.to(ctx.device)))
            else:
                hidden = exchange(ctx, None, src=leaders[stage_index - 1], dst=rank, shape=shape, dtype=dtype,
                                  what=f"evaluation, stage {stage_index}")
                hidden = self.stage(hidden)
            after = leaders[(stage_index + 1) % len(leaders)]
            if after != rank:
                exchange(ctx, hidden, src=rank, dst=after, shape=shape, dtype=dtype, what="evaluation")
            if stage_index == 0:
                if leaders[-1] != rank:
                    hidden = exchange(ctx, None, src=leaders[-1], dst=rank, shape=shape, dtype=dtype,
                                      what="evaluation, loss")
                loss = FullModel.loss(self.stage.head(hidden), targets.to(ctx.device))
                total += float(loss) * targets.numel()
                count += targets.numel()
        return total / max(count, 1) if stage_index == 0 else None
