"""Local search over routes and dispatch priority, scored by the dispatcher's exact iteration time.

Every move keeps every constraint exact, so no state is ever invalid:
- *replica swap*: two microbatches that visit a stage on different replicas exchange them (TC1 loads kept);
- *stage exchange*: a visits s but not t, b visits t but not s: a takes t on b's replica and b takes s on
  a's (CC4 counts and TC1 loads kept; both paths re-sorted, so CC3 holds);
- *reorder*: swap two neighbouring stages of a path, or undo such a swap (CC3, at most max_swaps);
- *data node exchange*: two microbatches of different data nodes exchange data nodes (loads kept);
- *rank swap*: two microbatches exchange dispatch ranks (who goes first when they collide).

A move is kept when the score (iteration time, then the mean loop end as a tie-break that rewards
progress on a plateau) does not get worse. The budget is a number of evaluations, so a fixed seed gives
the same plan on any machine; a wall-clock deadline only cuts it short.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from scheduler.constraints import count_swaps
from scheduler.ordering import Compiled, Context, Outcome, Priority
from scheduler.problem import Problem
from topology.plan import Route

TIE_BREAK = 1e-3
FOCUS = 0.6


def score(outcome: Outcome) -> float:
    return outcome.makespan + TIE_BREAK * outcome.mean_done


class RouteSearch:
    def __init__(self, problem: Problem, *, node_stage: list[int], routes: list[Route], priority: Priority,
                 rng: np.random.Generator, reorder: bool = True):
        self.p, self.node_stage, self.rng, self.reorder = problem, node_stage, rng, reorder
        self.context = Context(problem, node_stage)
        self.routes = list(routes)
        if priority.planned is not None or priority.mb_rank is None:
            # Searching ranks needs a rank per microbatch: start from the planned or the id order.
            if priority.planned is not None:
                starts = [priority.planned.get(r.chain()[0][0], 0.0) for r in self.routes]
                rank = tuple(float(x) for x in np.argsort(np.argsort(starts, kind="stable"), kind="stable"))
                priority = Priority(kind_rank=(0.0, 0.0, 0.0), tail_weight=1.0, rank_weight=0.5)
            else:
                rank = tuple(float(r.microbatch) for r in self.routes)
            priority = replace(priority, planned=None, mb_rank=rank, rank_weight=priority.rank_weight or 0.25)
        self.priority = priority
        self.best, outcome = self.evaluate(self.routes, self.priority)
        self.hot = self.hotspots(self.routes, outcome)
        self.evals = 0

    def evaluate(self, routes: list[Route], priority: Priority) -> tuple[float, Outcome]:
        outcome = Compiled(self.p, self.node_stage, routes, self.context).dispatch(priority, record=False)
        return score(outcome), outcome

    @staticmethod
    def hotspots(routes: list[Route], outcome: Outcome) -> np.ndarray | None:
        """Where the work queued: per (microbatch, path position), the waits of its forward and backward
        there (the loss counts for position 0). Conflict-directed moves start where this is large."""
        if outcome.wait is None or not np.isfinite(outcome.makespan):
            return None
        width = max(len(r.stages) for r in routes)
        hot = np.zeros((len(routes), width))
        at = 0
        for index, r in enumerate(routes):
            k = len(r.stages)
            w = outcome.wait[at:at + 2 * k + 1]
            hot[index, 1:k] += w[1:k]  # forwards after the data node's (its wait is the memory cap's)
            hot[index, 1:k] += w[k + 1:2 * k][::-1]  # backwards, retracing
            hot[index, 0] += w[k] + w[2 * k]  # loss and stage 0's backward on the data node
            at += 2 * k + 1
        total = hot.sum()
        return hot.ravel() / total if total > 0 else None

    def propose(self):
        """A random valid move: (new routes, new priority), or None when the drawn move does not apply."""
        rng, routes = self.rng, self.routes
        m = len(routes)
        kind = rng.random()
        a, b = int(rng.integers(m)), int(rng.integers(m))
        focus = None
        if self.hot is not None and rng.random() < FOCUS:
            # Conflict-directed: move a microbatch at a position where work queued.
            cell = int(rng.choice(len(self.hot), p=self.hot))
            a, focus = divmod(cell, self.hot.size // m)
            if focus == 0:
                kind = rng.uniform(0.0, 0.25)  # queueing on the data node: rank or data node moves
            else:
                kind = rng.uniform(0.25, 1.0)
        ra, rb = routes[a], routes[b]
        if kind < 0.15:  # rank swap
            if a == b:
                return None
            rank = list(self.priority.mb_rank)
            rank[a], rank[b] = rank[b], rank[a]
            return routes, replace(self.priority, mb_rank=tuple(rank))
        if kind < 0.25:  # data node exchange
            if ra.data_node == rb.data_node:
                return None
            new = list(routes)
            new[a] = Route(ra.microbatch, rb.data_node, (rb.data_node, *ra.nodes[1:]), ra.stages)
            new[b] = Route(rb.microbatch, ra.data_node, (ra.data_node, *rb.nodes[1:]), rb.stages)
            return new, self.priority
        if len(ra.stages) < 2:
            return None
        i = focus if focus else int(rng.integers(1, len(ra.stages)))
        s = ra.stages[i]
        if kind < 0.55:  # replica swap at stage s
            j = rb.stages.index(s) if s in rb.stages else -1
            if j < 0 or rb.nodes[j] == ra.nodes[i]:
                return None
            new = list(routes)
            new[a] = _with(ra, i, s, rb.nodes[j])
            new[b] = _with(rb, j, s, ra.nodes[i])
            return new, self.priority
        if kind < 0.8:  # stage exchange
            j = int(rng.integers(1, len(rb.stages))) if len(rb.stages) > 1 else 0
            t = rb.stages[j]
            if a == b or not j or t in ra.stages or s in rb.stages:
                return None
            new = list(routes)
            new[a] = _sorted(_with(ra, i, t, rb.nodes[j]))
            new[b] = _sorted(_with(rb, j, s, ra.nodes[i]))
            return new, self.priority
        # reorder: swap the neighbours at (i, i + 1) if the result is a valid CC3 sequence
        if not self.reorder or i + 1 >= len(ra.stages):
            return None
        stages, nodes = list(ra.stages), list(ra.nodes)
        stages[i], stages[i + 1] = stages[i + 1], stages[i]
        nodes[i], nodes[i + 1] = nodes[i + 1], nodes[i]
        swaps = count_swaps(stages)
        if swaps is None or swaps > self.p.max_swaps:
            return None
        new = list(routes)
        new[a] = Route(ra.microbatch, ra.data_node, tuple(nodes), tuple(stages))
        return new, self.priority

    def run(self, max_evals: int, deadline=None, progress=None, temperature: float = 0.0
            ) -> tuple[list[Route], Priority, float]:
        """Annealing from `temperature` seconds down to zero (plain descent at 0); returns the best seen."""
        tries = 0
        current = self.best
        state = (self.routes, self.priority)
        best_state = state
        while self.evals < max_evals and tries < 20 * max_evals:
            tries += 1
            move = self.propose()
            if move is None:
                continue
            routes, priority = move
            value, outcome = self.evaluate(routes, priority)
            self.evals += 1
            temp = temperature * (1.0 - self.evals / max_evals)
            if value <= current + 1e-12 or (temp > 0 and self.rng.random() < np.exp((current - value) / temp)):
                self.routes, self.priority, current = routes, priority, value
                self.hot = self.hotspots(routes, outcome)
                if value < self.best:
                    self.best, best_state = value, (routes, priority)
            if progress is not None and self.evals % 200 == 0:
                progress(self.evals, max_evals, self.best)
            if deadline is not None and self.evals % 16 == 0 and deadline():
                break
        self.routes, self.priority = best_state
        return self.routes, self.priority, self.best


def _with(route: Route, index: int, stage: int, node: int) -> Route:
    stages, nodes = list(route.stages), list(route.nodes)
    stages[index], nodes[index] = stage, node
    return Route(route.microbatch, route.data_node, tuple(nodes), tuple(stages))


def _sorted(route: Route) -> Route:
    pairs = sorted(zip(route.stages[1:], route.nodes[1:]))
    return Route(route.microbatch, route.data_node, (route.data_node, *(n for _, n in pairs)),
                 (0, *(s for s, _ in pairs)))
