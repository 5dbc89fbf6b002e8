"""`python -m topology`: show a topology, or simulate a plan on it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from topology.cost import CostModel
from topology.errors import ArgumentParser, ConfigError, cli_errors, program_name
from topology.load import load_topology
from topology.model_spec import load_model_spec
from topology.outputs import claim_output_file
from topology.plan import Plan
from topology.simulator import simulate


def _node_count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"--nodes must be a positive integer, got {text!r}")
    return value


def _count(n: int, noun: str) -> str:
    """'1 node', '3 nodes'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cmd_show(args) -> None:
    claim_output_file(args.plot, overwrite=args.overwrite, flag="--plot")
    topo = load_topology(args.topology, _node_count(args.nodes), args.seed)
    n = topo.num_nodes
    print(f"{topo.name}: {_count(n, 'node')} in {_count(len(topo.regions), 'region')} (fingerprint {topo.fingerprint()})")
    for region in topo.regions:
        members = [node for node in topo.nodes if node.region == region]
        speeds = sorted({f"{node.flops / 1e12:.3g}" for node in members})
        print(f"  {region:<14} {_count(len(members), 'node'):<9}  {'/'.join(speeds)} TFLOP/s effective")
    if n > 1:
        off = ~np.eye(n, dtype=bool)
        lat, bw = topo.latency_ms[off], topo.bandwidth_gbit_s[off]
        print(f"links: latency {lat.min():.3g}-{lat.max():.3g} ms (median {np.median(lat):.3g}), "
              f"bandwidth {bw.min():.3g}-{bw.max():.3g} Gbit/s (median {np.median(bw):.3g})")
        slow = np.unravel_index(np.argmin(np.where(off, topo.bandwidth_gbit_s, np.inf)), (n, n))
        print(f"slowest link: {topo.nodes[slow[0]].name} - {topo.nodes[slow[1]].name} "
              f"({topo.bandwidth_gbit_s[slow]:.3g} Gbit/s, {topo.latency_ms[slow]:.3g} ms)")
    if args.plot:
        from topology.trace import plot_bandwidth
        plot_bandwidth(args.plot, topo)
        print(f"wrote {args.plot}")


def cmd_simulate(args) -> None:
    for flag, path in (("--json", args.json), ("--trace", args.trace), ("--plot", args.plot)):
        claim_output_file(path, overwrite=args.overwrite, flag=flag)
    plan = Plan.load(args.plan)
    topo = load_topology(args.topology, _node_count(args.nodes), args.seed)
    made_for = plan.topology
    if made_for.get("num_nodes", topo.num_nodes) != topo.num_nodes or \
            made_for.get("fingerprint", topo.fingerprint()) != topo.fingerprint():
        raise ConfigError(f"{args.plan} was made for another topology ({made_for.get('name')!r}, "
                          f"{made_for.get('num_nodes')} nodes) than {topo.name!r} with {topo.num_nodes} nodes; "
                          f"pass the topology it was solved for or re-solve")
    workload = plan.workload()
    if workload.order is None:
        raise ConfigError(f"{args.plan} has no order; solve it with python -m scheduler solve")
    model = load_model_spec(args.model or plan.model or "llama-500m")
    microbatch_size = args.microbatch_size if args.microbatch_size is not None else plan.microbatch_size
    num_stages = plan.num_stages
    memory = plan.constraints.get("memory")
    cost = CostModel(topo, model, microbatch_size, num_stages)
    started = time.perf_counter()
    result = simulate(workload, cost=cost, memory=memory, share_uplink=not args.no_uplink_sharing)
    elapsed = time.perf_counter() - started
    busiest = max(range(topo.num_nodes), key=lambda i: result.busy_s[i])
    print(f"iteration {result.iteration_s:.3f} s | bubble {result.bubble_share:.1%} | moved "
          f"{result.bytes_moved / 1e9:.2f} GB | busiest node {topo.nodes[busiest].name} "
          f"({result.busy_s[busiest]:.2f} s busy) | simulated in {elapsed * 1e3:.1f} ms")
    labels = [f"{node.name} (stage {workload.node_stage[node.id]})" for node in topo.nodes]
    if args.json:
        report = result.to_dict(cost)
        for entry, node in zip(report["nodes"], topo.nodes):
            entry.update(name=node.name, stage=workload.node_stage[node.id])
        report.update(plan=str(args.plan), simulate_s=elapsed)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if args.trace:
        from topology.trace import write_trace
        write_trace(args.trace, result.events, labels)
        print(f"wrote {args.trace} (open it in https://ui.perfetto.dev or chrome://tracing)")
    if args.plot:
        from topology.trace import plot_gantt
        plot_gantt(args.plot, result.events, labels,
                   title=f"{plan.strategy or 'plan'} on {topo.name}: {result.iteration_s:.2f} s per iteration")
        print(f"wrote {args.plot}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("topology", "skippipe-topology"), description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("show", help="nodes, regions and a link summary")
    p.add_argument("--topology", required=True, help="scenario name, shipped topology name or topology YAML")
    p.add_argument("--nodes", help="node count (required for a scenario; default: a YAML's own count)")
    p.add_argument("--seed", type=int, default=0, help="seed of seeded scenarios (random)")
    p.add_argument("--plot", help="write a bandwidth heatmap PNG (default: no plot)")
    p.add_argument("--overwrite", action="store_true", help="replace --plot if it exists (default: refuse)")
    p.set_defaults(run=cmd_show)
    p = sub.add_parser("simulate", help="replay a plan on a topology: iteration time, idle, trace, Gantt")
    p.add_argument("--topology", required=True, help="the scenario name or topology YAML the plan was solved for")
    p.add_argument("--nodes", help="node count (required for a scenario; default: a YAML's own count)")
    p.add_argument("--seed", type=int, default=0, help="seed of seeded scenarios (random); as given to solve")
    p.add_argument("--model", help="model YAML or name (default: the plan's)")
    p.add_argument("--microbatch-size", type=int, help="sequences per microbatch (default: the plan's)")
    p.add_argument("--plan", required=True, help="plan.json from python -m scheduler solve")
    p.add_argument("--json", help="write the report JSON, top-level iteration_s (default: no JSON)")
    p.add_argument("--trace", help="write a Chrome/Perfetto trace JSON (default: no trace)")
    p.add_argument("--plot", help="write a Gantt chart PNG, one row per node, bars labelled by microbatch (default: no plot)")
    p.add_argument("--no-uplink-sharing", action="store_true", help="let a node's sends overlap freely")
    p.add_argument("--overwrite", action="store_true", help="replace --json, --trace and --plot files that exist "
                   "(default: refuse)")
    p.set_defaults(run=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        args = build_parser().parse_args(argv)
        args.run(args)
