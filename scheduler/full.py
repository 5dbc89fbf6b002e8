"""The full-pipeline strategy: every microbatch visits every stage in order.

Placement is a simple network-aware rule: regions are chained greedily by bandwidth so that near regions
sit side by side, nodes are listed region by region in that chain, and consecutive runs of that list
fill the stages. Neighbouring stages thus land on well-connected nodes and each stage's replicas are as
close together as the stage sizes allow.
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from scheduler.problem import Problem, Solution
from topology.errors import ConfigError
from topology.network import Topology
from topology.plan import Route


def region_chain_order(topology: Topology) -> list[int]:
    """Node ids grouped by region, regions ordered by a greedy best-bandwidth chain from the first region
    (networkx's nearest-neighbour tour over the regions, weighted by mean bandwidth between them)."""
    regions = topology.regions
    members = {r: [n.id for n in topology.nodes if n.region == r] for r in regions}
    bw = topology.bandwidth_gbit_s
    chain = regions
    if len(regions) > 1:
        # weight: highest mean bandwidth first; ties to the earlier region (greedy_tsp alone would break
        # them by set order, which for strings changes from run to run)
        g = nx.DiGraph()
        g.add_edges_from((a, b, {"rank": (-float(np.mean(bw[np.ix_(members[a], members[b])])), j)})
                         for a in regions for j, b in enumerate(regions) if a != b)
        chain = nx.approximation.greedy_tsp(g, weight="rank", source=regions[0])[:-1]
    return [n for r in chain for n in members[r]]


def contiguous_placement(order: list[int], sizes: list[int]) -> list[int]:
    node_stage = [0] * len(order)
    start = 0
    for stage, size in enumerate(sizes):
        for node in order[start:start + size]:
            node_stage[node] = stage
        start += size
    return node_stage


def balanced_routes(problem: Problem, node_stage: list[int], stage_paths: list[list[int]]) -> list[Route]:
    """Give each microbatch (dealt round-robin to the data nodes) its nodes for the given stage sequences.

    At each stage the microbatch goes to the least-loaded replica (keeping TC1's even spread), breaking ties
    by the fastest hop from where it is.
    """
    topo = problem.topology
    replicas = [[n for n, s in enumerate(node_stage) if s == stage] for stage in range(problem.num_stages)]
    load = np.zeros(topo.num_nodes, dtype=int)
    data_nodes = replicas[0]
    routes = []
    for mb, stages in enumerate(stage_paths):
        data = data_nodes[mb % len(data_nodes)]
        nodes, here = [data], data
        for stage in stages[1:]:
            least = min(load[n] for n in replicas[stage])
            here = min((n for n in replicas[stage] if load[n] == least), key=lambda n: topo.transfer_s(here, n, 1e6))
            load[here] += 1
            nodes.append(here)
        routes.append(Route(mb, data, tuple(nodes), tuple(stages)))
    return routes


def full_pipeline(problem: Problem) -> Solution:
    if problem.path_length != problem.num_stages:
        raise ConfigError(f"the full strategy sends every microbatch through all {problem.num_stages} stages, but skip "
                          f"ratio {problem.skip_ratio} asks for {problem.path_length}; pass --skip-ratio 0 or choose "
                          f"another --strategy")
    node_stage = contiguous_placement(region_chain_order(problem.topology), problem.even_stage_sizes())
    num_data = node_stage.count(0)
    num_mb = problem.microbatches_for(num_data)
    stages = list(range(problem.num_stages))
    return Solution(node_stage, balanced_routes(problem, node_stage, [stages] * num_mb))
