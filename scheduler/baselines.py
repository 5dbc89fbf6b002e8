"""Baselines for comparison: `random-skip`, network-blind partial paths under the same structural rules.

The placement is the full pipeline's network-aware rule (scheduler.full), so the comparison with
`skippipe` isolates what network-aware paths, placement and ordering buy. Each microbatch gets a random
stage set that keeps CC4's counts exact, sorted (no reordering), and random replicas that keep TC1's even
spread (scheduler.paths, "random"); the simulator's default greedy dispatch orders the work.
"""
from __future__ import annotations

import numpy as np

from scheduler.full import contiguous_placement, region_chain_order
from scheduler.paths import build_routes
from scheduler.problem import Problem, Solution


def random_skip(problem: Problem) -> Solution:
    node_stage = contiguous_placement(region_chain_order(problem.topology), problem.even_stage_sizes())
    routes, _ = build_routes(problem, node_stage=node_stage, rng=np.random.default_rng(problem.seed), choose="random",
                             reorder=False)
    return Solution(node_stage, routes, None)
