"""The emulation's and the benchmarks' pure logic: bandwidth scaling, the prediction's inputs, report
figures, and the GPipe baseline computing the same model as skippipe's stages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from topology.plan import Plan
from skippipe.emulation.emulate import auto_bandwidth_scale, emulated_topology
from skippipe.emulation.emulate_report import compute_from_timeline, median_after_first, predict, profile_errors
from topology.load import load_topology, topology_from_dict
from topology.model_spec import load_model_spec
from topology.plan import Plan
from tests.handplan import hand_plan

TWO_REGIONS = {"name": "t", "nodes": [{"name": "a", "region": "x", "flops": 1e12}, {"name": "b", "region": "x", "flops": 1e12},
                                      {"name": "c", "region": "y", "flops": 1e12}],
               "same_region": {"latency_ms": 1, "bandwidth_gbit_s": 10},
               "region_links": [{"a": "x", "b": "y", "latency_ms": 50, "bandwidth_gbit_s": 0.1}]}


def test_auto_scale_matches_message_time_of_the_reference_model():
    tiny, ref = load_model_spec("llama-tiny-fp32"), load_model_spec("llama-500m")
    scale = auto_bandwidth_scale(tiny, ref)
    assert scale == pytest.approx(1 / 128)  # 64 x 64 x 4 bytes vs 1024 x 1024 x 2 bytes per sample
    topo = topology_from_dict(TWO_REGIONS)
    emu = emulated_topology(topo, scale, latency_scale=0.5)
    # A tiny-model hop on the emulated link takes as long as a reference hop on the real one (bandwidth part).
    tiny_bytes, ref_bytes = 64 * 64 * 4, 1024 * 1024 * 2
    assert tiny_bytes * 8 / (emu.bandwidth_gbit_s[0, 2] * 1e9) == pytest.approx(ref_bytes * 8 / (topo.bandwidth_gbit_s[0, 2] * 1e9))
    assert emu.latency_ms[0, 2] == 25 and emu.num_nodes == 3 and [n.name for n in emu.nodes] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="positive"):
        emulated_topology(topo, 0.0)


def test_emulated_8_has_three_regions_fast_inside_slow_and_uneven_between():
    topo = load_topology("configs/topologies/emulated-8.yaml")
    assert topo.num_nodes == 8 and len(topo.regions) >= 3
    same = np.array([[a.region == b.region for b in topo.nodes] for a in topo.nodes]) & ~np.eye(8, dtype=bool)
    between = np.array([[a.region != b.region for b in topo.nodes] for a in topo.nodes])
    assert topo.bandwidth_gbit_s[same].min() > 10 * topo.bandwidth_gbit_s[between].max()
    assert len(set(np.round(topo.bandwidth_gbit_s[between], 4))) >= 3  # uneven


@pytest.mark.parametrize("values, want", [([9.0], 9.0), ([9.0, 1.0, 3.0], 2.0), ([100.0, 1.0, 2.0, 50.0], 2.0)])
def test_median_after_first(values, want):
    assert median_after_first(values) == want


def test_profile_errors_are_relative_for_bandwidth_and_absolute_for_latency():
    shaped = topology_from_dict(TWO_REGIONS)
    measured = topology_from_dict({**TWO_REGIONS, "region_links": [{"a": "x", "b": "y", "latency_ms": 52,
                                                                     "bandwidth_gbit_s": 0.11}]})
    err = profile_errors(measured, shaped)
    assert sorted(err["bandwidth_rel_errors"]) == pytest.approx([0, 0, 0.1, 0.1, 0.1, 0.1])
    assert err["bandwidth_rel_error_median"] == pytest.approx(0.1) and err["latency_abs_error_ms_max"] == pytest.approx(2)


def _timeline_records(plan: Plan, forward_s: float) -> list[dict]:
    """Two steps of a fake timeline: every forward takes forward_s, every backward twice that."""
    timeline = [[] for _ in plan.nodes]
    for node, actions in plan.order.items():
        t = 0.0
        for a in actions:
            d = forward_s * (2 if a.kind == "B" else 1)
            timeline[plan.nodes[node].rank].append([str(a), t, t + d])
            t += d
    return [{"timeline": timeline}, {"timeline": timeline}]


def test_compute_from_timeline_recovers_the_speed_and_backward_factor():
    plan = hand_plan("0 1 2", ["0@0 1@1 2@2", "0@0 1@1 2@2"], skip_ratio=0.0)
    spec = load_model_spec("llama-tiny")
    from topology.cost import layer_forward_flops
    flops, backward = compute_from_timeline(_timeline_records(plan, 0.01), plan, spec)
    layers_per_stage = spec.num_layers // 3 + 1  # split 8 layers into 3, 3, 2; stage 1 has 3
    assert flops[1] == pytest.approx(plan.microbatch_size * layers_per_stage * layer_forward_flops(spec) / 0.01)
    assert backward == pytest.approx(2.0)


def test_prediction_grows_with_the_link_latency():
    plan = hand_plan("0 1 2", ["0@0 1@1 2@2", "0@0 1@1 2@2"], skip_ratio=0.0)
    spec = load_model_spec("llama-tiny-fp32")
    fast = topology_from_dict(TWO_REGIONS)
    slow = emulated_topology(fast, 1.0, latency_scale=2.0)
    a = predict(plan, shaped=fast, model=spec, flops=[1e10] * 3, backward_factor=2.0).iteration_s
    b = predict(plan, shaped=slow, model=spec, flops=[1e10] * 3, backward_factor=2.0).iteration_s
    assert b > a + 0.1  # each microbatch crosses the 50 ms x-y link twice each way: >= 100 ms more


def test_gpipe_stages_compute_skippipes_model():
    from experiments.overhead import GPipeStage
    from skippipe.model import FullModel
    spec = load_model_spec("llama-tiny")
    stages = [GPipeStage(spec, i, 4, seed=0) for i in range(4)]
    tokens = torch.randint(0, spec.vocab_size, (2, spec.context))
    x = tokens
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, FullModel(spec, 4, seed=0)(tokens))
    assert not hasattr(stages[1].body, "embed_tokens") and stages[0].first and stages[3].last


def test_simulator_link_fifo_queues_messages_on_one_link_only():
    """share_link (the emulation's per-pair shaping): two messages on one link queue; on two links they don't."""
    from topology.cost import CostModel
    from topology.simulator import simulate
    spec = load_model_spec("llama-tiny-fp32")
    topo = emulated_topology(topology_from_dict(TWO_REGIONS), 1e-3)  # 0.1 Mbit/s between regions: slow hops
    cost = CostModel(topo, spec, 4, 2)
    hop = cost.activation_bytes * 8 / (topo.bandwidth_gbit_s[0, 2] * 1e9)

    def send_starts(paths, order, **kw):
        plan = hand_plan("0 0 1", paths, order=order)
        events = simulate(plan.workload(), cost=cost, share_uplink=False, **kw).events
        return {e.name: e.start for e in events if e.kind == "send"}

    # Both forwards go from data node 0 to node 2 over the same x-y link, back to back.
    same = (["0@0 1@2", "0@0 1@2"], {0: "F0@0 F1@0 L0@0 L1@0 B0@0 B1@0", 2: "F0@1 F1@1 B0@1 B1@1"})
    free, fifo = send_starts(*same), send_starts(*same, share_link=True)
    assert free["F1@0->2"] - free["F0@0->2"] < 0.01  # no queueing: both on the wire at once
    assert fifo["F1@0->2"] - fifo["F0@0->2"] == pytest.approx(hop, rel=0.01)  # the second waits one serialisation
    # From two data nodes over two links: no queueing, share_link or not.
    apart = (["0@0 1@2", "0@1 1@2"], {0: "F0@0 L0@0 B0@0", 1: "F1@0 L1@0 B1@0", 2: "F0@1 F1@1 B0@1 B1@1"})
    assert send_starts(*apart, share_link=True)["F1@0->2"] == send_starts(*apart)["F1@0->2"] < 0.01
