"""`python -m scheduler compare`: every strategy on one setting, side by side.

`full` always runs at skip ratio 0 (that is what a full pipeline is); the others at the requested ratio.
When --microbatches is not given, every strategy gets the full pipeline's default count, so that all of
them do the same work per iteration and their iteration times compare directly.
"""
from __future__ import annotations

import dataclasses
import json
import time

from scheduler.problem import Problem
from scheduler.solve import STRATEGIES, solve


def compare(problem: Problem, strategies: list[str] | None = None) -> list[dict]:
    """Solve `problem` with each named strategy (default: every one in STRATEGIES, in its order); one row
    per strategy: predicted iteration_s, solve_s (wall), ratio_to_full, samples_per_s and more."""
    names = strategies or list(STRATEGIES)
    if problem.num_microbatches is None:
        problem = dataclasses.replace(problem, num_microbatches=problem.microbatches_for(problem.even_stage_sizes()[0]))
    rows = []
    for name in names:
        setting = dataclasses.replace(problem, skip_ratio=0.0) if name == "full" else problem
        started = time.perf_counter()
        plan = solve(setting, name)
        elapsed = time.perf_counter() - started
        iteration = float(plan.predicted["iteration_s"])
        rows.append({"strategy": name, "iteration_s": iteration, "solve_s": elapsed,
                     "skip_ratio": plan.skip_ratio, "num_microbatches": plan.num_microbatches,
                     "samples_per_s": plan.num_microbatches * plan.microbatch_size / iteration if iteration else 0.0,
                     "bubble_share": float(plan.predicted.get("bubble_share", 0.0)),
                     "stage_sizes": [sum(1 for n in plan.nodes if n.stage == s) for s in range(plan.num_stages)]})
    full = next((r["iteration_s"] for r in rows if r["strategy"] == "full"), None)
    for row in rows:
        row["ratio_to_full"] = row["iteration_s"] / full if full else None
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'strategy':<17} {'iteration (s)':>13} {'x full':>7} {'samples/s':>10} {'bubble':>7} {'solve (s)':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['ratio_to_full']:.3f}" if r["ratio_to_full"] is not None else "-"
        lines.append(f"{r['strategy']:<17} {r['iteration_s']:>13.2f} {ratio:>7} {r['samples_per_s']:>10.2f} "
                     f"{r['bubble_share']:>7.1%} {r['solve_s']:>9.2f}")
    return "\n".join(lines)


def write_json(rows: list[dict], path: str, problem: Problem) -> None:
    report = {"topology": problem.topology.name, "num_nodes": problem.topology.num_nodes,
              "model": problem.model.name, "microbatch_size": problem.microbatch_size,
              "skip_ratio": problem.skip_ratio, "memory": problem.memory, "seed": problem.seed,
              "strategies": rows}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
