"""Plans rotated across iterations: more distinct stage sets at the same predicted iteration time.

One skipping plan trains the same few stage sets every iteration (the paper setting's plan: 7 of the 12
its paths could use), so a model trained on it learns to do without those sets' missing stages only
(issue 14). The solver's search is seeded: re-solving with other seeds, the placement fixed, gives
plans with other paths whose predicted iteration time is within a fraction of a percent of the first.
Running them in turn, one per iteration, spreads training over more stage sets at no predicted cost:

    plans = rotation(problem, plan, count=8)   # plan first, then up to 7 more within TOLERANCE of it
    step_plan = plans[(step - 1) % len(plans)]  # skippipe/path_schedule.py

Every plan passes the solver's validation (CC1-CC4, TC1, TC2) as any solved plan does.
"""
from __future__ import annotations

import dataclasses

from scheduler.problem import Problem
from scheduler.solve import solve
from topology.plan import Plan

TOLERANCE = 0.02  # a rotated plan's predicted iteration may exceed the first plan's by at most this share


def rotation(problem: Problem, plan: Plan, count: int, *, strategy: str = "skippipe",
             tolerance: float = TOLERANCE) -> list[Plan]:
    """`plan`, then the plans solved for `problem` with `plan`'s placement and seeds problem.seed + 1,
    + 2, ... (count - 1 more seeds), kept when their predicted iteration time (seconds) is at most
    (1 + tolerance) x `plan`'s and their paths differ from every kept plan's. Deterministic. ConfigError
    from the solver for an impossible problem."""
    fixed = dataclasses.replace(problem, fixed_placement=plan.placement())
    limit = plan.predicted["iteration_s"] * (1 + tolerance)
    plans, seen = [plan], {_paths(plan)}
    for offset in range(1, count):
        candidate = solve(dataclasses.replace(fixed, seed=problem.seed + offset), strategy)
        if candidate.predicted["iteration_s"] <= limit and _paths(candidate) not in seen:
            plans.append(candidate)
            seen.add(_paths(candidate))
    return plans


def distinct_stage_sets(plans: list[Plan]) -> int:
    """How many different stage sequences the paths of `plans` visit, over all of them."""
    return len({tuple(p.stages) for plan in plans for p in plan.paths})


def _paths(plan: Plan) -> tuple:
    return tuple(sorted((p.microbatch, p.nodes, p.stages) for p in plan.paths))
