"""Start-up profiling: every rank pair's latency and bandwidth, and every rank's compute speed, as a Topology.

    topo, details = measure_topology(rank, world_size=world_size, model=spec, microbatch_size=4, probe=Probe(isend=send))

Pairs are measured in parallel rounds of disjoint pairs (`tournament_rounds`, the circle method: n - 1
rounds for n ranks), a barrier between rounds, so no rank is in two measurements at once and the whole
matrix takes n - 1 pair-measurements of time, not n(n - 1) / 2.

Note [pair measurement]: for a pair (a, b), `a` first times `pings` ping-pongs of a one-element tensor:
the smallest round trip, halved, is the latency of both directions. Then, for each direction, the sender
sends a probe of `probe_bytes` and a message sized to take about `target_s` at the probe's rate, and the
receiver answers each with a one-element ack. The difference of the two sizes over the difference of the
two round trips is the bandwidth: latencies, the ack and fixed per-message costs cancel. Each round trip
is the best of two, since load on a shared machine only ever adds time. Sends go through the `isend`
the launcher chose (Note [transport] in context.py), so latency added in the process (the emulator) is
measured like a real one. The ping's
own serialisation is left in the latency: a few bytes, microseconds on any real link.

Note [compute speed]: each rank times the forward and backward of one decoder layer on a microbatch, in
turn (a barrier between ranks), so that ranks sharing a machine do not slow each other down while being
measured. The forward time gives the node's effective FLOP/s for the cost model; backward / forward is
recorded beside it.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from skippipe.comm import all_gather_json
from skippipe.context import Send
from topology.cost import layer_forward_flops
from topology.model_spec import ModelSpec
from topology.network import Node, Topology



def tournament_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair of 0..n-1 exactly once (circle method).

    n - 1 rounds for even n, n rounds for odd n (one rank sits out each round). Pairs are (low, high).
    """
    if n < 2:
        return []
    players: list[int | None] = list(range(n)) + ([None] if n % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for k in range(m // 2):
            a, b = players[k], players[m - 1 - k]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(sorted(pairs))
        players = [players[0], players[-1], *players[1:-1]]  # keep the first fixed, rotate the rest
    return rounds


@dataclass(frozen=True)
class Probe:
    """How a pair is measured (Note [pair measurement]): `pings` ping-pongs; a probe of `probe_bytes`, then a
    message sized to take about `target_s` (at most `max_bytes`); each round trip the best of `tries`.
    Sends go through `isend`."""
    isend: Send = dist.isend
    pings: int = 4
    probe_bytes: int = 16 * 1024
    target_s: float = 0.25
    max_bytes: int = 16 << 20
    tries: int = 2


def _recv(tensor: torch.Tensor, src: int) -> None:
    dist.irecv(tensor, src=src).wait()


def _measure_pair(me: int, peer: int, probe_settings: Probe) -> dict:
    """Both ends run this; the lower rank leads the ping-pongs. Returns this end's figures (Note [pair measurement])."""
    pings, probe_bytes, target_s = probe_settings.pings, probe_settings.probe_bytes, probe_settings.target_s
    max_bytes, tries = probe_settings.max_bytes, probe_settings.tries

    def _send(tensor: torch.Tensor, dst: int) -> None:
        probe_settings.isend(tensor, dst=dst).wait()

    def _round_trip(peer: int, payload: torch.Tensor, ack: torch.Tensor) -> float:
        start = time.perf_counter()
        _send(payload, peer)
        _recv(ack, peer)
        return time.perf_counter() - start

    token = torch.zeros(1)
    lead = me < peer
    rtts = []
    for _ in range(pings):
        if lead:
            rtts.append(_round_trip(peer, token, token))
        else:
            _recv(token, peer)
            _send(token, peer)
    out: dict = {"peer": peer}
    rtt_t = torch.tensor([min(rtts) if lead else 0.0], dtype=torch.float64)
    if lead:
        out["rtt_s"] = rtts
        _send(rtt_t, peer)
    else:
        _recv(rtt_t, peer)  # both ends size their messages knowing the round trip
    rtt = float(rtt_t.item())
    for sender in ((me, peer) if lead else (peer, me)):
        if sender == me:
            probe = torch.zeros(max(1, probe_bytes // 4))
            t_probe = _round_trip(peer, probe, token)
            rough_bps = probe.numel() * 4 / max(t_probe - rtt, 1e-4)
            size = int(min(max_bytes, max(4 * probe_bytes, rough_bps * target_s)))
            size_t = torch.tensor([size], dtype=torch.int64)
            _send(size_t, peer)
            big = torch.zeros(size // 4)
            # Best of `tries`: other load on the machine only ever slows a transfer down.
            t_probe = min([t_probe] + [_round_trip(peer, probe, token) for _ in range(tries - 1)])
            t_big = min(_round_trip(peer, big, token) for _ in range(tries))
            extra_bytes = (big.numel() - probe.numel()) * 4
            # A hiccup in the probe can make the difference meaningless; then the big message alone is the estimate.
            rate = extra_bytes / (t_big - t_probe) if t_big > 1.2 * t_probe else big.numel() * 4 / t_big
            out["bandwidth"] = {"bytes": [probe.numel() * 4, big.numel() * 4], "seconds": [t_probe, t_big],
                                "bytes_per_s": rate}
        else:
            probe = torch.zeros(max(1, probe_bytes // 4))
            _recv(probe, peer)
            _send(token, peer)
            size_t = torch.zeros(1, dtype=torch.int64)
            _recv(size_t, peer)
            for _ in range(tries - 1):
                _recv(probe, peer)
                _send(token, peer)
            big = torch.zeros(int(size_t.item()) // 4)
            for _ in range(tries):
                _recv(big, peer)
                _send(token, peer)
    return out


def measure_compute(model: ModelSpec, microbatch_size: int, repeats: int = 20, warmup: int = 5) -> dict:
    """Median forward and backward time of one decoder layer on one microbatch (Note [compute speed])."""
    from skippipe.model import Stage  # torch-heavy; imported only where it is used
    layer = Stage(model, 1, model.num_layers, seed=0) if model.num_layers > 1 else Stage(model, 0, 1, seed=0)
    x = torch.randn(microbatch_size, model.context, model.dim)
    forward, backward = [], []
    for k in range(warmup + repeats):
        inp = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = layer(inp)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        t2 = time.perf_counter()
        if k >= warmup:
            forward.append(t1 - t0)
            backward.append(t2 - t1)
    f, b = statistics.median(forward), statistics.median(backward)
    return {"forward_s": f, "backward_s": b, "backward_factor": b / f,
            "flops": microbatch_size * layer_forward_flops(model) / f}


def regions_by_latency(latency_ms: np.ndarray, threshold_ms: float) -> list[str]:
    """Group nodes joined by links of at most `threshold_ms` (single linkage) into regions r0, r1, ..."""
    n = latency_ms.shape[0]
    label = [-1] * n
    count = 0
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start], stack = count, [start]
        while stack:
            i = stack.pop()
            for j in range(n):
                if label[j] < 0 and max(latency_ms[i, j], latency_ms[j, i]) <= threshold_ms:
                    label[j] = count
                    stack.append(j)
        count += 1
    return [f"r{k}" for k in label]


def measure_topology(rank: int, *, world_size: int, model: ModelSpec | None = None, microbatch_size: int = 1,
                     names: list[str] | None = None, probe: Probe = Probe(), region_latency_ms: float = 5.0,
                     default_flops: float = 1e12) -> tuple[Topology, dict]:
    """Measure every pair and this rank's compute; every rank returns the same Topology and details.

    Collective: every rank of the default group calls it. Without `model`, compute is not measured and
    every node gets `default_flops` (FLOP/s). Nodes within `region_latency_ms` of each other share a region.
    """
    mine: dict = {"rank": rank, "pairs": []}
    rounds = tournament_rounds(world_size)
    started = time.perf_counter()
    for pairs in rounds:
        for a, b in pairs:
            if rank in (a, b):
                mine["pairs"].append(_measure_pair(rank, b if rank == a else a, probe))
        dist.barrier()
    mine["network_s"] = time.perf_counter() - started
    if model is not None:
        for turn in range(world_size):
            if turn == rank:
                mine["compute"] = measure_compute(model, microbatch_size)
            dist.barrier()
    everyone = all_gather_json(mine)  # JSON, not all_gather_object: nothing from a peer is unpickled
    topology = build_topology(everyone, names=names, region_latency_ms=region_latency_ms, default_flops=default_flops)
    return topology, {"ranks": everyone, "rounds": rounds}


def build_topology(per_rank: list[dict], *, names: list[str] | None = None, region_latency_ms: float = 5.0,
                   default_flops: float = 1e12, name: str = "measured") -> Topology:
    """The Topology from every rank's measurements (the lists `measure_topology` gathers)."""
    n = len(per_rank)
    latency_ms, bandwidth = np.zeros((n, n)), np.full((n, n), np.inf)
    for entry in per_rank:
        me = entry["rank"]
        for pair in entry["pairs"]:
            peer = pair["peer"]
            bw = pair["bandwidth"]
            bandwidth[me, peer] = bw["bytes_per_s"] * 8 / 1e9
            if "rtt_s" in pair:
                latency_ms[me, peer] = latency_ms[peer, me] = min(pair["rtt_s"]) / 2 * 1e3
    names = names or [f"node{i}" for i in range(n)]
    regions = regions_by_latency(latency_ms, region_latency_ms)
    nodes = [Node(i, names[i], regions[i], float(per_rank[i].get("compute", {}).get("flops", default_flops)))
             for i in range(n)]
    return Topology(name, nodes, latency_ms, bandwidth)


def save_profile(run_dir: str | Path, measured: Topology, details: dict, configured: Topology | None = None) -> None:
    """Write the measured topology (YAML, loads back with topology.load_topology), the raw measurements,
    and the configured topology beside them when there is one."""
    import yaml
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "topology.measured.yaml").write_text(yaml.safe_dump(measured.to_dict(), sort_keys=False))
    (run_dir / "profile.json").write_text(json.dumps(details, indent=1))
    if configured is not None:
        (run_dir / "topology.configured.yaml").write_text(yaml.safe_dump(configured.to_dict(), sort_keys=False))


def profile_for_run(cfg, *, rank: int, world_size: int, isend: Send = dist.isend) -> Path:
    """`--topology measure`: measure this world, save the figures in the run dir, return the measured YAML.

    Collective. Node names come from SKIPPIPE_NODE_NAME (the emulator sets it) or host name and rank.
    The compute probe uses the run's model and microbatch size.
    """
    import os
    import socket
    from topology.model_spec import load_model_spec
    run_dir = Path(cfg.train.run_dir)
    name = os.environ.get("SKIPPIPE_NODE_NAME") or f"{socket.gethostname()}-{rank}"
    names = all_gather_json(name)
    if len(set(names)) != world_size:
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    started = time.perf_counter()
    topo, details = measure_topology(rank, world_size=world_size, model=load_model_spec(cfg.model),
                                     microbatch_size=cfg.schedule.microbatch_size, names=names, probe=Probe(isend=isend))
    details["seconds"] = time.perf_counter() - started
    if rank == 0:
        save_profile(run_dir, topo, details)
        print(f"profiled {world_size} ranks in {details['seconds']:.1f} s: latency "
              f"{np.min(topo.latency_ms[~np.eye(world_size, dtype=bool)]):.1f}-{topo.latency_ms.max():.1f} ms, "
              f"bandwidth {np.min(topo.bandwidth_gbit_s) * 1e3:.2f}-"
              f"{np.max(topo.bandwidth_gbit_s[~np.eye(world_size, dtype=bool)]) * 1e3:.1f} Mbit/s, "
              f"regions {', '.join(sorted(set(n.region for n in topo.nodes)))}; saved to {run_dir}", flush=True)
    dist.barrier()
    return run_dir / "topology.measured.yaml"
