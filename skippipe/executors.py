"""Where a plan's iteration runs: the whole model in this process (path-faithful) or one stage per rank.

The trainer (trainer.py) runs the same steps whichever executor it has; everything that differs
between one process and a distributed run is here, behind the same methods:

    build(plan, spec, seed=, context=, precision=)   the stages this process holds (stage index -> module)
    data_nodes(plan)                      the plan nodes whose data streams this process draws
    run_iteration(batches, plan, step=)   forward and backward of every microbatch this process runs
    switch(plan)                          run `plan` from the next iteration (same placement; a re-plan)
    share_json(make, what)                rank 0's make() on every process, as JSON
    sum_over_replicas(stage, flat)        a stage's flat gradient summed over its replicas, in place
    sum_over_ranks(tensor)                a value summed over the processes, in place
    counted_stages                        the stages whose gradient norm this process counts
    evaluate(batches)                     the full model's mean token loss, on every process
    gather_rows(t, what), gather_json(x, what)  every process's value, in rank order
    barrier()                             wait for every process
    rank, device, write_stages            rank 0 reports; the stages whose checkpoint files it writes
    claims_run_dir                        whether the trainer claims the run dir (rank 0 of a distributed
                                          job claims it at start-up: elastic.decide_resume)
    where()                               who this process is, for the log
"""
from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from topology.plan import Plan, dependencies, sequential_order
from skippipe.comm import all_gather_json, broadcast_json, connect_peers, peer_errors, wait_for
from skippipe.context import Context
from skippipe.model import FullModel, Stage
from skippipe.precision import Precision, resolve_precision
from skippipe.worker import IterationResult, Worker, run_action
from topology.model_spec import ModelSpec

Batches = dict[int, tuple[torch.Tensor, torch.Tensor]]


class LocalExecutor:
    """Path-faithful single-process mode: the whole model on one device, each microbatch along its own path.

    The same plan, data, loss and gradient semantics as the distributed run (Note [gradient scaling] in
    sync.py), without communication: a feature for studying a plan's convergence without a cluster, and
    the reference the distributed run is tested against.
    """
    rank = 0
    write_stages = None  # every stage: this process holds them all
    claims_run_dir = True  # Note [run dir ownership] in rundir.py

    def __init__(self, device: torch.device):
        self.device = device

    def build(self, plan: Plan, spec: ModelSpec, *, seed: int, context: int,
              precision: Precision | None = None) -> dict[int, nn.Module]:
        self.plan = plan
        self.precision = precision or resolve_precision("fp32", self.device)
        self.model = FullModel(spec, plan.num_stages, seed, self.device)
        self.stages = dict(enumerate(self.model.stages))
        self.counted_stages = set(self.stages)
        return self.stages

    def data_nodes(self, plan: Plan) -> list[int]:
        return [n.id for n in plan.nodes]

    def switch(self, plan: Plan) -> None:
        """Run `plan` from the next iteration: the whole model is here, so only the paths change."""
        self.plan = plan

    def share_json(self, make, what: str):
        """One process: make() is the value."""
        return make()

    def run_iteration(self, batches: Batches, plan: Plan | None = None, *, step: int | None = None) -> IterationResult:
        """Every node's actions of `plan` (None: the built one; another plan of the same model may differ step
        by step: skippipe/path_schedule.py), each node in its plan order, as the distributed run executes them.

        Note [one process, every node]: each action is computed by worker.run_action, the distributed
        worker's own code, on the message its producer would have sent (hidden states rounded to the wire
        dtype: Note [mixed precision]), and each node accumulates its gradient in its own buffer, in its
        own order. The stage's gradient is then the sum of its replicas' buffers, as the data-parallel
        all-reduce makes it. So the two modes run the same float operations in the same order: their
        losses and gradients are bit for bit equal where a stage has at most two replicas (a + b is
        exact either way round; beyond two, the all-reduce's summation order is gloo's or NCCL's own).
        Nodes take turns greedily; an order that can never finish is a RuntimeError naming the stuck nodes.
        """
        plan = plan or self.plan
        result = IterationResult(losses={})
        order = plan.order or sequential_order(plan.paths)
        queues = {node: deque(actions) for node, actions in sorted(order.items())}
        consumer = {a: b for path in plan.paths for a, _, b, _ in dependencies(path)}
        stage_of = {n.id: n.stage for n in plan.nodes}
        params = {s: list(module.parameters()) for s, module in self.stages.items()}
        inbox: dict = {}  # consuming action -> the message its producer sent
        saved: dict[int, dict] = {node: {} for node in queues}
        grads: dict[int, list[torch.Tensor | None]] = {}  # node -> its replica's gradient buffers
        while any(queues.values()):
            progressed = False
            for node, queue in queues.items():
                stage_index = stage_of[node]
                while queue and (queue[0] in inbox or (queue[0].kind == "F" and queue[0].stage == 0)):
                    action = queue.popleft()
                    mb = action.microbatch
                    received = inbox.pop(action) if action in inbox else batches[mb][0].to(self.device)
                    targets = batches[mb][1].to(self.device) if action.kind == "L" else None
                    start = time.time()
                    _load_grads(params[stage_index], grads.pop(node, None))
                    outgoing, loss = run_action(self.stages[stage_index], action, received, targets=targets,
                                                saved=saved[node], precision=self.precision)
                    grads[node] = [p.grad for p in params[stage_index]]
                    end = time.time()
                    if loss is not None:
                        result.losses[mb] = loss
                    if outgoing is not None:
                        inbox[consumer[action]] = outgoing.detach()  # what the wire carries: no graph
                    result.compute_s += end - start
                    result.timeline.append((str(action), start, end))
                    progressed = True
            if not progressed:
                stuck = {node: str(queue[0]) for node, queue in queues.items() if queue}
                raise RuntimeError(f"the plan's order cannot finish: nodes wait on each other at {stuck}")
        for stage_index, stage_params in params.items():  # the replicas' sum, as the all-reduce makes it
            total = None
            for buffers in (grads[node] for node in plan.stage_nodes(stage_index) if node in grads):
                total = buffers if total is None else [
                    a if b is None else b if a is None else a + b for a, b in zip(total, buffers)]
            _load_grads(stage_params, total)
        return result

    def sum_over_replicas(self, stage: int, flat: torch.Tensor) -> None:
        """One process holds one copy of each stage: its sum over replicas is itself."""

    def sum_over_ranks(self, tensor: torch.Tensor) -> None:
        """One process: the sum is the value."""

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean token loss of the full model (every stage, in order), as Worker.evaluate computes it."""
        total, count = 0.0, 0
        for inputs, targets in batches:
            with self.precision.autocast():
                logits = self.model.forward_path(inputs.to(self.device), range(self.model.num_stages),
                                                 boundary=self.precision.boundary)
            loss = FullModel.loss(logits, targets.to(self.device))
            total += float(loss) * targets.numel()
            count += targets.numel()
        return total / max(count, 1)

    def gather_rows(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        return [tensor]

    def gather_json(self, value, what: str) -> list:
        return [value]

    def barrier(self) -> None:
        """Nothing to wait for."""

    def where(self) -> str:
        return "single process | "


def _load_grads(params: list[nn.Parameter], buffers: list[torch.Tensor | None] | None) -> None:
    """Make `buffers` (None: no gradient yet) the parameters' .grad. Holding no other reference once it
    returns lets autograd add the next gradient in place, as it does on a rank."""
    for p, g in zip(params, buffers or [None] * len(params)):
        p.grad = g


class DistributedExecutor:
    """One stage per rank (ctx.stage), the rank's node's actions in plan order (worker.Worker); every wait
    on a peer bounded by ctx.timeout. Collective methods must be called by every rank in the same order."""

    claims_run_dir = False  # rank 0 claimed it before the plan was shared (elastic.decide_resume)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.rank, self.device = ctx.rank, ctx.device
        # Replicas hold equal values: the stage's lowest rank counts its norm and writes its files.
        self.counted_stages = {ctx.stage} if ctx.is_stage_leader else set()
        self.write_stages = set(self.counted_stages)

    def build(self, plan: Plan, spec: ModelSpec, *, seed: int, context: int,
              precision: Precision | None = None) -> dict[int, nn.Module]:
        ctx = self.ctx
        self.stages = {ctx.stage: Stage(spec, ctx.stage, plan.num_stages, seed, ctx.device)}
        self.message_shape, self.precision = (plan.microbatch_size, context, spec.dim), precision
        self.worker = Worker(plan, ctx, self.stages[ctx.stage], self.message_shape, precision)
        # The ring of stage leaders that evaluation walks, and every pair a path uses (below).
        leaders = [ctx.stage_ranks[s][0] for s in range(plan.num_stages)]
        self.connected: set[tuple[int, int]] = set()
        self._connect(plan, set(zip(leaders, leaders[1:] + leaders[:1])))
        return self.stages

    def _connect(self, plan: Plan, extra: set[tuple[int, int]] = frozenset()) -> None:
        """Connect every pair a path of `plan` uses (wrapping back to the data node for the loss) that is
        not connected yet; every rank calls it with the same plan (comm.connect_peers)."""
        ctx = self.ctx
        pairs = {(ctx.node_rank[a], ctx.node_rank[b]) for p in plan.paths for a, b in zip(p.nodes, p.nodes[1:] + p.nodes[:1])}
        pairs = {(min(a, b), max(a, b)) for a, b in pairs | set(extra) if a != b} - self.connected
        connect_peers(ctx, pairs)
        self.connected |= pairs

    def switch(self, plan: Plan) -> None:
        """Run `plan` from the next iteration. Its placement must be the one in force (a re-plan moves no
        weights): this rank keeps its stage module and optimizer; only its order and messages change.
        Every rank calls it at the same step boundary (collective: new pairs are connected)."""
        if plan.node_of_rank(self.rank).stage != self.ctx.stage:
            raise ValueError(f"rank {self.rank}: the new plan moves it from stage {self.ctx.stage} to "
                             f"{plan.node_of_rank(self.rank).stage}; moving stages needs the elastic restart")
        self.worker = Worker(plan, self.ctx, self.stages[self.ctx.stage], self.message_shape, self.precision)
        self._connect(plan)

    def share_json(self, make, what: str):
        """make() on rank 0, its JSON value on every rank (Note [no pickles from peers]); collective."""
        with peer_errors(what):
            return broadcast_json(make() if self.rank == 0 else None, src=0)

    def data_nodes(self, plan: Plan) -> list[int]:
        return [self.ctx.node.id]

    def run_iteration(self, batches: Batches, plan: Plan | None = None, *, step: int | None = None) -> IterationResult:
        """The built (or switched-to) plan's actions of this rank's node; the trainer refuses schedules that
        switch plans here. `step` (1-based) for ctx.slowdown."""
        return self.worker.run_iteration(batches, step=step)

    def sum_over_replicas(self, stage: int, flat: torch.Tensor) -> None:
        group = self.ctx.stage_groups.get(stage)
        if group is not None and dist.get_world_size(group) > 1:
            wait_for(dist.all_reduce(flat, group=group, async_op=True), self.ctx.timeout,
                     f"all-reducing the gradients of stage {stage}")

    def sum_over_ranks(self, tensor: torch.Tensor) -> None:
        wait_for(dist.all_reduce(tensor, async_op=True), self.ctx.timeout, "all-reducing the gradient norm")

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The full model's loss, known on stage 0's lowest rank, on every rank (the others add zero; the
        trainer calls this only with batches, so a zero here never stands in for "not measured")."""
        value = self.worker.evaluate(batches)
        tensor = torch.tensor([value or 0.0], dtype=torch.float64, device=self.device)
        wait_for(dist.all_reduce(tensor, async_op=True), self.ctx.timeout, "sharing the validation loss")
        return float(tensor)

    def gather_rows(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        rows = [torch.zeros_like(tensor) for _ in range(self.ctx.world_size)]
        wait_for(dist.all_gather(rows, tensor, async_op=True), self.ctx.timeout, what)
        return rows

    def gather_json(self, value, what: str) -> list:
        """JSON, not all_gather_object: nothing from a peer is unpickled (Note [no pickles from peers])."""
        with peer_errors(what):
            return all_gather_json(value)

    def barrier(self) -> None:
        wait_for(dist.all_reduce(torch.zeros(1, device=self.device), async_op=True), self.ctx.timeout,
                 "waiting for every rank")

    def where(self) -> str:
        node = self.ctx.node
        return f"rank {self.rank} | node {node.id} ({node.name}) | "
