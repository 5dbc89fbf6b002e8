"""Strategies and the one entry point that turns a Problem into a valid, simulated Plan.

A strategy returns the placement (node -> stage) and each microbatch's route, and may return an order.
Without one, the simulator's greedy dispatch orders the work (backward first, memory-capped). Every plan
is then replayed strictly by the simulator (its `predicted`) and checked against every constraint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from scheduler.constraints import check
from scheduler.plan import Plan, PlanNode
from scheduler.problem import Problem
from topology.simulator import simulate
from topology.workload import Action, Route, Workload


@dataclass
class Solution:
    node_stage: list[int]
    routes: list[Route]
    order: dict[int, list[Action]] | None = None


STRATEGIES: dict[str, Callable[[Problem], Solution]] = {}


def strategy(name: str):
    def register(fn: Callable[[Problem], Solution]):
        STRATEGIES[name] = fn
        return fn
    return register


def solve(problem: Problem, strategy_name: str = "full") -> Plan:
    from topology.errors import ConfigError
    _load_strategies()
    if strategy_name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy_name!r}; choose one of: {', '.join(STRATEGIES)}")
    solution = STRATEGIES[strategy_name](problem)
    workload = Workload(solution.node_stage, solution.routes, solution.order)
    if solution.order is None:
        workload.order = simulate(workload, problem.cost, problem.memory).order
    return build_plan(problem, strategy_name, workload)


def build_plan(problem: Problem, strategy_name: str, workload: Workload) -> Plan:
    """Wrap a placement, routes and order as a plan, with the simulator's prediction for it as written."""
    topo = problem.topology
    result = simulate(workload, problem.cost, problem.memory)
    plan = Plan(
        skip_ratio=problem.skip_ratio, num_stages=problem.num_stages,
        nodes=[PlanNode(n.id, n.name, n.region, workload.node_stage[n.id], n.id) for n in topo.nodes],
        paths=sorted(workload.routes, key=lambda r: r.microbatch),
        order={node: list(workload.order.get(node, [])) for node in range(topo.num_nodes)},
        constraints={"max_swaps": problem.max_swaps, "memory": problem.memory,
                     **({"memory_auto": problem.memory_explanation} if problem.memory_explanation else {})},
        seed=problem.seed, strategy=strategy_name, model=problem.model.name,
        microbatch_size=problem.microbatch_size,
        topology={"name": topo.name, "num_nodes": topo.num_nodes, "fingerprint": topo.fingerprint(),
                  **problem.topology_source},
        predicted=result.to_dict(problem.cost),
    )
    check(plan)  # every strategy's plan must be valid; a failure here is a solver bug, named precisely
    return plan


def _load_strategies() -> None:
    """Import the modules that register strategies (kept lazy so `scheduler.solve` stays import-light)."""
    import scheduler.full  # noqa: F401
    for name in ("scheduler.baselines", "scheduler.skippipe"):
        try:
            __import__(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
