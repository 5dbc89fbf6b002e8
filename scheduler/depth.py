"""Full-depth work mixed into a skipping plan: some microbatches visit every stage, in natural order.

A model trained only on paths of L of S stages never trains its full depth, and is then worse with all
its stages than with L of them (issue 14). Mixing full-depth microbatches into its plan trains that
depth too, at a cost in iteration time that the simulator predicts:

    plan = mix_full_depth(problem, "skippipe", 0.125)     # 2 of 16 microbatches visit every stage
    full = all_full_depth(problem, plan)                  # the same placement, every microbatch full

A full route is stage 0 on the microbatch's data node, then stages 1..S-1 in order, each on that stage's
least-loaded replica (so TC1's even load holds); the simulator's greedy dispatch orders the mixed work. The chosen microbatch ids are
recorded in the plan's ``constraints["full_depth"]``, where the validator (scheduler.constraints) reads
them: those paths must have every stage, in order. A whole full-depth iteration (one in K, the schedule
of the paper authors' later training code) is `all_full_depth`; a shallow iteration (one in K solved at a
higher skip ratio, the placement kept) is `shallow_depth`, or `even_depth` on the evenly spaced stages; a
full-depth cooldown runs the last steps of the learning-rate schedule at full depth (`tail_start`);
`step_kind` says which a step runs. `spread_depth` moves stage visits between a plan's microbatches, so
their depths spread around the plan's path length as LayerDrop's do, each stage's visits kept.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

from scheduler.problem import Problem
from topology.errors import ConfigError
from topology.plan import Plan, Route, Workload, sequential_order
from topology.simulator import simulate


def full_depth_count(num_microbatches: int, fraction: float) -> int:
    """Full-depth microbatches of an iteration: round(fraction * M), halves up. ConfigError for a fraction
    outside [0, 1]."""
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ConfigError(f"full-depth fraction {fraction} is outside [0, 1]; e.g. schedule.full_fraction=0.125")
    return math.floor(fraction * num_microbatches + 0.5)


def kept_route(microbatch: int, data_node: int, stages: list[int], node_stage: list[int], load: Counter) -> Route:
    """A route from `data_node` over `stages` (ascending, starting at 0): stage 0 there, then each other
    stage in order on the least loaded of its nodes (ties: the lowest id); `load` (node -> microbatches) is
    updated. A full-depth route keeps every stage."""
    nodes = [data_node]
    for stage in stages[1:]:
        node = min((n for n, s in enumerate(node_stage) if s == stage), key=lambda n: (load[n], n))
        load[node] += 1
        nodes.append(node)
    return Route(microbatch, data_node, tuple(nodes), tuple(stages))


def routes_over(plan: Plan, stages: list[int]) -> list[Route]:
    """Every microbatch of `plan` (by id) on a kept_route over `stages` from its own data node, the load
    spread over each stage's replicas (the placement kept)."""
    node_stage = plan.workload().node_stage
    load = Counter(p.data_node for p in plan.paths)
    return [kept_route(p.microbatch, p.data_node, stages, node_stage, load) for p in sorted(plan.paths, key=lambda p: p.microbatch)]


def _rebuild(problem: Problem, plan: Plan, routes: list[Route], full_ids: list[int],
             kept: list[int] | None = None) -> Plan:
    """The plan's placement with `routes`, ordered by the greedy dispatch and predicted on `problem`;
    `kept`: the one stage set every route keeps, recorded in the plan (None: none)."""
    from scheduler.solve import build_plan  # scheduler.solve is above this module; import late

    workload = Workload(plan.workload().node_stage, routes, None)
    workload.order = simulate(workload, cost=problem.cost, memory=problem.memory).order
    return build_plan(problem, plan.strategy, workload, full_depth=full_ids, kept_stages=kept)


def mix_full_depth(problem: Problem, strategy: str, fraction: float) -> Plan:
    """A plan of `problem`'s M microbatches of which round(fraction * M) visit every stage: the strategy's
    plan for the other microbatches (so its stage visits stay balanced, CC4), then the full-depth ones
    appended (ids M - n .. M - 1) on the least-loaded stage-0 nodes and replicas. fraction 0 is the
    strategy's plan. ConfigError for an impossible setting."""
    from scheduler.solve import solve

    total = solve(problem, strategy) if problem.num_microbatches is None else None
    num_mb = problem.num_microbatches if total is None else len(total.paths)
    count = full_depth_count(num_mb, fraction)
    if count == 0:
        return total or solve(problem, strategy)
    if count == num_mb:
        return all_full_depth(problem, total or solve(problem, strategy))
    plan = solve(dataclasses.replace(problem, num_microbatches=num_mb - count), strategy)
    node_stage = plan.workload().node_stage
    load = Counter(n for p in plan.paths for n in p.nodes)
    routes = sorted(plan.paths, key=lambda p: p.microbatch)
    for mb in range(num_mb - count, num_mb):
        data_node = min((n for n, s in enumerate(node_stage) if s == 0), key=lambda n: (load[n], n))
        load[data_node] += 1
        routes.append(kept_route(mb, data_node, list(range(problem.num_stages)), node_stage, load))
    return _rebuild(problem, plan, routes, list(range(num_mb - count, num_mb)))


def all_full_depth(problem: Problem, plan: Plan) -> Plan:
    """`plan` with every microbatch on a full-depth route from its own data node (the placement kept):
    the full-depth iteration of a one-in-K schedule."""
    routes = routes_over(plan, list(range(plan.num_stages)))
    return _rebuild(problem, plan, routes, [p.microbatch for p in routes])


def shallow_depth(problem: Problem, plan: Plan, skip_ratio: float, *, strategy: str = "skippipe",
                  seed: int | None = None) -> Plan:
    """The plan the strategy solves at the higher `skip_ratio` with `plan`'s placement: the shallow
    iteration of a one-in-K schedule (paths of path_length(S, skip_ratio) stages). A model trained only on
    paths of L stages never trains the deeper omissions an evaluation at half depth asks for; LayerDrop's
    random depths do (issue 14). `seed` replaces the problem's solver seed: with strategy "random-skip",
    a fresh draw of in-order stage sets per seed (`drawn_shallow_seed`). ConfigError from the solver for an
    impossible setting."""
    from scheduler.solve import solve  # scheduler.solve is above this module; import late
    changes = {"skip_ratio": skip_ratio, "fixed_placement": plan.placement()}
    if seed is not None:
        changes["seed"] = seed
    return solve(dataclasses.replace(problem, **changes), strategy)


def even_stages(num_stages: int, count: int) -> list[int]:
    """The `count` of `num_stages` stages spread evenly, stage 0 first: floor(i * S / count) for i < count
    (distinct, gaps differ by at most one; 8 stages, 4 kept: 0, 2, 4, 6). The set an omission with even
    placement keeps (skippipe.evaluation.omission.kept_stages) and an even shallow iteration trains."""
    if not 1 <= count <= num_stages:
        raise ConfigError(f"cannot keep {count} of {num_stages} stages; keep between 1 and {num_stages}")
    return [i * num_stages // count for i in range(count)]


def even_depth(problem: Problem, plan: Plan, skip_ratio: float) -> Plan:
    """`plan`'s placement with every microbatch on the evenly spaced stages of a path of `skip_ratio`
    (even_stages of path_length(S, skip_ratio)), in order, from its own data node on the least-loaded
    replicas: the shallow iteration that trains the half-depth model an even omission serves (as the
    sandwich rule of slimmable networks trains the smallest model served: Yu and Huang 2019, "Universally
    Slimmable Networks and Improved Training Techniques"). The stage set is recorded in the plan's
    constraints["kept_stages"], where the validator reads it; CC4 then balances those stages."""
    from scheduler.constraints import path_length
    stages = even_stages(plan.num_stages, path_length(plan.num_stages, skip_ratio))
    return _rebuild(dataclasses.replace(problem, skip_ratio=skip_ratio), plan, routes_over(plan, stages), [], kept=stages)


def drawn_shallow_seed(run_seed: int, step: int) -> int:
    """The solver seed of step `step`'s drawn shallow plan: distinct per step and run seed, so a resumed
    run draws the same sets (step < 1,000,000)."""
    return run_seed * 1_000_000 + step


def tail_start(horizon: int, fraction: float) -> int | None:
    """The first 1-based step of a full-depth cooldown over the last `fraction` of `horizon` steps (the
    learning-rate schedule's: optim.decay_steps or train.steps): horizon - round(fraction * horizon) + 1,
    halves up; None for fraction 0. ConfigError for a fraction outside [0, 1)."""
    if not 0.0 <= fraction < 1.0 or math.isnan(fraction):
        raise ConfigError(f"full-depth tail {fraction} is outside [0, 1); e.g. schedule.full_tail=0.1")
    count = math.floor(fraction * horizon + 0.5)
    return horizon - count + 1 if count else None


def step_kind(step: int, *, full_every: int = 0, shallow_every: int = 0, full_from: int | None = None) -> str:
    """Which plan 1-based `step` runs: "full" from step `full_from` on (a full-depth cooldown; None: none)
    and every `full_every`-th step, else "shallow" when (step - 1) % shallow_every == shallow_every // 2
    (so one in 4 falls on odd steps, clear of a one in 10 full), else "base" (0 turns either off)."""
    if full_from is not None and step >= full_from:
        return "full"
    if full_every > 0 and step % full_every == 0:
        return "full"
    if shallow_every > 0 and (step - 1) % shallow_every == shallow_every // 2:
        return "shallow"
    return "base"


def average_iteration_s(seconds: dict[str, float], *, full_every: int = 0, shallow_every: int = 0,
                        full_tail: float = 0.0) -> float:
    """Mean iteration seconds of a schedule, from each step kind's ("base", "full", "shallow": step_kind)
    predicted seconds: over one period of the schedule (the least common multiple of its intervals), and
    with a full-depth cooldown over the last `full_tail` of the steps, (1 - full_tail) x that + full_tail x
    the full iteration's."""
    period = math.lcm(max(full_every, 1), max(shallow_every, 1))
    kinds = [step_kind(k, full_every=full_every, shallow_every=shallow_every) for k in range(1, period + 1)]
    periodic = sum(seconds[kind] for kind in kinds) / period
    return periodic if not full_tail else (1 - full_tail) * periodic + full_tail * seconds["full"]


def step_rng(stream: str, run_seed: int, step: int) -> random.Random:
    """The draws of step `step` of a per-step schedule (`stream`: "spread" for `spread_depth`, "layerdrop"):
    one stream per run seed and step, so a resumed run draws the same (str seeds are stable across
    processes)."""
    return random.Random(f"{stream}/{run_seed}/{step}")


def spread_depth(plan: Plan, transfers: int, rng: random.Random, *, even: list[int] | None = None,
                 even_donors: int = 0) -> Plan:
    """`plan` with up to `transfers` stage visits moved, each from one microbatch (the donor: depth - 1)
    to another that skips that stage (the receiver: depth + 1), on the donor's node and inserted where CC3
    allows the fewest swaps. Each microbatch gives or takes at most one visit, so depths stay within one
    of the plan's path length L and average L; every stage keeps its visits (CC4) and every node its load
    (TC1). LayerDrop's depths spread the same way around their mean (issue 14; README, "Inference with
    stages omitted"). `rng` draws the pairs (`step_rng("spread", ...)`); fewer move when no more pairs fit.

    With `even` (a stage set, even_stages) and `even_donors` > 0, first up to `even_donors` microbatches
    whose paths hold `even` in order give each of their other stages to a receiver (one visit each), so
    they run exactly `even`: the half-depth model an even omission serves, trained inside the step beside
    the deeper paths (the sandwich rule of slimmable networks trains the smallest and the largest model
    in each step: Yu and Huang 2019). Such a donor may fall more than one below L; the plan then declares
    constraints["spread_even"] = `even`. The plan declares constraints["depth_spread"], which the
    validator reads; its order is sequential_order (the solver's is for the old paths:
    scheduler.skippipe.retime re-times a spread plan)."""
    from scheduler.constraints import count_swaps
    max_swaps = int(plan.constraints.get("max_swaps", 2))

    def insertion(take: Route, stage: int) -> int | None:  # where CC3 allows `stage` in `take` with fewest swaps
        fits = [(count_swaps(take.stages[:i] + (stage,) + take.stages[i:]), i) for i in range(1, len(take.stages) + 1)]
        fits = [(swaps, i) for swaps, i in fits if swaps is not None and swaps <= max_swaps]
        return min(fits)[1] if fits else None

    def move(routes: dict, donor: int, receiver: int, stage: int, at: int) -> None:
        give, take = routes[donor], routes[receiver]
        k = give.stages.index(stage)
        routes[donor] = Route(donor, give.data_node, give.nodes[:k] + give.nodes[k + 1:], give.stages[:k] + give.stages[k + 1:])
        routes[receiver] = Route(receiver, take.data_node, take.nodes[:at] + (give.nodes[k],) + take.nodes[at:],
                                 take.stages[:at] + (stage,) + take.stages[at:])

    routes = {p.microbatch: p for p in plan.paths}
    free = sorted(routes)
    rng.shuffle(free)
    halves = 0
    for donor in list(free) if even and even_donors > 0 else []:
        stages = routes[donor].stages
        if halves == even_donors or donor not in free or [s for s in stages if s in even] != list(even):
            continue
        trial, left = dict(routes), [m for m in free if m != donor]
        for stage in [s for s in stages if s not in even]:
            found = next(((m, at) for m in left if stage not in trial[m].stages
                          and (at := insertion(trial[m], stage)) is not None), None)
            if found is None:
                break
            move(trial, donor, found[0], stage, found[1])
            left.remove(found[0])
        else:
            routes, free, halves = trial, left, halves + 1
    moved = 0
    while moved < transfers and len(free) >= 2:
        donor = free.pop()
        for receiver in list(free):
            give, take = routes[donor], routes[receiver]
            stages = [s for s in give.stages[1:] if s not in take.stages]
            if not stages or len(give.stages) <= 2:
                continue
            stage = rng.choice(stages)
            at = insertion(take, stage)
            if at is None:
                continue
            move(routes, donor, receiver, stage, at)
            free.remove(receiver)
            moved += 1
            break
    paths = sorted(routes.values(), key=lambda p: p.microbatch)
    constraints = {**plan.constraints, "depth_spread": True, **({"spread_even": list(even)} if halves else {})}
    return dataclasses.replace(plan, paths=paths, order=sequential_order(paths), constraints=constraints)
