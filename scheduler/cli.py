"""`python -m scheduler`: solve a plan, validate one, compare strategies."""
from __future__ import annotations

import time

from scheduler.constraints import check_topology, violations
from scheduler.problem import Problem
from scheduler.solve import DEFAULT_STRATEGY, STRATEGIES, solve
from topology.errors import ArgumentParser, ConfigError, cli_errors
from topology.load import load_topology
from topology.model_spec import load_model_spec
from topology.plan import Plan


def positive_int(text: str, flag: str = "a count") -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{flag} must be a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers like 5,3,3,3, got {text!r}") from None


def add_problem_args(p) -> None:
    p.add_argument("--topology", required=True, help="scenario name or topology YAML")
    p.add_argument("--nodes", type=str, help="node count (required for a scenario)")
    p.add_argument("--stages", type=str, help="number of pipeline stages")
    p.add_argument("--stage-sizes", type=str, help="nodes per stage, e.g. 5,3,3,3,3,3 (sums to --nodes)")
    p.add_argument("--model", default="llama-500m", help="model YAML or a name in configs/models (default llama-500m)")
    p.add_argument("--microbatch-size", type=str, default="1", help="samples per microbatch (default 1)")
    p.add_argument("--microbatches", type=str, help="microbatches per iteration (default: memory x data nodes)")
    p.add_argument("--memory", type=str, default="3", help="microbatches' activations a node may hold (default 3)")
    p.add_argument("--skip-ratio", type=float, default=0.0, help="fraction of stages each microbatch skips")
    p.add_argument("--max-swaps", type=int, default=2, help="CC3: neighbouring swaps allowed per path (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, help="seconds the solver may search (default: its own budget)")


def problem_from_args(args) -> Problem:
    num_nodes = positive_int(args.nodes, "--nodes") if args.nodes is not None else None
    topology = load_topology(args.topology, num_nodes, args.seed)
    return Problem(
        topology=topology, model=load_model_spec(args.model),
        microbatch_size=positive_int(args.microbatch_size, "--microbatch-size"),
        num_stages=positive_int(args.stages, "--stages") if args.stages is not None else None,
        stage_sizes=int_list(args.stage_sizes) if args.stage_sizes is not None else None,
        num_microbatches=positive_int(args.microbatches, "--microbatches") if args.microbatches is not None else None,
        memory=positive_int(args.memory, "--memory"), skip_ratio=args.skip_ratio, max_swaps=args.max_swaps,
        seed=args.seed, time_limit=args.time_limit,
        topology_source={"spec": args.topology, "seed": args.seed},
    )


def cmd_solve(args) -> None:
    problem = problem_from_args(args)
    started = time.perf_counter()
    plan = solve(problem, args.strategy)
    elapsed = time.perf_counter() - started
    plan.save(args.out)
    print(f"{args.strategy}: {len(plan.nodes)} nodes, {plan.num_stages} stages, {plan.num_microbatches} microbatches, "
          f"skip ratio {plan.skip_ratio} | predicted iteration {plan.predicted['iteration_s']:.3f} s | "
          f"solved in {elapsed:.2f} s | wrote {args.out}")


def cmd_validate(args) -> None:
    plan = Plan.load(args.plan)
    if args.topology:
        check_topology(plan, load_topology(args.topology, positive_int(args.nodes, "--nodes") if args.nodes else None,
                                           args.seed))
    found = violations(plan)
    if not found:
        print(f"{args.plan}: valid ({len(plan.nodes)} nodes, {plan.num_stages} stages, {plan.num_microbatches} "
              f"microbatches, skip ratio {plan.skip_ratio})")
        return
    for v in found[:20]:
        print(f"{args.plan}: {v}")
        if v.microbatch is not None and v.microbatch < len(plan.paths):
            print("    " + path_grid(plan, v.microbatch, v.stage))
    raise ConfigError(f"{args.plan} breaks {len(found)} rule(s): first {found[0]}; re-solve it or fix the cells marked [ ]")


def path_grid(plan: Plan, microbatch: int, stage: int | None) -> str:
    """One microbatch's loop as `stage@node` cells, the failing stage in brackets."""
    path = next(p for p in plan.paths if p.microbatch == microbatch)
    cells = [f"[{s}@n{n}]" if s == stage else f"{s}@n{n}" for n, s in zip(path.nodes, path.stages)]
    return f"microbatch {microbatch}: " + " -> ".join(cells) + f" -> loss@n{path.data_node}"


def cmd_compare(args) -> None:
    from scheduler.compare import compare, format_table, write_json
    problem = problem_from_args(args)
    rows = compare(problem, args.strategies.split(",") if args.strategies else None)
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, problem)
        print(f"wrote {args.json}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m scheduler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("solve", help="solve a plan and write plan.json")
    add_problem_args(p)
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=sorted(STRATEGIES))
    p.add_argument("--out", default="plan.json", help="where to write the plan (default plan.json)")
    p.set_defaults(run=cmd_solve)
    p = sub.add_parser("validate", help="check a plan against every constraint")
    p.add_argument("plan")
    p.add_argument("--topology", help="also check the plan was made for this topology")
    p.add_argument("--nodes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_validate)
    p = sub.add_parser("compare", help="every strategy on one setting: iteration time, ratio to full, solve time")
    add_problem_args(p)
    p.add_argument("--strategies", help=f"comma-separated subset of {','.join(sorted(STRATEGIES))} (default: all)")
    p.add_argument("--json", help="also write the comparison as JSON to this file")
    p.set_defaults(run=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        args = build_parser().parse_args(argv)
        args.run(args)
