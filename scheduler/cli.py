"""`python -m scheduler`: solve a plan, validate one, compare strategies."""
from __future__ import annotations

import time

from scheduler.constraints import check_topology, violations
from scheduler.problem import Problem
from scheduler.solve import DEFAULT_STRATEGY, STRATEGIES, solve
from topology.errors import ArgumentParser, ConfigError, cli_errors, program_name
from topology.load import load_topology
from topology.model_spec import load_model_spec
from topology.outputs import claim_output_file
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
    p.add_argument("--topology", required=True, help="scenario name, shipped topology name or topology YAML")
    p.add_argument("--nodes", type=str, help="node count (required for a scenario; default: a YAML's own count)")
    # Either one; both only when they agree (the count of --stage-sizes is --stages), else an error.
    p.add_argument("--stages", type=str, help="number of pipeline stages, their sizes chosen by the solver; "
                   "with --stage-sizes as well, the two must agree (default: the number --stage-sizes gives)")
    p.add_argument("--stage-sizes", type=str, help="nodes per stage, e.g. 5,3,3,3,3,3 (sums to --nodes); "
                   "use it or --stages, or both if they agree (default: sizes chosen by the solver for --stages)")
    p.add_argument("--model", default="llama-500m", help="model YAML, or a shipped model by name "
                   "(llama-tiny, llama-500m, llama-1.5b, llama-8b, ...)")
    p.add_argument("--microbatch-size", type=str, default="1", help="samples per microbatch")
    p.add_argument("--microbatches", type=str, help="microbatches per iteration (default: memory x data nodes)")
    p.add_argument("--memory", type=str, default="3", help="TC1: microbatches' activations a node may hold, "
                   "or auto: from each node's memory_gb, the stage's parameters and AdamW state (topology/memory.py)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="for --memory auto: the training precision")
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "layer"],
                   help="for --memory auto: activation checkpointing per layer, or none")
    p.add_argument("--skip-ratio", type=float, default=0.0, help="fraction of stages each microbatch skips, in [0, 1)")
    p.add_argument("--max-swaps", type=int, default=2, help="CC3: neighbouring swaps allowed per path")
    p.add_argument("--seed", type=int, default=0, help="solver seed (and the seed of seeded scenarios)")
    p.add_argument("--time-limit", type=float, help="wall-clock seconds the solver may search (default: no limit; "
                   "its budget is counted in evaluations)")


def problem_from_args(args) -> Problem:
    num_nodes = positive_int(args.nodes, "--nodes") if args.nodes is not None else None
    topology = load_topology(args.topology, num_nodes, args.seed)
    model = load_model_spec(args.model)
    memory, explanation = positive_int(args.memory, "--memory") if args.memory != "auto" else "auto", None
    if memory == "auto":
        from topology.memory import describe, resolve_memory
        stages = (len(int_list(args.stage_sizes)) if args.stage_sizes is not None
                  else positive_int(args.stages, "--stages") if args.stages is not None else None)
        if stages is None:
            raise ConfigError("pass --stages S or --stage-sizes a,b,...")
        memory, explanation = resolve_memory(
            "auto", topology=topology, spec=model, num_stages=stages,
            microbatch_size=positive_int(args.microbatch_size, "--microbatch-size"), precision=args.precision,
            checkpointing=args.activation_checkpointing)
        print(describe(explanation))
    return Problem(
        topology=topology, model=model, memory_explanation=explanation,
        microbatch_size=positive_int(args.microbatch_size, "--microbatch-size"),
        num_stages=positive_int(args.stages, "--stages") if args.stages is not None else None,
        stage_sizes=int_list(args.stage_sizes) if args.stage_sizes is not None else None,
        num_microbatches=positive_int(args.microbatches, "--microbatches") if args.microbatches is not None else None,
        memory=memory, skip_ratio=args.skip_ratio, max_swaps=args.max_swaps,
        seed=args.seed, time_limit=args.time_limit,
        topology_source={"spec": args.topology, "seed": args.seed},
    )


def cmd_solve(args) -> None:
    claim_output_file(args.out, overwrite=args.overwrite, flag="--out")
    problem = problem_from_args(args)
    started = time.perf_counter()
    plan = solve(problem, args.strategy)
    elapsed = time.perf_counter() - started
    plan.save(args.out)
    print(f"{args.strategy}: {len(plan.nodes)} nodes, {plan.num_stages} stages, {plan.num_microbatches} microbatches, "
          f"skip ratio {plan.skip_ratio} | predicted iteration {plan.predicted['iteration_s']:.3f} s | "
          f"solved in {elapsed:.2f} s | wrote {args.out}")


def cmd_validate(args) -> None:
    if args.nodes is not None and not args.topology:
        raise ConfigError("--nodes applies to a --topology scenario; pass --topology NAME with it, or drop --nodes")
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
    claim_output_file(args.json, overwrite=args.overwrite, flag="--json")
    problem = problem_from_args(args)
    rows = compare(problem, args.strategies.split(",") if args.strategies else None)
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, problem)
        print(f"wrote {args.json}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("scheduler", "skippipe-scheduler"), description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("solve", help="solve a plan and write plan.json")
    add_problem_args(p)
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=sorted(STRATEGIES),
                   help="full: the ordinary full pipeline; random-skip: random stage sets; skippipe-no-tc2: cheapest "
                   "loop per microbatch, blind to the others; skippipe: collision-aware paths and order (README, Strategies)")
    p.add_argument("--out", default="plan.json", help="where to write the plan")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.set_defaults(run=cmd_solve)
    p = sub.add_parser("validate", help="check a plan against every constraint")
    p.add_argument("plan", help="the plan.json to check")
    p.add_argument("--topology", help="also check the plan was made for this topology (default: rules only)")
    p.add_argument("--nodes", help="node count of a scenario --topology (default: none, as for a YAML)")
    p.add_argument("--seed", type=int, default=0, help="seed of a seeded scenario --topology")
    p.set_defaults(run=cmd_validate)
    p = sub.add_parser("compare", help="every strategy on one setting: iteration time, ratio to full, solve time")
    add_problem_args(p)
    p.add_argument("--strategies", help=f"comma-separated subset of {','.join(sorted(STRATEGIES))} (default: all)")
    p.add_argument("--json", help="also write the comparison as JSON to this file (default: table only)")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists (default: refuse)")
    p.set_defaults(run=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        args = build_parser().parse_args(argv)
        args.run(args)
