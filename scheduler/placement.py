"""Placement: which nodes serve which stage (the data-parallel groups), and how many nodes each stage gets.

The objective is the true iteration time: the pipeline part *and* each stage's gradient all-reduce, which
over a geo-distributed group can cost as much as the pipeline itself (a 134 MB gradient over a 0.1 Gbit/s
ring takes ~14 s, over a same-region ring well under one). See Note [placement estimate] for the fast
score, and `place` for the search: greedy bandwidth-clustered groups, region-chain groups (the full
pipeline's rule) as a second start, then pairwise-swap local search on the estimate. The strategies then
compare a few of the best placements with the simulator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scheduler.problem import Problem

# Note [placement estimate]
# T ~= max(T_work, T_loop) + max_s max(0, AR_s - slack_s), where
#  - T_work: the busiest stage; a stage's replicas share its visits evenly (TC1), so the slowest replica
#    of a stage sets its pace: visits_s / k_s * max_{n in stage s} (F + B (+ loss for stage 0));
#  - T_loop: a data node keeps at most `memory` microbatches in flight, so it needs n_d / memory round
#    trips of its loop: its own work + the visited stages' work + the hops there and back, the hops
#    taken as their expectation over a uniformly random skip set (P(s first), P(s, t consecutive), ...);
#  - AR_s: the ring all-reduce of the stage's gradient (CostModel.allreduce_s); it starts
#    when the stage's replicas finish, which for stage s > 0 is a few backwards before the iteration ends
#    (slack_s), so only what sticks out past the end counts.


def visit_share(num_stages: int, path_length: int) -> float:
    """Fraction of microbatches that visit a given stage other than 0 (CC4 spreads visits evenly)."""
    return (path_length - 1) / (num_stages - 1) if num_stages > 1 else 0.0


def work_per_visit(problem: Problem) -> list[float]:
    """Mean seconds a stage's replica spends per microbatch of the iteration (skipping included)."""
    cost, s = problem.cost, problem.num_stages
    share = visit_share(s, problem.path_length)
    work = [float(np.mean(cost.forward_s[0])) * (1 + cost.backward_factor) + float(np.mean(cost.loss_s))]
    return work + [share * float(np.mean(cost.forward_s[st])) * (1 + cost.backward_factor) for st in range(1, s)]


def proportional_sizes(problem: Problem, weights: list[float]) -> list[int]:
    """Nodes per stage in proportion to `weights` (each node to the stage with the most weight per replica),
    at least one per stage, and no more data nodes than microbatches when their number is fixed."""
    s, n = problem.num_stages, problem.topology.num_nodes
    sizes = [1] * s
    cap = [problem.num_microbatches or n] + [n] * (s - 1)
    for _ in range(n - s):
        open_stages = [st for st in range(s) if sizes[st] < cap[st]] or list(range(1, s)) or [0]
        busiest = max(open_stages, key=lambda st: (weights[st] / sizes[st], -st))
        sizes[busiest] += 1
    return sizes


def candidate_stage_sizes(problem: Problem) -> list[list[int]]:
    """Stage sizes worth trying when the user gives none: even, proportional to each stage's work, and
    blends. Stage 0 runs the embedding, the loss and every microbatch while another stage sees only a
    share when paths skip, so its work argues for more replicas; its all-reduce (the largest gradient)
    argues for fewer, better-connected ones. The estimate decides (`choose_stage_sizes`)."""
    work = np.asarray(work_per_visit(problem))
    out = []
    for blend in (0.0, 0.25, 0.5, 1.0):
        weights = (1 - blend) * np.ones_like(work) * work.mean() + blend * work
        sizes = proportional_sizes(problem, list(weights))
        if sizes not in out:
            out.append(sizes)
    return out


def choose_stage_sizes(problem: Problem) -> list[int]:
    """The candidate sizes whose greedy clustered placement has the best estimated iteration time.

    Without --microbatches the count follows the number of data nodes (memory x stage 0's size); the
    sizes are then compared at the count an even split would give, so that the choice is about how fast
    the same work runs, not about taking on more work."""
    best = None
    fixed = problem.num_microbatches or problem.microbatches_for(problem.even_stage_sizes()[0])
    for sizes in candidate_stage_sizes(problem):
        est = Estimator(problem, sizes, num_mb=fixed)
        order = sorted(range(problem.num_stages), key=lambda st: (st != 0, -sizes[st], st))
        est.start(grown_groups(problem, sizes, order))
        value = est.score()
        if best is None or value < best[0]:
            best = (value, sizes)
    return best[1]


@dataclass
class Estimator:
    """Scores a placement (Note [placement estimate]) with incremental updates for swap moves."""
    problem: Problem
    sizes: list[int]
    num_mb: int | None = None  # None: the problem's count (memory x data nodes when not given)

    def __post_init__(self):
        p, cost = self.problem, self.problem.cost
        self.S, self.K = p.num_stages, p.path_length - 1
        n = p.topology.num_nodes
        hop = cost.hop_matrix_s
        self.hop2 = hop + hop.T  # a loop is travelled forward and backward: each link both ways
        self.comp = cost.forward_s * (1 + cost.backward_factor)  # [stage, node]
        self.comp[0] += cost.loss_s
        k0 = self.sizes[0]
        self.num_mb = self.num_mb or p.microbatches_for(k0)
        share = visit_share(self.S, p.path_length)
        self.visits = np.array([self.num_mb] + [self.num_mb * share] * (self.S - 1))
        self.first, self.last, self.pair = self._path_probabilities()
        bwd = cost.forward_s[1:].mean() * cost.backward_factor if self.S > 1 else 0.0
        below = np.array([0.0] + [(st - 1) * (self.K - 1) / max(self.S - 2, 1) for st in range(1, self.S)])
        self.slack = below * bwd
        self.n = n

    def _path_probabilities(self):
        """P(stage s is the first / last visited after 0) and P(s, t consecutive) for random skip sets."""
        S, K = self.S, self.K
        first, last, pair = np.zeros(S), np.zeros(S), np.zeros((S, S))
        if S == 1 or K == 0:
            return first, last, pair
        total = math.comb(S - 1, K)
        for s in range(1, S):
            first[s] = math.comb(S - 1 - s, K - 1) / total
            last[s] = math.comb(s - 1, K - 1) / total
            for t in range(s + 1, S):
                pair[s, t] = math.comb(S - 2 - (t - s), K - 2) / total if K >= 2 else 0.0
        return first, last, pair

    def start(self, node_stage: list[int]) -> None:
        self.node_stage = np.asarray(node_stage, dtype=int)
        self.A = np.zeros((self.n, self.S))
        self.A[np.arange(self.n), self.node_stage] = 1.0
        self.R = self.hop2 @ self.A  # [node, stage]: summed hop cost from the node to the stage's replicas
        self.ar = np.array([self.problem.cost.allreduce_s(s, self.members(s)) for s in range(self.S)])

    def members(self, stage: int) -> np.ndarray:
        return np.flatnonzero(self.node_stage == stage)

    def score(self) -> float:
        k = self.A.sum(0)
        A = self.A
        slowest = np.max(np.where(A.T > 0, self.comp, -np.inf), axis=1)
        t_work = float(np.max(self.visits / k * slowest))
        mean_comp = (self.comp * A.T).sum(1) / k
        data = self.members(0)
        mean_hop = self.R / k  # node -> mean hop to the stage's replicas
        group = (A.T @ self.R) / np.outer(k, k)  # stage -> stage mean hop
        inner = float((self.pair * group).sum())
        ends = mean_hop[data] @ (self.first + self.last)
        visited = float(self.visits[1:] @ mean_comp[1:]) / self.num_mb if self.S > 1 else 0.0
        loop = self.comp[0, data] + visited + ends + inner
        per_data = self.num_mb / len(data)
        t_loop = float(np.max(loop)) * per_data / self.problem.memory
        return max(t_work, t_loop) + float(np.max(np.maximum(self.ar - self.slack, 0.0)))

    def swap(self, u: int, v: int) -> None:
        a, b = self.node_stage[u], self.node_stage[v]
        self.node_stage[u], self.node_stage[v] = b, a
        self.A[u, a], self.A[u, b], self.A[v, b], self.A[v, a] = 0.0, 1.0, 0.0, 1.0
        delta = self.hop2[:, v] - self.hop2[:, u]
        self.R[:, a] += delta
        self.R[:, b] -= delta
        self.ar[a] = self.problem.cost.allreduce_s(a, self.members(a))
        self.ar[b] = self.problem.cost.allreduce_s(b, self.members(b))


def grown_groups(problem: Problem, sizes: list[int], stage_order: list[int], seed_rank: int = 0) -> list[int]:
    """Greedy clustering: each stage (in `stage_order`) grows from a seed inside the densest remaining
    cluster, always adding the node with the best bottleneck bandwidth to the group (ties: latency)."""
    topo = problem.topology
    bw, lat = topo.bandwidth_gbit_s, topo.latency_ms
    n = topo.num_nodes
    free = np.ones(n, dtype=bool)
    node_stage = [-1] * n
    finite_bw = np.where(np.isinf(bw), np.nan, bw)
    for stage in stage_order:
        size = sizes[stage]
        idx = np.flatnonzero(free)
        sub = finite_bw[np.ix_(idx, idx)]
        if size > 1 and len(idx) > 1:
            # Seed: the node whose (size-1)-th best free link is fastest (the densest cluster around it).
            kth = min(size - 1, len(idx) - 1)
            ranked = -np.partition(-np.nan_to_num(sub, nan=-np.inf), kth - 1, axis=1)[:, kth - 1]
            order = np.lexsort((idx, -ranked))
        else:
            order = np.arange(len(idx))
        seed = int(idx[order[min(seed_rank, len(order) - 1)]])
        group = [seed]
        free[seed] = False
        bottleneck = np.where(free, bw[seed], -np.inf)
        worst_lat = np.where(free, lat[seed], np.inf)
        while len(group) < size:
            cand = np.flatnonzero(bottleneck == bottleneck.max())
            pick = int(cand[np.argmin(worst_lat[cand])])
            group.append(pick)
            free[pick] = False
            bottleneck = np.where(free, np.minimum(bottleneck, bw[pick]), -np.inf)
            worst_lat = np.where(free, np.maximum(worst_lat, lat[pick]), np.inf)
        for node in group:
            node_stage[node] = stage
    return node_stage


def chain_stages(problem: Problem, node_stage: list[int]) -> list[int]:
    """Relabel stages 1..S-1 so that neighbouring stages sit on well-connected groups (paths mostly step
    to the next stage). Groups keep their sizes when the sizes of the relabelled stages agree."""
    s = problem.num_stages
    if s <= 2:
        return node_stage
    est = Estimator(problem, [node_stage.count(st) for st in range(s)])
    est.start(node_stage)
    k = est.A.sum(0)
    group = (est.A.T @ est.R) / np.outer(k, k)
    sizes = [node_stage.count(st) for st in range(s)]
    chain, rest = [0], list(range(1, s))
    while rest:
        pos = len(chain)
        fit = [g for g in rest if sizes[g] == sizes[pos]]
        assert fit, "the groups' sizes are the stages' sizes, relabelled"
        nxt = min(fit, key=lambda g: (group[chain[-1], g], g))
        chain.append(nxt)
        rest.remove(nxt)
    relabel = {old: new for new, old in enumerate(chain)}
    return [relabel[st] for st in node_stage]


def local_search(est: Estimator, *, node_stage: list[int], rng: np.random.Generator, max_evals: int,
                 deadline=None) -> tuple[list[int], float]:
    """First-improvement pairwise swaps between stages, scored by the estimate; a fixed evaluation budget
    (not wall time) keeps the result deterministic for a seed."""
    est.start(node_stage)
    best = est.score()
    n, evals = len(node_stage), 0
    pairs_total = n * (n - 1) // 2
    improved = True
    while improved and evals < max_evals:
        improved = False
        if pairs_total <= max_evals:
            us, vs = np.triu_indices(n, 1)
            perm = rng.permutation(len(us))
            candidates = zip(us[perm], vs[perm])
        else:
            candidates = (tuple(rng.choice(n, 2, replace=False)) for _ in range(max_evals - evals))
        for u, v in candidates:
            if est.node_stage[u] == est.node_stage[v]:
                continue
            evals += 1
            est.swap(u, v)
            value = est.score()
            if value < best - 1e-9:
                best, improved = value, True
            else:
                est.swap(u, v)
            if evals >= max_evals or (deadline is not None and deadline()):
                break
        if deadline is not None and deadline():
            break
    return [int(x) for x in est.node_stage], best


def place(problem: Problem, *, sizes: list[int], rng: np.random.Generator, max_evals: int = 2000,
          deadline=None, keep: int = 3, extra_starts: list[list[int]] | None = None) -> list[tuple[float, list[int]]]:
    """The `keep` best distinct placements found, as (estimate, node -> stage), best first."""
    s = problem.num_stages
    starts = [list(x) for x in (extra_starts or [])]
    by_size = sorted(range(s), key=lambda st: (st != 0, -sizes[st], st))
    for seed_rank in range(2):
        starts.append(chain_stages(problem, grown_groups(problem, sizes, by_size, seed_rank)))
    found: dict[tuple, float] = {}
    per_start = max(max_evals // max(len(starts), 1), 1)
    est = Estimator(problem, sizes)

    def add(node_stage: list[int]) -> None:
        if tuple(node_stage) not in found:
            est.start(node_stage)
            found[tuple(node_stage)] = est.score()

    for start in starts:
        add(start)
        result, _ = local_search(est, node_stage=start, rng=rng, max_evals=per_start, deadline=deadline)
        add(result)
        add(chain_stages(problem, result))
    ranked = sorted(found.items(), key=lambda kv: (kv[1], kv[0]))
    return [(value, list(ns)) for ns, value in ranked[:keep]]
