"""Start-up profiling and in-process link latency: the tournament schedule (pure logic), region grouping,
and, on gloo with spawned processes on localhost, measured latency against injected latency, delayed
sends keeping their per-peer order, and the measured topology loading back."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from skippipe.emulation.latency import LinkLatency, read_latency_file, write_latency_file
from skippipe.profiling import build_topology, regions_by_latency, tournament_rounds
from tests.spawn import spawn_ranks


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16])
def test_tournament_covers_every_pair_once_in_disjoint_rounds(n):
    rounds = tournament_rounds(n)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))  # every pair exactly once
    for r in rounds:
        ranks = [x for p in r for x in p]
        assert len(ranks) == len(set(ranks)), f"rank in two pairs of one round: {r}"
    assert len(rounds) == (0 if n < 2 else n - 1 if n % 2 == 0 else n)  # the minimum for a round-robin


def test_regions_by_latency_groups_near_nodes():
    lat = np.array([[0, 1, 50, 60], [1, 0, 55, 65], [50, 55, 0, 2], [60, 65, 2, 0]], dtype=float)
    assert regions_by_latency(lat, 5.0) == ["r0", "r0", "r1", "r1"]
    assert regions_by_latency(lat, 0.5) == ["r0", "r1", "r2", "r3"]
    assert regions_by_latency(lat, 100.0) == ["r0"] * 4


def test_build_topology_uses_both_directions():
    def pair(peer, bps, rtt=None):
        out = {"peer": peer, "bandwidth": {"bytes_per_s": bps}}
        if rtt is not None:
            out["rtt_s"] = [rtt, rtt * 2]
        return out
    per_rank = [{"rank": 0, "pairs": [pair(1, 1e6, rtt=0.1)], "compute": {"flops": 5e9}},
                {"rank": 1, "pairs": [pair(0, 2e6)], "compute": {"flops": 7e9}}]
    topo = build_topology(per_rank, names=["a", "b"])
    assert topo.bandwidth_gbit_s[0, 1] == pytest.approx(8e-3) and topo.bandwidth_gbit_s[1, 0] == pytest.approx(16e-3)
    assert topo.latency_ms[0, 1] == topo.latency_ms[1, 0] == pytest.approx(50.0)  # the smallest round trip, halved
    assert [n.flops for n in topo.nodes] == [5e9, 7e9] and [n.name for n in topo.nodes] == ["a", "b"]


def test_latency_file_round_trip(tmp_path):
    write_latency_file(tmp_path / "lat.json", np.array([[0, 30.5], [30.5, 0]]))
    assert read_latency_file(tmp_path / "lat.json") == [[0.0, 30.5], [30.5, 0.0]]
    link = LinkLatency.from_matrix(read_latency_file(tmp_path / "lat.json"), 1)
    assert link.latency_s_to == {0: 0.0305}
    (tmp_path / "bad.json").write_text('{"latency_ms": [[0, 1]]}')
    with pytest.raises(ValueError, match="n x n"):
        read_latency_file(tmp_path / "bad.json")


# --- spawned processes on gloo --------------------------------------------------------------------------

WORLD = 4
INJECTED_MS = {(0, 2): 40.0, (1, 3): 25.0}  # symmetric; every other pair 0 (plain localhost)
TINY = "name: prof-tiny\ndim: 32\nnum_layers: 2\nnum_heads: 2\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n"


def _latency_matrix() -> np.ndarray:
    lat = np.zeros((WORLD, WORLD))
    for (a, b), ms in INJECTED_MS.items():
        lat[a, b] = lat[b, a] = ms
    return lat


def _rank_main(rank: int, tmp: str) -> None:
    import torch.distributed as dist
    from skippipe.emulation.latency import link_latency_from_env
    from skippipe.profiling import Probe, measure_topology, save_profile
    from topology.model_spec import load_model_spec
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    # The transport the launcher would choose for an emulated run (Note [transport] in skippipe/context.py).
    link = link_latency_from_env(rank, environ={"SKIPPIPE_LINK_LATENCY": str(Path(tmp) / "lat.json")})
    # Delayed sends keep their order per peer and arrive after the link's latency. CLOCK_MONOTONIC is
    # machine-wide, so the receiver's arrival times are measured from the moment the sender issued them.
    arrivals, sent_at = [], None
    dist.barrier()
    if rank == 0:
        sent_at = time.monotonic()
        works = [link.isend(torch.tensor([float(k)]), 2) for k in range(3)]
        for w in works:
            w.wait()
    elif rank == 2:
        for _ in range(3):
            t = torch.zeros(1)
            dist.recv(t, src=0)
            arrivals.append((float(t), time.monotonic()))
    dist.barrier()
    topo, details = measure_topology(rank, world_size=WORLD, model=load_model_spec(Path(tmp) / "tiny.yaml"),
                                     microbatch_size=2, names=[f"n{i}" for i in range(WORLD)],
                                     probe=Probe(isend=link.isend, pings=3, target_s=0.05, max_bytes=1 << 20))
    if rank == 0:
        save_profile(Path(tmp) / "run", topo, details)
    torch.save({"topology": topo.to_dict(), "arrivals": arrivals, "sent_at": sent_at, "details": details}, Path(tmp) / f"out{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    write_latency_file(tmp / "lat.json", _latency_matrix())
    (tmp / "tiny.yaml").write_text(TINY)
    assert spawn_ranks(_rank_main, lambda r: (r, str(tmp)), WORLD) == [0] * WORLD
    return tmp, [torch.load(tmp / f"out{r}.pt", weights_only=False) for r in range(WORLD)]


def test_every_rank_builds_the_same_topology(profiled):
    _, outs = profiled
    for out in outs[1:]:
        assert out["topology"] == outs[0]["topology"]


def test_measured_latency_matches_injected(profiled):
    _, outs = profiled
    lat = np.array(outs[0]["topology"]["latency_ms"])
    want = _latency_matrix()
    # Localhost adds well under a few ms of gloo and scheduling overhead on top of the injected delay.
    assert np.all(lat >= want - 1.0), lat
    assert np.all(lat <= want + 5.0), lat


def test_bandwidth_and_compute_are_measured(profiled):
    _, outs = profiled
    bw = np.array(outs[0]["topology"]["bandwidth_gbit_s"])
    off = ~np.eye(WORLD, dtype=bool)
    assert np.all(np.isfinite(bw[off]) & (bw[off] > 0.005)), bw  # localhost: far above 5 Mbit/s, even on a busy machine
    flops = [n["flops"] for n in outs[0]["topology"]["nodes"]]
    assert all(f > 1e6 for f in flops) and len(set(flops)) == WORLD  # really measured, per rank


def test_delayed_sends_arrive_late_and_in_order(profiled):
    _, outs = profiled
    arrivals, sent_at = outs[2]["arrivals"], outs[0]["sent_at"]
    assert [v for v, _ in arrivals] == [0.0, 1.0, 2.0]
    assert all(t - sent_at >= 0.040 for _, t in arrivals)  # 40 ms injected on the n0 -> n2 link


def test_profile_saved_and_loads_back(profiled):
    from topology.load import load_topology
    tmp, outs = profiled
    topo = load_topology(tmp / "run" / "topology.measured.yaml")
    assert topo.num_nodes == WORLD and [n.name for n in topo.nodes] == ["n0", "n1", "n2", "n3"]
    np.testing.assert_allclose(topo.latency_ms, np.array(outs[0]["topology"]["latency_ms"]), atol=1e-5)
    assert (tmp / "run" / "profile.json").is_file()
