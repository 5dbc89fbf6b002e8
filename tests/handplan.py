"""Plans written by hand as short strings, for the tier-1 tests.

    hand_plan("0 0 1 2", ["0@0 1@2 2@3", "0@1 1@2 2@3"])

builds a plan whose node i serves the i-th stage of the first string, and whose microbatch k follows the
k-th path, written as `stage@node` cells; the first cell's node is the data node unless a prefix names
another (`n1: 0@0 1@2`, for plans that break CC1). Orders are per node, in the
action syntax of the plan (`F0@1 B0@1`); by default every node runs the microbatches one after another in
path order, which is always deadlock-free and holds one microbatch at a time.
"""
from __future__ import annotations

from topology.plan import Action, Plan, PlanNode, Route, Workload, sequential_order


def route(microbatch: int, text: str) -> Route:
    data_node = None
    if ":" in text:
        prefix, text = text.split(":")
        data_node = int(prefix.strip().removeprefix("n"))
    cells = [cell.split("@") for cell in text.split()]
    stages = tuple(int(s) for s, _ in cells)
    nodes = tuple(int(n) for _, n in cells)
    return Route(microbatch, nodes[0] if data_node is None else data_node, nodes, stages)


def parse_order(order: dict[int, str], num_nodes: int) -> dict[int, list[Action]]:
    return {n: [Action.parse(a) for a in order.get(n, "").split()] for n in range(num_nodes)}


def hand_plan(stages: str, paths: list[str], *, skip_ratio: float = 0.0, memory: int = 3, max_swaps: int = 2,
              order: dict[int, str] | None = None) -> Plan:
    node_stage = [int(s) for s in stages.split()]
    routes = [route(k, text) for k, text in enumerate(paths)]
    n = len(node_stage)
    return Plan(
        skip_ratio=skip_ratio, num_stages=max(node_stage) + 1,
        nodes=[PlanNode(i, f"n{i}", "r", s, i) for i, s in enumerate(node_stage)],
        paths=routes,
        order={**{i: [] for i in range(n)}, **sequential_order(routes)} if order is None else parse_order(order, n),
        constraints={"max_swaps": max_swaps, "memory": memory},
    )


def workload(plan: Plan, with_order: bool = True) -> Workload:
    return Workload([node.stage for node in plan.nodes], list(plan.paths),
                    {n: list(a) for n, a in plan.order.items()} if with_order else None)
