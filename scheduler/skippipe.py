"""The SkipPipe strategies: `skippipe` (the default) and its ablation `skippipe-no-tc2`.

Both share the placement (scheduler.placement: a fast estimate of the iteration time, all-reduces
included, searched by pairwise swaps; the best few candidates are then compared by simulating them with
cost-chosen paths). They differ in collision awareness (TC2):

- `skippipe-no-tc2`: every microbatch takes its cheapest loop by hop and compute cost, blind to the
  others (scheduler.paths, "cost"), and the simulator's default greedy dispatch orders the work;
- `skippipe`: paths are also built against a reservation table of the work already planned ("timed"),
  several dispatch priorities are tried on both path sets, and a local search over routes and
  microbatch ranks (scheduler.search) polishes the best, scored by the exact dispatcher. The final
  order is what the dispatcher executed; the plan's `predicted` is the simulator's strict replay of it.

Budgets are counted in evaluations, scaled to the problem's size, so a seed always gives the same plan;
`--time-limit` caps the wall clock (and may then cut the search short).
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from scheduler.full import contiguous_placement, region_chain_order
from scheduler.ordering import Compiled, Priority, candidate_priorities
from scheduler.paths import build_routes
from scheduler.placement import choose_stage_sizes, place
from scheduler.problem import Problem, Solution
from scheduler.search import RouteSearch, score
from topology.plan import Plan, Route, Workload
from topology.simulator import simulate

# Work budget of the route search, in dispatched actions (an evaluation dispatches every action once):
# about a second for 20 nodes and 30 microbatches, tens of seconds at 1,000 nodes on a 2-core machine.
SEARCH_ACTIONS = 3_000_000
MAX_SEARCH_EVALS = 1200
PLACEMENT_WORK = 300_000  # placement swap evaluations x nodes
MAX_PLACEMENT_EVALS = 1500


class Progress:
    """A line on stderr every few seconds, only once a solve has run long enough to need one."""

    def __init__(self, name: str, every: float = 3.0):
        self.name, self.every = name, every
        self.started = self.last = time.perf_counter()

    def __call__(self, step: str, done: int | None = None, total: int | None = None, best: float | None = None):
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        parts = [f"{self.name}: {step}"]
        if done is not None and total:
            parts.append(f"{done}/{total}")
        if best is not None:
            parts.append(f"best {best:.2f} s")
        parts.append(f"{now - self.started:.0f} s elapsed")
        print(" | ".join(parts), file=sys.stderr, flush=True)


def deadline_of(problem: Problem):
    if problem.time_limit is None:
        return None
    end = time.perf_counter() + problem.time_limit
    return lambda: time.perf_counter() > end


def stage_sizes(problem: Problem) -> list[int]:
    return list(problem.stage_sizes) if problem.stage_sizes is not None else choose_stage_sizes(problem)


def reorders(problem: Problem) -> bool:
    """CC3 reordering is for partial paths; at skip ratio 0 a plan is an ordinary full pipeline."""
    return problem.skip_ratio > 0 and problem.max_swaps > 0


def cost_routes(problem: Problem, node_stage: list[int], rng: np.random.Generator):
    """Cost-chosen routes that the default dispatch runs to the end. Reordered paths can, in principle,
    hold each other's memory slots in a cycle (a at stage 2 waits for room at stage 1 and b the other way
    round); paths in stage order cannot, since every wait then points to a higher stage."""
    seed = int(rng.integers(2**32))
    routes, _ = build_routes(problem, node_stage=node_stage, rng=np.random.default_rng(seed), choose="cost",
                             reorder=reorders(problem))
    if reorders(problem) and Compiled(problem, node_stage, routes).dispatch(Priority(), record=False).order is None:
        routes, _ = build_routes(problem, node_stage=node_stage, rng=np.random.default_rng(seed), choose="cost",
                                 reorder=False)
    return routes


def choose_placement(problem: Problem, *, rng: np.random.Generator, progress: Progress, deadline=None,
                     keep: int = 3) -> tuple[list[int], list[Route]]:
    """Best of the placement search's candidates by simulation (cost-chosen paths, default dispatch);
    returns the placement and those paths. A problem's fixed placement is kept as it is."""
    if problem.fixed_placement is not None:  # a re-plan that moves no weights: only the paths are chosen
        return list(problem.fixed_placement), cost_routes(problem, list(problem.fixed_placement), rng)
    sizes = stage_sizes(problem)
    starts = [contiguous_placement(region_chain_order(problem.topology), sizes)]
    progress("placement")
    num_nodes = problem.topology.num_nodes
    evals = int(np.clip(PLACEMENT_WORK // num_nodes, 100, MAX_PLACEMENT_EVALS))
    keep = keep if num_nodes <= 200 else 2  # each comparison builds paths for every microbatch
    candidates = place(problem, sizes=sizes, rng=rng, max_evals=evals, deadline=deadline, keep=keep, extra_starts=starts)
    best = None
    for i, (_, node_stage) in enumerate(candidates):
        progress("comparing placements", i, len(candidates))
        routes = cost_routes(problem, node_stage, rng)
        value = score(Compiled(problem, node_stage, routes).dispatch(Priority(), record=False))
        if best is None or value < best[0]:
            best = (value, node_stage, routes)
        if deadline is not None and deadline():
            break
    return best[1], best[2]


def skippipe_no_tc2(problem: Problem) -> Solution:
    rng = np.random.default_rng(problem.seed)
    progress = Progress("skippipe-no-tc2")
    node_stage, routes = choose_placement(problem, rng=rng, progress=progress, deadline=deadline_of(problem))
    return Solution(node_stage, routes, None)  # the simulator's default dispatch orders the work


def skippipe(problem: Problem) -> Solution:
    rng = np.random.default_rng(problem.seed)
    progress = Progress("skippipe")
    deadline = deadline_of(problem)
    node_stage, routes = choose_placement(problem, rng=rng, progress=progress, deadline=deadline)
    progress("paths (timed)")
    timed, planned = build_routes(problem, node_stage=node_stage, rng=np.random.default_rng(rng.integers(2**32)),
                                  choose="timed", reorder=reorders(problem))
    return polish(problem, node_stage, [(routes, {}), (timed, planned)], rng=rng, deadline=deadline, progress=progress)


def polish(problem: Problem, node_stage: list[int], candidates: list[tuple[list[Route], dict]], *,
           rng: np.random.Generator, deadline=None, progress=None) -> Solution:
    """The solver's last phase: the best dispatch rule for each (routes, planned starts) candidate, then
    the route search (scheduler.search; every move keeps each microbatch's depth) from the best. The
    work budget is SEARCH_ACTIONS dispatched actions, so a seed gives the same result on any machine."""
    progress = progress or (lambda *args: None)
    num_mb = len(candidates[0][0])
    best = None
    for routes, planned in candidates:
        compiled = Compiled(problem, node_stage, routes)
        rules = candidate_priorities(num_mb, rng, extra_random=2)
        if planned:
            rules.append(Priority(kind_rank=(0.0, 0.0, 0.0), by_arrival=False, planned=planned))
        for rule in rules:
            value = score(compiled.dispatch(rule, record=False))
            if best is None or value < best[0]:
                best = (value, routes, rule)
    _, routes, rule = best
    actions = sum(2 * len(r.stages) + 1 for r in routes)
    evals = int(np.clip(SEARCH_ACTIONS // max(actions, 1), 4, MAX_SEARCH_EVALS))
    search = RouteSearch(problem, node_stage=node_stage, routes=routes, priority=rule,
                         rng=np.random.default_rng(rng.integers(2**32)), reorder=reorders(problem))
    found, found_rule, value = search.run(evals, deadline, lambda d, t, b: progress("route search", d, t, b))
    if value < best[0]:  # a planned-start rule may score better than the rank rule the search starts from
        routes, rule = found, found_rule
    outcome = Compiled(problem, node_stage, routes).dispatch(rule)
    assert outcome.order is not None, "the chosen dispatch cannot stall: it was scored finite"
    return Solution(node_stage, routes, outcome.order)


def retime(problem: Problem, plan: Plan) -> Plan:
    """`plan`'s routes as the solver would run them on `problem`: `polish` from them (seeded by the
    problem's seed), each microbatch's depth kept, and the prediction of the result; the plan's
    placement, strategy and constraints kept. For plans made outside the solver (scheduler.depth's
    spread depths), whose sequential order is no schedule to price."""
    node_stage = plan.workload().node_stage
    found = polish(problem, node_stage, [(list(plan.paths), {})], rng=np.random.default_rng(problem.seed))
    paths = sorted(found.routes, key=lambda r: r.microbatch)
    order = {node: list(found.order.get(node, [])) for node in range(problem.topology.num_nodes)}
    result = simulate(Workload(node_stage, paths, order), cost=problem.cost, memory=problem.memory)
    return dataclasses.replace(plan, paths=paths, order=order, predicted=result.to_dict(problem.cost))
