"""Discrete-event replay of a plan on a topology with the cost model.

Rules (docs/design.md, "Cost model"; issue 2): one compute task at a time per node; a hop costs latency +
bytes / bandwidth (topology.cost), and a node's outgoing transfers queue on its uplink (switchable; or,
with share_link, only the messages on one link queue, each link a FIFO of its own, as when every pair is
shaped apart); a node holds at most `memory` microbatches' activations (from a forward until its
backward); each stage's data-parallel all-reduce starts once all its replicas have finished their
backwards.

Two modes. Given an order, each node runs it strictly in sequence, exactly as the runtime does, so the
result is the plan's prediction. Without one, the greedy list scheduler (topology.dispatch) lets each free
node take the ready action of highest priority (backward, then loss, then forward; earliest arrival
first) and the order it ran is returned: this is how the solver turns paths into a collision-aware order
(TC2).
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from topology.cost import CostModel
from topology.dispatch import BACKWARD_FIRST, KINDS, list_schedule
from topology.errors import ConfigError
from topology.plan import Action, Workload


@dataclass(frozen=True)
class Event:
    node: int
    kind: str  # "compute" | "send" | "allreduce"
    name: str
    start: float
    end: float


@dataclass
class SimResult:
    iteration_s: float
    busy_s: list[float]
    idle_s: list[float]
    bubble_share: float
    bytes_moved: float
    allreduce_s: list[float]
    order: dict[int, list[Action]]
    events: list[Event] = field(repr=False)

    def to_dict(self, cost: CostModel | None = None) -> dict:
        out = {"iteration_s": self.iteration_s, "bubble_share": self.bubble_share, "bytes_moved": self.bytes_moved,
               "allreduce_s": self.allreduce_s,
               "nodes": [{"id": i, "busy_s": b, "idle_s": d} for i, (b, d) in enumerate(zip(self.busy_s, self.idle_s))]}
        if cost is not None:
            out["assumptions"] = cost.assumptions()
        return out


class _Run:
    """Shared bookkeeping of both modes: durations, message arrival, uplink queues, results."""

    def __init__(self, workload: Workload, *, cost: CostModel, memory: int | None, share_uplink: bool,
                 share_link: bool = False):
        n = len(workload.node_stage)
        if cost.topology.num_nodes != n:
            raise ConfigError(f"the plan has {n} nodes but the topology {cost.topology.name!r} has "
                              f"{cost.topology.num_nodes}; simulate it on the topology it was made for")
        if cost.num_stages != workload.num_stages:
            raise ConfigError(f"the plan has {workload.num_stages} stages but the cost model was built for {cost.num_stages}")
        self.w, self.cost, self.memory, self.share_uplink = workload, cost, memory, share_uplink
        self.share_link = share_link
        self.link_free: dict[tuple[int, int], float] = defaultdict(float)
        self.num_nodes = n
        self.next: dict[Action, tuple[Action, int]] = {}
        self.node_of: dict[Action, int] = {}
        self.needs_input: set[Action] = set()
        for route in workload.routes:
            chain = route.chain()
            for (a, na), (b, nb) in zip(chain, chain[1:]):
                self.next[a] = (b, nb)
                self.needs_input.add(b)
            for a, na in chain:
                if a in self.node_of:
                    raise ConfigError(f"action {a} appears twice; each microbatch visits a stage at most once")
                if not 0 <= na < n or workload.node_stage[na] != a.stage and a.kind != "L":
                    raise ConfigError(f"microbatch {a.microbatch}: node {na} does not serve stage {a.stage}")
                self.node_of[a] = na
        self.arrival: dict[Action, float] = {}
        self.uplink_free = [0.0] * n
        self.busy = [0.0] * n
        self.finish = [0.0] * n
        self.events: list[Event] = []
        self.executed: dict[int, list[Action]] = defaultdict(list)
        self.bytes_moved = 0.0

    def duration(self, a: Action, node: int) -> float:
        if a.kind == "F":
            return float(self.cost.forward_s[a.stage, node])
        if a.kind == "B":
            return self.cost.backward_s(a.stage, node)
        return float(self.cost.loss_s[node])

    def run(self, a: Action, node: int, start: float) -> float:
        """Execute `a` on `node` from `start`; deliver its output; return its end time."""
        end = start + self.duration(a, node)
        self.busy[node] += end - start
        self.finish[node] = end
        self.executed[node].append(a)
        self.events.append(Event(node, "compute", str(a), start, end))
        if a in self.next:
            b, dst = self.next[a]
            if dst == node:
                self.arrival[b] = end
            else:
                serialise = self.cost.serialise_matrix_s[node, dst]
                send = max(end, self.uplink_free[node]) if self.share_uplink else end
                if self.share_link:
                    send = max(send, self.link_free[node, dst])
                self.uplink_free[node] = self.link_free[node, dst] = send + serialise
                self.arrival[b] = send + serialise + self.cost.latency_matrix_s[node, dst]
                self.bytes_moved += self.cost.activation_bytes
                self.events.append(Event(node, "send", f"{a}->{dst}", send, self.arrival[b]))
        return end

    def result(self) -> SimResult:
        stage_nodes: dict[int, list[int]] = defaultdict(list)
        for node, stage in enumerate(self.w.node_stage):
            stage_nodes[stage].append(node)
        end = max(self.finish, default=0.0)
        allreduce = []
        for stage in range(self.w.num_stages):
            nodes = stage_nodes.get(stage, [])
            start = max((self.finish[n] for n in nodes), default=0.0)
            seconds = self.cost.allreduce_s(stage, nodes) if nodes else 0.0
            allreduce.append(seconds)
            if len(nodes) > 1:
                k = len(nodes)
                self.bytes_moved += 2 * (k - 1) * self.cost.grad_bytes(stage)
                self.events += [Event(n, "allreduce", f"allreduce stage {stage}", start, start + seconds) for n in nodes]
            end = max(end, start + seconds)
        idle = [end - b for b in self.busy]
        share = sum(idle) / (end * self.num_nodes) if end > 0 else 0.0
        return SimResult(end, list(self.busy), idle, share, self.bytes_moved, allreduce, dict(self.executed), self.events)


def simulate(workload: Workload, *, cost: CostModel, memory: int | None = None, share_uplink: bool = True,
             share_link: bool = False) -> SimResult:
    """Replay `workload` on `cost`'s topology: strictly in its order, or (order None) by greedy dispatch.

    memory: microbatches' activations a node may hold (None: no cap); share_uplink: a node's sends queue
    on its uplink; share_link: sends queue per link instead. Raises ConfigError for a workload that does not
    fit the topology, an order that deadlocks, or a memory cap no order fits.
    """
    run = _Run(workload, cost=cost, memory=memory, share_uplink=share_uplink, share_link=share_link)
    if workload.order is None:
        _dispatch(run)
    else:
        _replay(run, workload.order)
    return run.result()


def _replay(run: _Run, order: dict[int, list[Action]]) -> None:
    """Each node runs its order strictly in sequence; an action waits for its input to arrive."""
    placed = {a: node for node, actions in order.items() for a in actions}
    missing = [a for a in run.node_of if placed.get(a) != run.node_of[a]]
    if missing:
        a = missing[0]
        raise ConfigError(f"the order does not place {a} on node {run.node_of[a]} as its path requires")
    cursor = {node: 0 for node in order}
    free = defaultdict(float)
    waiting: dict[Action, int] = {}  # input action -> node blocked on it
    queue = deque(order)
    while queue:
        node = queue.popleft()
        actions = order[node]
        while cursor[node] < len(actions):
            a = actions[cursor[node]]
            if a in run.needs_input and a not in run.arrival:
                waiting[a] = node
                break
            free[node] = run.run(a, node, max(free[node], run.arrival.get(a, 0.0)))
            cursor[node] += 1
            if a in run.next:
                b, _ = run.next[a]
                if b in waiting:
                    queue.append(waiting.pop(b))
    stalled = [str(order[n][cursor[n]]) for n in sorted(order) if cursor[n] < len(order[n])]
    if stalled:
        raise ConfigError(f"the plan deadlocks: {', '.join(stalled[:5])} wait forever; fix the order or re-solve")


def _dispatch(run: _Run) -> None:
    """Greedy list scheduling (topology.dispatch): whenever a node is idle it starts its ready action of
    highest priority: backward, then loss, then forward; earliest arrival, then lowest microbatch first."""
    chains = [route.chain() for route in run.w.routes]
    actions = [a for chain in chains for a, _ in chain]
    first, at = [], 0
    for chain in chains:
        first.append(at)
        at += len(chain)
    kind = [KINDS.index(a.kind) for a in actions]

    def execute(i: int, node: int, start: float) -> tuple[float, float | None]:
        a = actions[i]
        end = run.run(a, node, start)
        return end, (run.arrival[run.next[a][0]] if a in run.next else None)

    stuck = list_schedule(num_nodes=run.num_nodes, first=first,
                          node_of=[run.node_of[a] for a in actions], kind=kind,
                          key=[BACKWARD_FIRST[k] for k in kind], tie=[a.microbatch for a in actions],
                          by_arrival=True, memory=run.memory, execute=execute)
    if stuck:
        names = sorted(str(actions[i]) for i in stuck)[:5]
        raise ConfigError(f"no order fits the memory cap of {run.memory} microbatches: {', '.join(names)} can never "
                          f"start; raise --memory or use fewer microbatches per data node")
