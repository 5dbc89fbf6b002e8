"""The strategy table and the one entry point that turns a Problem into a valid, simulated Plan.

A strategy is a function Problem -> Solution: the placement (node -> stage) and each microbatch's route,
and maybe an order. Without one, the simulator's greedy dispatch orders the work (backward first,
memory-capped). Every plan is then replayed strictly by the simulator (its `predicted`) and checked
against every constraint. `STRATEGIES` lists them all, in the order `compare` shows them.
"""
from __future__ import annotations

from types import MappingProxyType

from scheduler.baselines import random_skip
from scheduler.constraints import check
from scheduler.full import full_pipeline
from scheduler.problem import Problem
from scheduler.skippipe import skippipe, skippipe_no_tc2
from topology.errors import ConfigError
from topology.plan import Plan, PlanNode, Workload
from topology.simulator import simulate

# name -> strategy, weakest first (the order of `python -m scheduler compare`); read-only.
STRATEGIES = MappingProxyType({
    "full": full_pipeline,
    "random-skip": random_skip,
    "skippipe-no-tc2": skippipe_no_tc2,
    "skippipe": skippipe,
})
DEFAULT_STRATEGY = "skippipe"


def solve(problem: Problem, strategy_name: str = "full") -> Plan:
    """Solve `problem` with the named strategy; ConfigError for an unknown name or an impossible setting.
    With `problem.fixed_placement`, every strategy keeps it: only paths, replicas and order are solved."""
    if strategy_name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy_name!r}; choose one of: {', '.join(STRATEGIES)}")
    solution = STRATEGIES[strategy_name](problem)
    if problem.fixed_placement is not None and list(solution.node_stage) != problem.fixed_placement:
        raise AssertionError(f"strategy {strategy_name!r} moved nodes of a fixed placement")  # a solver bug
    workload = Workload(solution.node_stage, solution.routes, solution.order)
    if solution.order is None:
        workload.order = simulate(workload, cost=problem.cost, memory=problem.memory).order
    return build_plan(problem, strategy_name, workload)


def build_plan(problem: Problem, strategy_name: str, workload: Workload, *, full_depth: list[int] = (),
               kept_stages: list[int] | None = None) -> Plan:
    """Wrap a placement, routes and order as a plan, with the simulator's prediction for it as written.
    `full_depth`: microbatches whose routes visit every stage; `kept_stages`: the one stage set every
    other route visits (scheduler.depth); both recorded in the plan's constraints."""
    topo = problem.topology
    result = simulate(workload, cost=problem.cost, memory=problem.memory)
    plan = Plan(
        skip_ratio=problem.skip_ratio, num_stages=problem.num_stages,
        nodes=[PlanNode(n.id, n.name, n.region, workload.node_stage[n.id], n.id) for n in topo.nodes],
        paths=sorted(workload.routes, key=lambda r: r.microbatch),
        order={node: list(workload.order.get(node, [])) for node in range(topo.num_nodes)},
        constraints={"max_swaps": problem.max_swaps, "memory": problem.memory,
                     **({"full_depth": sorted(full_depth)} if full_depth else {}),
                     **({"kept_stages": list(kept_stages)} if kept_stages else {}),
                     **({"memory_auto": problem.memory_explanation} if problem.memory_explanation else {})},
        seed=problem.seed, strategy=strategy_name, model=problem.model.name,
        microbatch_size=problem.microbatch_size,
        topology={"name": topo.name, "num_nodes": topo.num_nodes, "fingerprint": topo.fingerprint(),
                  **problem.topology_source},
        predicted=result.to_dict(problem.cost),
    )
    check(plan)  # every strategy's plan must be valid; a failure here is a solver bug, named precisely
    return plan
