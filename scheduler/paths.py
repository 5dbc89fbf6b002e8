"""Paths: each microbatch's stages (CC1-CC4) and the replica that serves each visited stage (TC1).

Microbatches are dealt round-robin to the data nodes (stage 0's replicas), so microbatch ids follow
launch order. Then, one microbatch at a time:

1. its *stage set*: CC4 fixes how often every stage is visited (`stage_targets`); the set must contain
   every stage whose remaining visits equal the remaining microbatches and no stage with none left.
   Any such set keeps the rest feasible (column sums <= rows, total = rows x K: a 0-1 matrix exists).
2. its *order*: the sorted set, or a variant with disjoint neighbouring swaps (CC3, <= max_swaps).
3. its *replicas*, among those that still have quota (`Quota`, TC1).

Three ways to choose among the candidates:
- `"timed"` (TC2, collision-aware): each candidate loop is walked through a reservation table of the work
  already planned (scheduler.timeline), each hop to the replica where the work would finish first; the
  loop that completes first wins and its work is reserved. The reserved start times are kept
  (`PathBuilder.planned`) and later serve as the dispatch priority.
- `"cost"` (no TC2): the cheapest loop by hops both ways plus compute, replicas by dynamic programming
  over the sequence; blind to what other microbatches do at the same time.
- `"random"`: network-blind, the baseline.
Every choice keeps CC2-CC4 and TC1 exact, so no repair step is needed.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from scheduler.problem import Problem
from scheduler.timeline import Timeline
from topology.plan import Action, Route

ENUMERATE_LIMIT = 64  # stage sets per microbatch beyond which candidates are sampled
# Work budgets for a whole path build (numpy steps in "cost" mode, reservation look-ups in "timed" mode),
# spread over the microbatches: a few seconds at 1,000 nodes, milliseconds at 20.
COST_STEPS = 60_000
TIMED_FITS = 200_000


def stage_targets(num_stages: int, num_mb: int, path_length: int, replicas: list[list[int]]) -> list[int]:
    """Visits per stage (CC4: equal within one); stage 0 is visited by every microbatch.

    The stages that take one visit more are those with the most replicas (least load per replica)."""
    if num_stages == 1:
        return [num_mb]
    base, extra = divmod(num_mb * (path_length - 1), num_stages - 1)
    roomy = sorted(range(1, num_stages), key=lambda s: (-len(replicas[s]), s))[:extra]
    return [num_mb] + [base + (1 if s in roomy else 0) for s in range(1, num_stages)]


@dataclass
class Quota:
    """TC1: a stage's visits spread over its replicas within one. With q, rem = divmod(visits, k), a replica
    may go to q + 1 only while fewer than rem replicas have; the capacities then sum to exactly the visits,
    so a replica is always available while the stage has visits left."""
    replicas: list[list[int]]
    targets: list[int]
    num_nodes: int

    def __post_init__(self):
        self.load = np.zeros(self.num_nodes, dtype=int)
        self.q = np.zeros(self.num_nodes, dtype=int)
        self.stage_of = np.zeros(self.num_nodes, dtype=int)
        self.rem, self.over = [], [0] * len(self.replicas)
        for s, nodes in enumerate(self.replicas):
            q, rem = divmod(self.targets[s], len(nodes))
            self.q[nodes] = q
            self.stage_of[nodes] = s
            self.rem.append(rem)

    def open(self, nodes: list[int]) -> np.ndarray:
        nodes = np.asarray(nodes)
        s = int(self.stage_of[nodes[0]])
        load, q = self.load[nodes], self.q[nodes]
        return (load < q) | ((load == q) & (self.over[s] < self.rem[s]))

    def take(self, node: int) -> None:
        if self.load[node] == self.q[node]:
            self.over[int(self.stage_of[node])] += 1
        self.load[node] += 1


def swap_variants(stages: tuple[int, ...], max_swaps: int, limit: int = 8) -> list[tuple[int, ...]]:
    """The sorted sequence and its variants with disjoint neighbouring swaps after stage 0 (CC3)."""
    out = [stages]
    k = len(stages)

    def grow(seq: list[int], start: int, used: int) -> None:
        for i in range(start, k - 1):
            if len(out) >= limit:
                return
            new = seq[:]
            new[i], new[i + 1] = new[i + 1], new[i]
            out.append(tuple(new))
            if used + 1 < max_swaps:
                grow(new, i + 2, used + 1)

    if max_swaps > 0:
        grow(list(stages), 1, 0)
    return out


class PathBuilder:
    """Builds routes one microbatch at a time under exact CC4 / TC1 bookkeeping."""

    def __init__(self, problem: Problem, *, node_stage: list[int], num_mb: int, rng: np.random.Generator,
                 choose: str = "cost", reorder: bool = True):
        self.p, self.rng, self.choose, self.reorder = problem, rng, choose, reorder
        self.S, self.K = problem.num_stages, problem.path_length - 1
        self.replicas = [[n for n, s in enumerate(node_stage) if s == st] for st in range(self.S)]
        self.num_mb = num_mb
        self.targets = stage_targets(self.S, num_mb, problem.path_length, self.replicas)
        self.remaining = np.array(self.targets[1:] if self.S > 1 else [], dtype=int)
        self.quota = Quota(self.replicas, self.targets, problem.topology.num_nodes)
        cost = problem.cost
        hop = cost.hop_matrix_s
        self.hop2 = hop + hop.T
        self.hop = hop
        self.comp = cost.forward_s * (1 + cost.backward_factor)
        self.fwd, self.bwd, self.loss = cost.forward_s, cost.forward_s * cost.backward_factor, cost.loss_s
        self.data_nodes = self.replicas[0]
        self.timeline = Timeline(problem.topology.num_nodes, problem.memory)
        self.planned: dict[Action, float] = {}  # timed mode: reserved start of every action
        # Candidate lists scale with the problem so that a build stays within seconds (COST_STEPS, TIMED_FITS).
        k = max(self.K, 1)
        width = max(len(r) for r in self.replicas[1:]) if self.S > 1 else 1
        self.max_replicas = int(min(width, 4 if width > 8 else width))
        per_candidate = k * (self.max_replicas if choose == "timed" else 1)
        budget = (TIMED_FITS if choose == "timed" else COST_STEPS) / max(num_mb, 1)
        candidates = int(np.clip(budget // per_candidate, 2, 8 * ENUMERATE_LIMIT))
        self.max_variants = 8 if candidates >= 4 * ENUMERATE_LIMIT else 3 if candidates >= 12 else 1
        self.max_sets = int(np.clip(candidates // self.max_variants, 1, ENUMERATE_LIMIT))

    def data_node(self, mb: int) -> int:
        return self.data_nodes[mb % len(self.data_nodes)]

    def candidate_sets(self, left: int) -> list[tuple[int, ...]]:
        stages = np.arange(1, self.S)
        must = [int(s) for s in stages[self.remaining == left]]
        free = [int(s) for s in stages[(self.remaining > 0) & (self.remaining < left)]]
        need = self.K - len(must)
        assert 0 <= need <= len(free), "CC4 bookkeeping lost feasibility"
        if self.choose == "random":
            pick = self.rng.choice(len(free), need, replace=False) if need else []
            return [tuple(sorted(must + [free[i] for i in pick]))]
        limit = self.max_sets
        if math.comb(len(free), need) <= limit:
            return [tuple(sorted(must + list(c))) for c in itertools.combinations(free, need)]
        # Too many to list: the sets of most remaining visits first, plus samples weighted by them.
        weights = self.remaining[np.array(free) - 1].astype(float)
        sets = {tuple(sorted(must + [free[i] for i in np.argsort(-weights, kind="stable")[:need]]))}
        for _ in range(limit - 1):
            pick = self.rng.choice(len(free), need, replace=False, p=weights / weights.sum())
            sets.add(tuple(sorted(must + [free[i] for i in pick])))
        return sorted(sets)

    def best_loop(self, data: int, stages: tuple[int, ...]) -> tuple[float, list[int]]:
        """Cheapest replicas for a stage sequence: DP over the sequence, hops both ways plus compute."""
        prev_nodes = np.array([data])
        dist = np.zeros(1)
        back = []
        for s in stages:
            nodes = np.array(self.replicas[s])
            ok = self.quota.open(nodes)
            step = dist[:, None] + self.hop2[np.ix_(prev_nodes, nodes)]
            arg = np.argmin(step, axis=0)
            dist = step[arg, np.arange(len(nodes))] + self.comp[s, nodes] + np.where(ok, 0.0, np.inf)
            back.append((prev_nodes, arg))
            prev_nodes = nodes
        dist = dist + self.hop2[prev_nodes, data]
        j = int(np.argmin(dist))
        total = float(dist[j])
        chosen = []
        for (_, arg), s in zip(reversed(back), reversed(stages)):
            chosen.append(int(np.array(self.replicas[s])[j]))
            j = int(arg[j])
        return total, chosen[::-1]

    def random_loop(self, stages: tuple[int, ...]) -> list[int]:
        out = []
        for s in stages:
            nodes = np.array(self.replicas[s])
            open_nodes = nodes[self.quota.open(nodes)]
            out.append(int(self.rng.choice(open_nodes)))
        return out

    def timed_loop(self, mb: int, data: int, stages: tuple[int, ...]):
        """Walk a loop through the reservation table; return (its end, its nodes, its reservations)."""
        tl, hop = self.timeline, self.hop
        start = tl.fit(data, 0.0, self.fwd[0, data], admit=True)
        book = [(Action("F", mb, 0), data, start, start + self.fwd[0, data])]
        here, t = data, start + self.fwd[0, data]
        nodes = []
        for s in stages:
            options = np.array(self.replicas[s])
            options = options[self.quota.open(options)]
            if len(options) > self.max_replicas:  # the nearest ones and those free soonest
                near = options[np.argsort(hop[here, options], kind="stable")[:self.max_replicas // 2]]
                soon = options[np.argsort([tl.busy[n][-1][1] if tl.busy[n] else 0.0 for n in options],
                                          kind="stable")[:self.max_replicas - len(near)]]
                options = np.unique(np.concatenate([near, soon]))
            best = None
            for n in options.tolist():
                begin = tl.fit(n, t + hop[here, n], self.fwd[s, n], admit=True)
                end = begin + self.fwd[s, n]
                if best is None or (end, hop[here, n]) < (best[1], best[2]):
                    best = (n, end, hop[here, n], begin)
            n, end, _, begin = best
            book.append((Action("F", mb, s), n, begin, end))
            nodes.append(n)
            here, t = n, end
        begin = tl.fit(data, t + hop[here, data], self.loss[data])
        book.append((Action("L", mb, 0), data, begin, begin + self.loss[data]))
        here, t = data, begin + self.loss[data]
        for n, s in zip(reversed([data] + nodes), reversed((0,) + stages)):
            begin = tl.fit(n, t + hop[here, n], self.bwd[s, n])
            book.append((Action("B", mb, s), n, begin, begin + self.bwd[s, n]))
            here, t = n, begin + self.bwd[s, n]
        return t, nodes, book

    def commit(self, book) -> None:
        forward_start = {}
        for action, node, begin, end in book:
            self.timeline.reserve(node, begin, end)
            self.planned[action] = begin
            if action.kind == "F":
                forward_start[node] = begin
            elif action.kind == "B":
                self.timeline.hold(node, forward_start[node], end)

    def next_route(self, mb: int) -> Route:
        data = self.data_node(mb)
        left = self.num_mb - mb
        sets = self.candidate_sets(left)
        if self.choose == "random":
            seq = sets[0]
            nodes = self.random_loop(seq)
        elif self.choose == "timed":
            best = None
            for stage_set in sets:
                variants = swap_variants(stage_set, self.p.max_swaps, self.max_variants) if self.reorder else [stage_set]
                for seq in variants:
                    end, nodes, book = self.timed_loop(mb, data, seq)
                    hops = sum(self.hop2[a, b] for a, b in zip((data, *nodes), (*nodes, data)))
                    value = (end, hops, self.rng.random())
                    if best is None or value < best[0]:
                        best = (value, seq, nodes, book)
            _, seq, nodes, book = best
            self.commit(book)
        else:
            best = None
            for stage_set in sets:
                variants = swap_variants(stage_set, self.p.max_swaps, self.max_variants) if self.reorder else [stage_set]
                for seq in variants:
                    value, nodes = self.best_loop(data, seq)
                    value += 1e-9 * self.rng.random()  # seeded tie-break
                    if best is None or value < best[0]:
                        best = (value, seq, nodes)
            _, seq, nodes = best
        for s in seq:
            self.remaining[s - 1] -= 1
        self.quota.take(data)
        for n in nodes:
            self.quota.take(n)
        return Route(mb, data, (data, *nodes), (0, *seq))


def build_routes(problem: Problem, *, node_stage: list[int], rng: np.random.Generator, choose: str = "cost",
                 reorder: bool = True) -> tuple[list[Route], dict[Action, float]]:
    """Every microbatch's route, and (timed mode) the planned start of each action."""
    num_mb = problem.microbatches_for(node_stage.count(0))
    builder = PathBuilder(problem, node_stage=node_stage, num_mb=num_mb, rng=rng, choose=choose, reorder=reorder)
    routes = [builder.next_route(mb) for mb in range(num_mb)]
    return routes, builder.planned
