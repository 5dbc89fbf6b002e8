"""Re-estimating the network from the per-rank action timelines the runtime gathers.

Note [timeline estimate]: what a step's timelines (per rank, [action, start, end], seconds on one clock)
say about the links and the nodes.
- A message goes from the end of its producing action a on node n (the send is issued then) to node m,
  where its consuming action b starts once it has arrived. b's start is the message's arrival only when
  m sat idle before b (its previous action ended more than `min_wait_s` earlier: it was blocked on the
  receive); otherwise the message waited in m's queue and the observation says nothing (receiver
  queueing). Before a node's first action of the step, the step's start (the timelines' origin: rank 0's
  iteration start, which every rank begins within a few milliseconds of, after the previous step's
  collectives) stands for the previous action's end.
- The link is a FIFO per pair (the emulated links are shaped per pair, and one TCP connection carries a
  pair's messages): when the previous message on the pair arrived after this one could have started
  (issue + latency), this one queued behind it and only arrival - previous arrival is its serialisation.
  A previous arrival that was not observed makes the observation unusable in that case too.
- One message size cannot split a hop into latency and serialisation, so the latency is kept from the
  previous estimate and the rest is serialisation: bandwidth = bytes x 8 / serialisation. A link whose
  hop is mostly latency (serialisation under a tenth of it) keeps its previous bandwidth.
- Node speed: a forward of stage s on node n costs the cost model's FLOPs for it (CostModel.forward_s x
  the node's FLOP/s), so measured FLOP/s = those FLOPs / the measured forward seconds.
- Robustness: per link and per node, observations of the last steps are pooled, those further than 3
  scaled MADs from their median are dropped (the MAD, scaled by 1.4826, estimates the standard deviation
  of normal noise; Rousseeuw & Croux 1993), and the median of the rest is the estimate. Links and nodes
  with no observation keep the previous estimate.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from topology.cost import CostModel
from topology.network import Node, Topology
from topology.plan import Action, Plan, dependencies

Timelines = list[list[list]]  # per rank: [action text, start s, end s], in execution order


def robust_median(values: list[float], k: float = 3.0) -> float:
    """Median of `values` after dropping those more than k scaled MADs from the median (see the Note)."""
    med = statistics.median(values)
    mad = 1.4826 * statistics.median(abs(v - med) for v in values)
    kept = [v for v in values if mad == 0 or abs(v - med) <= k * mad]
    return statistics.median(kept)


def _by_node(plan: Plan, timelines: Timelines) -> dict[int, dict[Action, tuple[float, float, float]]]:
    """node -> action -> (start, end, end of the node's previous action, or 0.0 for its first)."""
    out = {}
    for rank, rows in enumerate(timelines):
        node = plan.node_of_rank(rank).id
        seen, prev = {}, 0.0  # every rank starts the step at about rank 0's start, the timelines' origin
        for name, start, end in rows:
            seen[Action.parse(name)] = (float(start), float(end), prev)
            prev = float(end)
        out[node] = seen
    return out


def link_hops(plan: Plan, timelines: Timelines, *, latency_s: np.ndarray, min_wait_s: float = 0.002
              ) -> dict[tuple[int, int], list[float]]:
    """(src node, dst node) -> the step's usable hop times in seconds (latency + serialisation of one
    message, net of receiver and link queueing; Note [timeline estimate]). `latency_s` [src, dst]: the
    latency estimate in force."""
    acts = _by_node(plan, timelines)
    messages = defaultdict(list)  # pair -> [(issue, arrival or None, consumer start)]
    for path in plan.paths:
        for a, n, b, m in dependencies(path):
            if n == m or a not in acts.get(n, {}) or b not in acts.get(m, {}):
                continue
            issue = acts[n][a][1]
            start, _, prev_end = acts[m][b]
            waited = start - prev_end > min_wait_s
            messages[n, m].append((issue, start if waited else None, start))
    hops = defaultdict(list)
    for (n, m), items in messages.items():
        lat = float(latency_s[n, m])
        previous = None  # (arrival or None, consumer start) of the pair's previous message
        for issue, arrival, consumed in sorted(items):
            if arrival is not None:
                if previous is None or previous[1] <= issue + lat:  # the link was free: it arrived by then
                    hops[n, m].append(arrival - issue)
                elif previous[0] is not None:  # queued behind the previous message
                    hops[n, m].append(lat + arrival - previous[0])
            previous = (arrival, consumed)
    return dict(hops)


def forward_seconds(plan: Plan, timelines: Timelines) -> dict[int, list[tuple[int, float]]]:
    """node -> [(stage, seconds)] of its forwards in the step."""
    out = defaultdict(list)
    for node, seen in _by_node(plan, timelines).items():
        for action, (start, end, _) in seen.items():
            if action.kind == "F":
                out[node].append((action.stage, end - start))
    return dict(out)


def estimate_topology(plan: Plan, steps: list[Timelines], *, prior: Topology, cost: CostModel,
                      name: str | None = None) -> tuple[Topology, dict]:
    """The topology re-estimated from the timelines of `steps` (oldest first), `prior` where nothing was
    observed. Returns it and a summary {"links": {"a-b": {...}}, "nodes": {name: {...}}} of what changed.
    `cost` must be built on `prior` (its FLOPs per forward are the yardstick for node speed)."""
    n = prior.num_nodes
    latency_ms = prior.latency_ms.copy()
    bandwidth = prior.bandwidth_gbit_s.copy()
    hops, forwards = defaultdict(list), defaultdict(list)
    for timelines in steps:
        for pair, values in link_hops(plan, timelines, latency_s=prior.latency_ms / 1e3).items():
            hops[pair] += values
        for node, values in forward_seconds(plan, timelines).items():
            forwards[node] += values
    names = [node.name for node in prior.nodes]
    summary = {"links": {}, "nodes": {}}
    for (a, b), values in sorted(hops.items()):
        hop = robust_median(values)
        lat = latency_ms[a, b] / 1e3
        serialise = hop - lat
        if serialise < 0.1 * hop:
            continue  # latency-bound: the bandwidth is not observable with one message size
        bandwidth[a, b] = cost.activation_bytes * 8 / serialise / 1e9
        summary["links"][f"{names[a]}-{names[b]}"] = {
            "observations": len(values), "hop_s": hop, "bandwidth_gbit_s": float(bandwidth[a, b]),
            "previous_bandwidth_gbit_s": float(prior.bandwidth_gbit_s[a, b])}
    nodes = list(prior.nodes)
    for node_id, values in sorted(forwards.items()):
        old = prior.nodes[node_id]
        measured = [float(cost.forward_s[s, node_id]) * old.flops / sec for s, sec in values if sec > 0]
        if not measured:
            continue
        flops = robust_median(measured)
        nodes[node_id] = Node(old.id, old.name, old.region, flops, old.memory_gb)
        summary["nodes"][old.name] = {"observations": len(measured), "flops": flops, "previous_flops": old.flops}
    topo = Topology(name or f"{prior.name}-measured", nodes, latency_ms, np.where(np.eye(n, dtype=bool), 0, bandwidth))
    return topo, summary


def save_topology(topology: Topology, path: str | Path) -> Path:
    """The topology as YAML (nodes + matrices) that `--topology PATH` loads back; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = topology.to_dict()
    # Full precision: to_dict rounds to 6 decimals, which is 0.1% of an emulated link's 0.0005 Gbit/s.
    data["latency_ms"] = topology.latency_ms.tolist()
    data["bandwidth_gbit_s"] = np.where(np.isinf(topology.bandwidth_gbit_s), 0.0, topology.bandwidth_gbit_s).tolist()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path
