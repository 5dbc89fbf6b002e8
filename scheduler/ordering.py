"""Order (TC2): each node's sequence of work, chosen so that microbatches do not queue behind each other.

`Compiled.dispatch` runs the simulator's list scheduler (topology.dispatch) with the simulator's exact
time model, read from the cost model's cached matrices (one task at a time per node, latency + bytes /
bandwidth hops queued on the sender's uplink, the memory cap from a forward until its backward,
all-reduces once a stage's replicas finish) but with a *priority* of our choosing. The order
it executes, replayed strictly by topology.simulator, gives the same timings (a node never idles while
its next action in the order is ready, so strict replay starts every action at the same instant); the
strategies still score the final plan with the simulator itself.

Priorities are keys per action, smaller first (`Priority`): a class rank per kind (backward before loss
before forward frees memory soonest), a rank per microbatch (which microbatch goes first when two
collide), and optionally the arrival time. Different priorities give different collision resolutions;
the solver tries several and searches over microbatch ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scheduler.problem import Problem
from topology.dispatch import BACKWARD_FIRST, KINDS, list_schedule
from topology.plan import Action, Route


@dataclass(frozen=True)
class Priority:
    kind_rank: tuple[float, float, float] = BACKWARD_FIRST  # F, L, B: backward first (frees memory)
    by_arrival: bool = True  # ties then go to the earliest arrival (the simulator's default)
    mb_rank: tuple[float, ...] | None = None  # per microbatch; None: by id (launch order)
    tail_weight: float = 0.0  # > 0: prefer actions with more work left on their loop (critical path)
    rank_weight: float = 0.0  # > 0: the microbatch rank counts before the arrival time
    planned: dict | None = field(default=None, compare=False)  # Action -> planned start: follow a timed plan


@dataclass
class Outcome:
    makespan: float  # iteration time: last compute or all-reduce end
    order: dict[int, list[Action]] | None  # None when the memory cap stalled the dispatch
    finish: np.ndarray  # per node: end of its last compute
    mean_done: float  # mean end of the microbatches' last backward (a smoother tie-break than makespan)
    wait: list[float] | None = None  # per action (Compiled numbering): start minus arrival of its input


class Context:
    """What does not change while routes are searched: the placement, all-reduce times, and each route's
    compiled actions (cached by route, so re-compiling after a move touches only the changed loops)."""

    def __init__(self, problem: Problem, node_stage: list[int]):
        self.problem, self.node_stage = problem, list(node_stage)
        cost = problem.cost
        self.stage_members = [[n for n, s in enumerate(node_stage) if s == st] for st in range(problem.num_stages)]
        self.allreduce = [cost.allreduce_s(st, m) if m else 0.0 for st, m in enumerate(self.stage_members)]
        self.fwd = cost.forward_s.tolist()
        self.bwd = (cost.forward_s * cost.backward_factor).tolist()
        self.loss = cost.loss_s.tolist()
        self.serialise = cost.serialise_matrix_s.tolist()
        self.latency = cost.latency_matrix_s.tolist()
        self.cache: dict[Route, tuple] = {}

    def segment(self, route: Route) -> tuple:
        seg = self.cache.get(route)
        if seg is None:
            chain = route.chain()
            kinds = [KINDS.index(a.kind) for a, _ in chain]
            stages = [a.stage for a, _ in chain]
            nodes = [n for _, n in chain]
            durs = [self.fwd[s][n] if k == 0 else self.loss[n] if k == 1 else self.bwd[s][n]
                    for k, s, n in zip(kinds, stages, nodes)]
            tails = list(np.cumsum(durs[::-1])[::-1])
            dst = nodes[1:] + nodes[-1:]
            remote = [a != b for a, b in zip(nodes, dst)]
            ser = [self.serialise[a][b] if r else 0.0 for a, b, r in zip(nodes, dst, remote)]
            lat = [self.latency[a][b] if r else 0.0 for a, b, r in zip(nodes, dst, remote)]
            seg = self.cache[route] = (kinds, stages, nodes, durs, tails, ser, lat, remote)
        return seg


class Compiled:
    """A placement and its routes as flat lists (actions numbered loop by loop)."""

    def __init__(self, problem: Problem, node_stage: list[int], routes: list[Route], context: Context | None = None):
        self.context = context if context is not None else Context(problem, node_stage)
        self.problem, self.node_stage, self.routes = problem, node_stage, routes
        self.num_nodes = problem.topology.num_nodes
        self.stage_members, self.allreduce = self.context.stage_members, self.context.allreduce
        kind, stage, node, mb, dur, tail, ser, lat, remote, last = [], [], [], [], [], [], [], [], [], []
        self.first_action = []
        for r in routes:
            k, s, n, d, t, se, la, re = self.context.segment(r)
            self.first_action.append(len(kind))
            kind += k
            stage += s
            node += n
            dur += d
            tail += t
            ser += se
            lat += la
            remote += re
            mb += [r.microbatch] * len(k)
            last += [False] * (len(k) - 1) + [True]
        self.kind, self.stage, self.node, self.mb = kind, stage, node, mb
        self.dur, self.tail, self.serialise, self.latency = dur, tail, ser, lat
        self.remote, self.is_last = remote, last
        self.num_actions = len(kind)

    def action(self, i: int) -> Action:
        return Action(KINDS[self.kind[i]], int(self.mb[i]), int(self.stage[i]))

    def keys(self, priority: Priority) -> list[float]:
        if priority.planned is not None:
            return [priority.planned[self.action(i)] for i in range(self.num_actions)]
        rank = np.arange(len(self.routes), dtype=float) if priority.mb_rank is None else np.asarray(priority.mb_rank)
        rank = rank / (rank.max() + 1.0) if len(rank) else rank
        key = np.asarray(priority.kind_rank)[self.kind] * 4.0
        if priority.tail_weight:
            tail = np.asarray(self.tail)
            key = key - priority.tail_weight * tail / (tail.max() + 1e-12)
        return (key + priority.rank_weight * rank[self.mb]).tolist()

    def dispatch(self, priority: Priority = Priority(), *, memory: int | None = None,
                 record: bool = True) -> Outcome:
        """Greedy list scheduling (topology.dispatch) under `priority`; see the module docstring."""
        memory = self.problem.memory if memory is None else memory
        rank = (np.arange(len(self.routes), dtype=float) if priority.mb_rank is None
                else np.asarray(priority.mb_rank, dtype=float)).tolist()
        mb_of, dur, last = self.mb, self.dur, self.is_last
        serialise, latency, remote = self.serialise, self.latency, self.remote
        uplink = [0.0] * self.num_nodes
        finish = [0.0] * self.num_nodes
        order: list[list[int]] = [[] for _ in range(self.num_nodes)]
        done_time = [0.0] * len(self.routes)
        arrived = [0.0] * self.num_actions
        wait = [0.0] * self.num_actions

        def execute(a: int, node: int, now: float) -> tuple[float, float | None]:
            # The simulator's time model on the cached flat lists: the sender's uplink queues its messages.
            wait[a] = now - arrived[a]
            end = finish[node] = now + dur[a]
            if record:
                order[node].append(a)
            if last[a]:
                done_time[mb_of[a]] = end
                return end, None
            if remote[a]:
                send = end if end > uplink[node] else uplink[node]
                uplink[node] = send + serialise[a]
                arrive = uplink[node] + latency[a]
            else:
                arrive = end
            arrived[a + 1] = arrive
            return end, arrive

        stuck = list_schedule(num_nodes=self.num_nodes, first=self.first_action, node_of=self.node, kind=self.kind,
                              key=self.keys(priority), tie=[rank[m] for m in mb_of], by_arrival=priority.by_arrival,
                              memory=memory, execute=execute)
        fin = np.array(finish)
        if stuck:
            return Outcome(float("inf"), None, fin, float("inf"))
        makespan = float(fin.max())
        for st, members in enumerate(self.stage_members):
            if members:
                makespan = max(makespan, float(fin[members].max()) + self.allreduce[st])
        out = {node: [self.action(a) for a in acts] for node, acts in enumerate(order)} if record else None
        return Outcome(makespan, out, fin, float(np.mean(done_time)) if done_time else 0.0, wait)


def candidate_priorities(num_mb: int, rng: np.random.Generator, extra_random: int = 0) -> list[Priority]:
    """A few collision-resolution rules worth trying on any workload, plus seeded random microbatch ranks."""
    none = (0.0, 0.0, 0.0)
    rules = [
        Priority(),  # the simulator's default: backward, loss, forward; earliest arrival first
        Priority(by_arrival=False),  # same classes, oldest microbatch first
        Priority(kind_rank=none, by_arrival=False, rank_weight=1.0),  # strictly oldest microbatch first
        Priority(kind_rank=(2.0, 0.0, 1.0), by_arrival=False),  # loss first: turn the loop around
        Priority(kind_rank=none, tail_weight=1.0),  # most loop left first (critical path), then arrival
        Priority(kind_rank=none, tail_weight=1.0, by_arrival=False),  # same, then oldest
        Priority(kind_rank=none, tail_weight=1.0, rank_weight=0.25),  # blend of both
    ]
    for _ in range(extra_random):
        rules.append(Priority(kind_rank=none, tail_weight=1.0, rank_weight=0.5,
                              mb_rank=tuple(rng.permutation(num_mb).astype(float))))
    return rules
