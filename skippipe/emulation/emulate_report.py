"""What an emulated run showed: measured vs predicted iteration time, profiled vs shaped links, Gantt charts.

Note [prediction]: the plan a run executed is replayed strictly by the topology simulator on the topology
that was shaped (bandwidths and latencies as emulated), with each node's compute speed as measured: by the
start-up profile when the run profiled, else from the run's own per-action timestamps (median forward
seconds per layer per sample). Messages and gradients are counted in the bytes the CPU runtime moves:
float32 activations and gradients, whatever the model spec's dtype_bytes says. The emulator shapes every
pair on its own htb class: one node's sends to different peers do not share an uplink
(share_uplink=False), but messages on one link queue behind each other (share_link=True: gloo sends a
pair's messages in order on one socket).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np

from skippipe.metrics import read_metrics
from topology.cost import CostModel, layer_forward_flops
from topology.load import load_topology
from topology.model_spec import ModelSpec, split_layers
from topology.network import Node, Topology
from topology.plan import Action, Plan
from topology.simulator import Event, SimResult, simulate

CPU_WIRE_BYTES = 4  # the CPU runtime trains, sends and all-reduces in float32


def median_after_first(values: list[float]) -> float:
    """Median over the steps after the first (the first connects peers and warms up)."""
    rest = values[1:] if len(values) > 1 else values
    return float(np.median(rest))


def compute_from_profile(run_dir: Path) -> tuple[list[float], float] | None:
    """Per-node FLOP/s and the backward/forward ratio from the start-up profile, if the run made one."""
    path = run_dir / "profile.json"
    if not path.is_file():
        return None
    ranks = json.loads(path.read_text())["ranks"]
    if any("compute" not in r for r in ranks):
        return None
    ranks = sorted(ranks, key=lambda r: r["rank"])
    return [r["compute"]["flops"] for r in ranks], statistics.median(r["compute"]["backward_factor"] for r in ranks)


def compute_from_timeline(records: list[dict], plan: Plan, model: ModelSpec) -> tuple[list[float], float]:
    """Per-node FLOP/s from the run's own forward timestamps (steps after the first), and backward/forward."""
    layers = split_layers(model.num_layers, plan.num_stages)
    per_node: dict[int, list[float]] = {n.id: [] for n in plan.nodes}
    ratios = []
    rank_node = {n.rank: n.id for n in plan.nodes}
    for record in records[1:] or records:
        for rank, timeline in enumerate(record["timeline"]):
            node, seconds = rank_node[rank], {}
            for name, start, end in timeline:
                action = Action.parse(name)
                seconds[(action.kind, action.microbatch)] = end - start
                if action.kind == "F" and action.stage > 0:
                    flops = plan.microbatch_size * len(layers[action.stage]) * layer_forward_flops(model)
                    per_node[node].append(flops / max(end - start, 1e-6))
            ratios += [seconds[("B", mb)] / seconds[("F", mb)] for kind, mb in seconds if kind == "F"
                       and ("B", mb) in seconds and seconds[("F", mb)] > 0]
    fallback = statistics.median([f for v in per_node.values() for f in v] or [1e12])
    return ([statistics.median(per_node[n]) if per_node[n] else fallback for n in sorted(per_node)],
            statistics.median(ratios) if ratios else 2.0)


def predict(plan: Plan, *, shaped: Topology, model: ModelSpec, flops: list[float], backward_factor: float,
            share_uplink: bool = False) -> SimResult:
    """Note [prediction]: the plan replayed on the shaped topology with the measured compute speed."""
    nodes = [Node(n.id, n.name, n.region, float(f), n.memory_gb) for n, f in zip(shaped.nodes, flops)]
    topo = Topology(shaped.name, nodes, shaped.latency_ms, shaped.bandwidth_gbit_s)
    wire = dataclasses.replace(model, dtype_bytes=CPU_WIRE_BYTES)  # what the CPU runtime really sends
    cost = CostModel(topo, wire, plan.microbatch_size, plan.num_stages, backward_factor=backward_factor,
                     grad_bytes_per_param=CPU_WIRE_BYTES)
    return simulate(plan.workload(), cost=cost, share_uplink=share_uplink, share_link=True)


def summarise_run(run_dir: str | Path, shaped: Topology, model: ModelSpec) -> dict:
    """measured_iteration_s, predicted_iteration_s and the figures behind them for one run dir."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no steps; did the run fail? see {run_dir}/logs")
    plan = Plan.load(run_dir / "plan.json")
    iterations = [r["iteration_s"] for r in records]
    timeline_compute = compute_from_timeline(records, plan, model)
    profiled = compute_from_profile(run_dir)
    flops, backward = profiled or timeline_compute
    predicted = predict(plan, shaped=shaped, model=model, flops=flops, backward_factor=backward)
    alternative = predict(plan, shaped=shaped, model=model, flops=timeline_compute[0],
                          backward_factor=timeline_compute[1])
    measured = median_after_first(iterations)
    out = {
        "skip_ratio": plan.skip_ratio, "measured_iteration_s": measured,
        "predicted_iteration_s": predicted.iteration_s,
        "prediction_error": predicted.iteration_s / measured - 1,
        "compute_source": "profile" if profiled else "timeline",
        "predicted_iteration_s_timeline_compute": alternative.iteration_s,
        # The same with one uplink per node (the simulator's default), which the emulation does not shape.
        "predicted_iteration_s_shared_uplink": predict(plan, shaped=shaped, model=model, flops=flops, backward_factor=backward,
                                                       share_uplink=True).iteration_s,
        "iteration_s": iterations, "loss": [r["loss"] for r in records],
        "compute_s_median_per_rank": [float(np.median([r["compute_s"][k] for r in records[1:] or records]))
                                      for k in range(len(records[0]["compute_s"]))],
        "node_flops": flops, "backward_factor": backward, "strategy": plan.strategy,
        "plan_predicted_iteration_s": plan.predicted.get("iteration_s"), "run_dir": str(run_dir),
    }
    if (run_dir / "topology.measured.yaml").is_file():
        out["profile"] = profile_errors(load_topology(run_dir / "topology.measured.yaml"), shaped)
    return out


def profile_errors(measured: Topology, shaped: Topology) -> dict:
    """Relative bandwidth errors and absolute latency errors of every measured pair against the shaped one."""
    off = ~np.eye(shaped.num_nodes, dtype=bool)
    bw = np.abs(measured.bandwidth_gbit_s[off] - shaped.bandwidth_gbit_s[off]) / shaped.bandwidth_gbit_s[off]
    lat = np.abs(measured.latency_ms[off] - shaped.latency_ms[off])
    return {"bandwidth_rel_errors": bw.round(5).tolist(), "bandwidth_rel_error_median": float(np.median(bw)),
            "bandwidth_rel_error_max": float(bw.max()), "latency_abs_error_ms_median": float(np.median(lat)),
            "latency_abs_error_ms_max": float(lat.max())}


def measured_events(record: dict) -> list[Event]:
    """The compute bars of one measured step (per-rank timestamps from metrics.jsonl), as simulator events."""
    events = []
    for rank, timeline in enumerate(record["timeline"]):
        events += [Event(rank, "compute", name, start, end) for name, start, end in timeline]
    return events


def plot_measured_vs_simulated(path: str | Path, *, record: dict, simulated: SimResult, plan: Plan, labels: list[str],
                               title: str) -> Path:
    """One measured iteration above the simulated one, on the same time axis, one row per node."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    colours = {"F": "#4c72b0", "B": "#dd8452", "L": "#55a868", "allreduce": "#c44e52"}
    rank_node = {n.rank: n.id for n in plan.nodes}
    events = measured_events(record)
    origin = min((e.start for e in events), default=0.0)  # timestamps are relative to rank 0's start
    measured = [Event(rank_node[e.node], e.kind, e.name, e.start - origin, e.end - origin) for e in events]
    panels = [(f"measured: step {record['step']}, {record['iteration_s']:.2f} s", measured, record["iteration_s"]),
              (f"simulated: {simulated.iteration_s:.2f} s", simulated.events, simulated.iteration_s)]
    span = max(p[2] for p in panels)
    fig, axes = plt.subplots(2, 1, figsize=(12, 1.2 + 0.45 * len(labels) * 2), sharex=True)
    for ax, (name, events, end) in zip(axes, panels):
        for e in events:
            if e.kind == "send":
                continue
            colour = colours["allreduce"] if e.kind == "allreduce" else colours[e.name[0]]
            # Compute takes milliseconds here; a minimum width (0.2% of the axis) keeps every action visible.
            ax.barh(e.node, max(e.end - e.start, span / 500), left=e.start, height=0.8, color=colour,
                    alpha=0.5 if e.kind == "allreduce" else 1.0, edgecolor="none")
        ax.axvline(end, color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds from the start of the iteration")
    axes[0].legend(handles=[Patch(color=c, label=k) for k, c in
                            (("forward", colours["F"]), ("loss", colours["L"]), ("backward", colours["B"]),
                             ("all-reduce (simulated only)", colours["allreduce"]))], loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def gantt_for_run(run_dir: str | Path, *, shaped: Topology, model: ModelSpec, out: str | Path, summary: dict) -> Path:
    """Gantt of the run's median step (among those after the first) beside its simulation."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    plan = Plan.load(run_dir / "plan.json")
    candidates = records[1:-1] or records[1:] or records  # the last step also evaluates; leave it out
    record = sorted(candidates, key=lambda r: r["iteration_s"])[len(candidates) // 2]
    simulated = predict(plan, shaped=shaped, model=model, flops=summary["node_flops"],
                        backward_factor=summary["backward_factor"])
    labels = [f"{n.name} (stage {plan.nodes[n.id].stage})" for n in shaped.nodes]
    return plot_measured_vs_simulated(out, record=record, simulated=simulated, plan=plan, labels=labels,
                                      title=f"skip ratio {plan.skip_ratio}: one iteration on the emulated cluster")
