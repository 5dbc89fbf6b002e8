"""Tier 1: the drift detector on synthetic iteration times, and the re-estimate of links and node speeds
from synthetic timelines (the simulator's strict replay of a plan on a changed network)."""
import random

import numpy as np
import pytest

from scheduler.problem import Problem
from scheduler.solve import solve
from skippipe.drift import DriftDetector
from skippipe.estimate import estimate_topology, save_topology
from topology.cost import CostModel
from topology.load import load_topology
from topology.model_spec import load_model_spec
from topology.network import Node, Topology
from topology.simulator import simulate


def feed(detector, times):
    return [(step, reason) for step, t in enumerate(times, 1) if (reason := detector.observe(t)) is not None]


def test_no_trigger_on_ten_percent_noise():
    rng = random.Random(0)
    detector = DriftDetector(threshold=0.2, patience=3, warmup=2)
    times = [5.0] + [1.0 * rng.uniform(0.9, 1.1) for _ in range(200)]
    assert feed(detector, times) == []


def test_trigger_on_sustained_doubling_after_patience():
    rng = random.Random(1)
    detector = DriftDetector(threshold=0.2, patience=3, warmup=2)
    times = [5.0] + [rng.uniform(0.9, 1.1) for _ in range(9)] + [2 * rng.uniform(0.9, 1.1) for _ in range(10)]
    fired = feed(detector, times)
    assert fired and fired[0][0] == 10 + 3  # the 3rd slow step (steps 11, 12, 13)
    assert "over its reference" in fired[0][1]


def test_single_spikes_do_not_trigger_and_restart_recalibrates():
    detector = DriftDetector(threshold=0.2, patience=2, warmup=2)
    assert feed(detector, [5, 1, 1, 3, 1, 3, 1, 3, 1]) == []
    detector.restart()
    assert feed(detector, [2, 2, 2, 2, 2]) == []  # the new plan's reference is 2 s


def test_bad_settings():
    with pytest.raises(ValueError):
        DriftDetector(threshold=0, patience=3, warmup=2)
    with pytest.raises(ValueError):
        DriftDetector(threshold=0.2, patience=0, warmup=2)


# -- re-estimate -----------------------------------------------------------------------------------

def emulated_problem(topology):
    return Problem(topology=topology, model=load_model_spec("llama-tiny-fp32"), microbatch_size=4,
                   stage_sizes=[2, 2, 2, 2], num_microbatches=8, memory=3, skip_ratio=0.25, seed=0)


def emulated_topology():
    topo = load_topology("configs/topologies/emulated-8.yaml")
    return Topology("emulated", topo.nodes, topo.latency_ms, topo.bandwidth_gbit_s / 128)


def changed(topo, *, link=None, factor=1.0, node=None, slow=1.0):
    bw = topo.bandwidth_gbit_s.copy()
    if link is not None:
        a, b = link
        bw[a, b] = bw[b, a] = bw[a, b] * factor
    nodes = [Node(n.id, n.name, n.region, n.flops / (slow if n.id == node else 1.0), n.memory_gb) for n in topo.nodes]
    return Topology(topo.name, nodes, topo.latency_ms.copy(), bw)


def timelines_on(plan, truth, problem, noise=0.0, seed=0):
    """The plan replayed strictly on `truth` (links shaped per pair), as per-rank timelines."""
    cost = CostModel(truth, problem.model, problem.microbatch_size, problem.num_stages)
    events = simulate(plan.workload(), cost=cost, memory=None, share_uplink=False, share_link=True).events
    rng = np.random.default_rng(seed)
    per_node = {n.id: [] for n in plan.nodes}
    for e in sorted(events, key=lambda e: e.start):
        if e.kind == "compute":
            jitter = 1 + noise * rng.uniform(-1, 1)
            per_node[e.node].append([e.name, e.start, e.start + (e.end - e.start) * jitter])
    return [per_node[plan.node_of_rank(r).id] for r in range(len(plan.nodes))]


def busiest_link(plan):
    from collections import Counter
    used = Counter((n, m) for p in plan.paths for n, m in zip(p.nodes, p.nodes[1:]))
    return used.most_common(1)[0][0]


def test_link_bandwidth_recovered_within_ten_percent(tmp_path):
    prior = emulated_topology()
    problem = emulated_problem(prior)
    plan = solve(problem, "skippipe")
    a, b = busiest_link(plan)
    truth = changed(prior, link=(a, b), factor=0.25)
    steps = [timelines_on(plan, truth, problem, seed=s) for s in range(3)]
    estimate, summary = estimate_topology(plan, steps, prior=prior, cost=problem.cost)
    true_bw = truth.bandwidth_gbit_s[a, b]
    assert abs(estimate.bandwidth_gbit_s[a, b] / true_bw - 1) < 0.10
    assert abs(prior.bandwidth_gbit_s[a, b] / true_bw - 1) > 1  # the prior was 4x off
    # links no message used keep the previous estimate
    used = {(n, m) for p in plan.paths for n, m in zip(p.nodes, p.nodes[1:])}
    used |= {(p.nodes[-1], p.data_node) for p in plan.paths}  # the loss's input goes back to the data node
    used |= {(m, n) for n, m in used}  # gradients retrace every hop
    unused = [(i, j) for i in range(8) for j in range(8) if i != j and (i, j) not in used]
    assert unused and all(estimate.bandwidth_gbit_s[i, j] == prior.bandwidth_gbit_s[i, j] for i, j in unused)
    # written as a topology YAML that loads back (what --topology reads)
    path = save_topology(estimate, tmp_path / "topology.estimated.yaml")
    again = load_topology(str(path))
    assert np.allclose(again.bandwidth_gbit_s, estimate.bandwidth_gbit_s, rtol=1e-12)
    assert [n.flops for n in again.nodes] == pytest.approx([n.flops for n in estimate.nodes])


def test_node_speed_recovered_and_noise_rejected():
    prior = emulated_topology()
    problem = emulated_problem(prior)
    plan = solve(problem, "skippipe")
    truth = changed(prior, node=3, slow=3.0)
    steps = [timelines_on(plan, truth, problem, noise=0.1, seed=s) for s in range(4)]
    estimate, _ = estimate_topology(plan, steps, prior=prior, cost=problem.cost)
    assert estimate.nodes[3].flops == pytest.approx(truth.nodes[3].flops, rel=0.1)
    assert estimate.nodes[0].flops == pytest.approx(prior.nodes[0].flops, rel=0.1)


@pytest.mark.parametrize("override", ["schedule.replan.threshold=0", "schedule.replan.patience=0",
                                      "schedule.replan.warmup=0", "schedule.replan.max_replans=-1",
                                      "schedule.replan.enabled=maybe"])
def test_bad_replan_settings_are_config_errors(override):
    from skippipe.config import load_config
    from topology.errors import ConfigError
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_replan_is_off_by_default():
    from skippipe.config import load_config
    assert load_config(None, []).schedule.replan.enabled is False
