"""The adaptation benchmark (scripts/adaptation.py): static, adaptive and oracle runs on the emulated cluster
with a link or node event mid-run.

For each event the three runs share the placement and the event:
- static: the plan solved for the network before the event, re-planning off;
- adaptive: the same plan, re-planning on (Note [re-plan while training] in skippipe/replan.py);
- oracle: the same placement, paths and order solved from the start for the network after the event.

Note [which link, which node]: the event's target is chosen by the simulator, before any run: among the
links the static plan uses (and among all nodes), the one whose change makes the static plan slowest
relative to the oracle plan for the changed network (both predicted with the cost model). A link no path
uses, or one the re-solve cannot route around with the placement fixed, would show no adaptation at all.

Compute is emulated (Note [emulated compute] in skippipe/emulation/emulate.py): each node's forward, loss
and backward take what the reference model's (llama-500m) would on the topology's node, as hops do on its
links. Without it the tiny model's compute is 1-2% of an iteration and no straggler matters: with real
compute the best node event was predicted to slow the static plan by 1.2% and measured at 0.2%. The nodes
are `compute_speedup` times faster than the topology's figure (0.055 s per sample and layer, a slow
accelerator): at 1x compute is most of the iteration and the best link event is predicted to slow the
static plan by only 1.18x; at 4x compute is about half of it and both events matter (predicted by `predicted_gap`:
1.54x for the link, 1.44x for the node). Every time is divided by `time_scale`
(bandwidths and FLOP/s multiplied, latencies divided) so that six runs of 20 steps fit in 30 minutes.
"""
from __future__ import annotations

import os
import statistics
from collections import Counter
from pathlib import Path

from scheduler.solve import solve
from skippipe.config import Config, load_config
from skippipe.emulation.emulate import (EmulatedCluster, auto_bandwidth_scale, auto_compute_scale, compute_floors,
                                        emulated_topology, write_topology)
from skippipe.emulation.events import LinkEvent, NodeEvent
from skippipe.metrics import read_metrics
from skippipe.planning import build_problem
from topology.load import load_topology
from topology.model_spec import load_model_spec
from topology.network import Node, Topology
from topology.plan import Plan
from topology.simulator import simulate

MEDIAN_FROM = 6  # the report's median covers steps event_step + 6 onward (after any re-plan settled)


def after_event(topology: Topology, event) -> Topology:
    """The network as it is once `event` has happened (what the oracle plan is solved for)."""
    bw = topology.bandwidth_gbit_s.copy()
    nodes = list(topology.nodes)
    if isinstance(event, LinkEvent):
        bw[event.a, event.b] *= event.factor
        bw[event.b, event.a] *= event.factor
    else:
        old = nodes[event.node]
        nodes[event.node] = Node(old.id, old.name, old.region, old.flops / event.factor, old.memory_gb)
    return Topology(f"{topology.name}-after-{event.kind}", nodes, topology.latency_ms.copy(), bw)


def oracle_plan(cfg: Config, static: Plan, topology: Topology) -> Plan:
    """`static`'s placement, paths and order solved for `topology`."""
    problem = build_problem(cfg, topology, fixed_placement=static.placement(), stage_sizes=None)
    return solve(problem, cfg.schedule.strategy)


def predicted_gap(cfg: Config, static: Plan, shaped: Topology, event) -> dict:
    """The static plan's and the oracle's predicted iteration on the network after `event`."""
    changed = after_event(shaped, event)
    problem = build_problem(cfg, changed)
    static_s = simulate(static.workload(), cost=problem.cost, memory=problem.memory).iteration_s
    oracle_s = oracle_plan(cfg, static, changed).predicted["iteration_s"]
    return {"static_predicted_s": static_s, "oracle_predicted_s": oracle_s, "ratio": static_s / oracle_s}


def choose_events(cfg: Config, static: Plan, shaped: Topology, *, step: int, link_factor: float,
                  node_factor: float) -> list[tuple[object, dict]]:
    """The link and the node whose event matters most to the static plan (Note [which link, which node])."""
    used = Counter(tuple(sorted(pair)) for p in static.paths for pair in zip(p.nodes, p.nodes[1:]))
    links = [LinkEvent(step, a, b, link_factor) for a, b in used]
    nodes = [NodeEvent(step, n.id, node_factor) for n in shaped.nodes]
    chosen = []
    for candidates in (links, nodes):
        scored = [(predicted_gap(cfg, static, shaped, e), e) for e in candidates]
        gap, event = max(scored, key=lambda x: x[0]["ratio"])
        chosen.append((event, gap))
    return chosen


def summarise(run_dir: Path, event_step: int) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no steps; see {run_dir}/logs")
    times = [r["iteration_s"] for r in records]
    after = [r["iteration_s"] for r in records if r["step"] >= event_step + MEDIAN_FROM]
    switches = [{"step": r["step"], **{k: r["replan"][k] for k in ("reason", "switched", "plan_version", "from_step")},
                 "new_plan_predicted_s": r["replan"].get("new_plan_predicted_s"),
                 "current_plan_predicted_s": r["replan"].get("current_plan_predicted_s")}
                for r in records if r.get("replan")]
    losses = [r["loss"] for r in records]
    out = {"iteration_s": times, "median_iteration_s_after_event": statistics.median(after) if after else None,
           "loss": losses, "plan_version": [r.get("plan_version", 0) for r in records], "run_dir": str(run_dir)}
    if switches:
        out["replans"] = switches
        first = next((s for s in switches if s["switched"]), None)
        out["replanned_at_step"] = first["step"] if first else None
        if first is not None:  # Losses continuous: the jump at the switch against the largest one before it
            k = first["step"]  # the switch is between steps k and k + 1 (1-based)
            before = [abs(b - a) for a, b in zip(losses[:k - 1], losses[1:k])]
            out["loss_jump_at_switch"] = abs(losses[k] - losses[k - 1]) if k < len(losses) else None
            out["largest_loss_change_before_switch"] = max(before) if before else None
    return out


def run_adaptation(*, topology_path: str, config: str, work_dir: str | Path, steps: int = 20, skip_ratio: float = 0.25,
                   event_step: int = 6, link_factor: float = 0.25, node_factor: float = 3.0,
                   reference_model: str = "llama-500m", overrides: list[str] = (), timeout_s: float = 900,
                   nice: int = -19, kinds: tuple[str, ...] = ("link", "node"), time_scale: float = 2.0,
                   compute_speedup: float = 4.0) -> dict:
    """The report of the issue's adaptation benchmark (module docstring); needs root."""
    work_dir = Path(work_dir)
    base = [*overrides, f"schedule.skip_ratio={skip_ratio}", f"train.steps={steps}", "train.log_every=1"]
    cfg = load_config(config, base)
    model, reference = load_model_spec(cfg.model), load_model_spec(reference_model)
    scale = auto_bandwidth_scale(model, reference) * time_scale
    compute_scale = auto_compute_scale(model, reference) * time_scale * compute_speedup
    shaped = emulated_topology(load_topology(topology_path), scale, 1.0 / time_scale, compute_scale)
    work_dir.mkdir(parents=True, exist_ok=True)
    shaped_path = write_topology(work_dir / "topology.shaped.yaml", shaped)
    cfg.schedule.topology = str(shaped_path)
    static = solve(build_problem(cfg, shaped), cfg.schedule.strategy)
    static.save(work_dir / "static.json")
    compute_env = compute_floors(build_problem(cfg, shaped).cost, static.placement())
    names = [n.name for n in shaped.nodes]
    report = {"topology": topology_path, "config": config, "steps": steps, "skip_ratio": skip_ratio,
              "reference_model": reference_model, "time_scale": time_scale,
              "compute_speedup": compute_speedup, "bandwidth_scale": scale,
              "latency_scale": 1.0 / time_scale, "compute_scale": compute_scale,
              "compute_floor_s": {names[i]: env for i, env in compute_env.items()},
              "static_predicted_s": static.predicted["iteration_s"], "nice": nice, "placement": static.placement(),
              "load_average_at_start": list(os.getloadavg()), "events": []}
    chosen = [(e, g) for e, g in choose_events(cfg, static, shaped, step=event_step, link_factor=link_factor,
                                               node_factor=node_factor) if e.kind in kinds]
    with EmulatedCluster(shaped, work_dir, nice=nice) as cluster:
        for event, gap in chosen:
            oracle = oracle_plan(cfg, static, after_event(shaped, event))
            oracle_path = work_dir / f"oracle-{event.kind}.json"
            oracle.save(oracle_path)
            entry = {"kind": event.kind, "event_step": event_step, "description": event.describe(names),
                     "why": gap, "runs": {}}
            for name, plan_path, replan in (("static", work_dir / "static.json", False),
                                            ("adaptive", work_dir / "static.json", True),
                                            ("oracle", oracle_path, False)):
                run_dir = work_dir / f"{event.kind}-{name}"
                args = ["--config", config, "--plan", str(plan_path), "--topology", str(shaped_path), *base,
                        f"schedule.replan.enabled={str(replan).lower()}"]
                wall = cluster.train(run_dir, args, timeout_s, events=[event], compute_env=compute_env)
                summary = summarise(run_dir, event_step)
                summary.update(wall_s=wall, events_applied=cluster.last_events)
                entry["runs"][name] = summary
                median = summary["median_iteration_s_after_event"]
                print(f"{event.kind} event, {name}: median iteration after the event "
                      + (f"{median:.3f} s" if median is not None else f"not measured (under {MEDIAN_FROM} steps after it)")
                      + (f", re-planned after step {summary.get('replanned_at_step')}" if replan else ""), flush=True)
            runs = entry["runs"]
            oracle_s = runs["oracle"]["median_iteration_s_after_event"]
            replanned = runs["adaptive"].get("replanned_at_step")
            entry["targets"] = {
                "adaptive_replanned_within_5": replanned is not None and replanned - event_step < 5,
                "adaptive_over_oracle": runs["adaptive"]["median_iteration_s_after_event"] / oracle_s,
                "static_over_oracle": runs["static"]["median_iteration_s_after_event"] / oracle_s,
            }
            report["events"].append(entry)
    report["load_average_at_end"] = list(os.getloadavg())
    return report
