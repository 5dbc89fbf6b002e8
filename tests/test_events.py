"""Scheduled emulation events and emulated compute without namespaces: who gets which environment, when a
link event fires, how long an emulated action lasts."""
import json

import numpy as np
import pytest

from skippipe.context import COMPUTE_ENV, compute_floor_from_env, slowdown_from_env
from skippipe.emulation.emulate import auto_compute_scale, compute_floors, emulated_topology
from skippipe.emulation.events import LinkEvent, LinkEvents, NodeEvent, event_env, last_recorded_step
from topology.cost import CostModel
from topology.errors import ConfigError
from topology.load import load_topology
from topology.model_spec import load_model_spec


class FakeNet:
    def __init__(self):
        self.rates = np.full((3, 3), 8.0)
        self.calls = []

    def set_rate(self, i, j, mbit):
        self.calls.append((i, j, mbit))
        self.rates[i, j] = mbit


def test_node_event_sets_the_stragglers_environment(monkeypatch):
    env = event_env([NodeEvent(step=6, node=2, factor=3.0), LinkEvent(step=6, a=0, b=1, factor=0.25)])
    assert env == {2: {"SKIPPIPE_SLOWDOWN": "6:3"}}
    monkeypatch.setenv("SKIPPIPE_SLOWDOWN", env[2]["SKIPPIPE_SLOWDOWN"])
    assert slowdown_from_env() == (6, 3.0)
    with pytest.raises(ValueError):
        event_env([NodeEvent(6, 2, 3.0), NodeEvent(8, 2, 2.0)])


@pytest.mark.parametrize("text", ["6", "x:3", "0:3", "6:0.5"])
def test_bad_slowdown_env(monkeypatch, text):
    monkeypatch.setenv("SKIPPIPE_SLOWDOWN", text)
    with pytest.raises(ConfigError, match="STEP:FACTOR"):
        slowdown_from_env()


def test_link_event_fires_once_the_previous_step_is_recorded(tmp_path):
    net = FakeNet()
    events = LinkEvents([LinkEvent(step=3, a=0, b=2, factor=0.25)], net, tmp_path)
    events.poll(0.0)
    assert net.calls == []  # no metrics yet
    with open(tmp_path / "metrics.jsonl", "w") as out:
        out.write(json.dumps({"step": 1}) + "\n")
    events.poll(1.0)
    assert net.calls == []
    with open(tmp_path / "metrics.jsonl", "a") as out:
        out.write(json.dumps({"step": 2}) + "\n{\"step\": 3, \"lo")  # a half-written line is not a step
    assert last_recorded_step(tmp_path) == 2
    events.poll(2.0)
    assert net.calls == [(0, 2, 2.0), (2, 0, 2.0)]
    events.poll(3.0)
    assert len(net.calls) == 2  # once
    assert events.applied_links() == [[[0, 2], [2, 0]]]


def test_compute_floor_env_round_trips_and_refuses_malformed(monkeypatch):
    monkeypatch.setenv(COMPUTE_ENV, "F=0.25,L=0.05,B=0.5")
    assert compute_floor_from_env() == {"F": 0.25, "L": 0.05, "B": 0.5}
    for text in ("F=0.2,F=0.3", "X=1", "F=-1", "F=abc", "F"):
        monkeypatch.setenv(COMPUTE_ENV, text)
        with pytest.raises(ConfigError, match="KIND=SECONDS"):
            compute_floor_from_env()


def test_emulated_compute_takes_the_reference_models_time_and_feeds_each_node_its_floors():
    tiny, ref = load_model_spec("llama-tiny-fp32"), load_model_spec("llama-500m")
    topo = load_topology("configs/topologies/emulated-8.yaml")
    emu = emulated_topology(topo, 1.0, compute_scale=auto_compute_scale(tiny, ref) * 2.0)
    # A tiny stage holding half the tiny model's layers, on the emulated node, takes as long as half the
    # reference model's layers on the real node, divided by the time scale (2).
    tiny_cost = CostModel(emu, tiny, microbatch_size=4, num_stages=2)
    ref_cost = CostModel(topo, ref, microbatch_size=4, num_stages=2)
    assert tiny_cost.forward_s[1, 3] == pytest.approx(ref_cost.forward_s[1, 3] / 2.0)
    floors = compute_floors(tiny_cost, [0, 1])
    assert set(floors) == {0, 1}
    parsed = dict(item.split("=") for item in floors[1][COMPUTE_ENV].split(","))
    assert float(parsed["F"]) == pytest.approx(tiny_cost.forward_s[1, 1], rel=1e-5)
    assert float(parsed["B"]) == pytest.approx(tiny_cost.backward_s(1, 1), rel=1e-5)


def test_a_worker_waits_out_its_compute_floor_and_stretches_it_when_straggling():
    """One node, one stage: every action lasts at least its floor, and `factor` times it once slowed."""
    from datetime import timedelta

    import torch

    from skippipe.context import Context
    from skippipe.model import Stage
    from skippipe.worker import Worker
    from tests.handplan import hand_plan

    spec = load_model_spec("llama-tiny-fp32")
    plan = hand_plan("0", ["0@0"])
    floors = {"F": 0.05, "L": 0.02, "B": 0.08}
    ctx = Context(rank=0, world_size=1, node=plan.node_of_rank(0), device=torch.device("cpu"),
                  timeout=timedelta(seconds=10), stage_ranks={0: [0]}, node_rank={0: 0}, slowdown=(2, 3.0),
                  compute_floor_s=floors)
    torch.manual_seed(0)
    worker = Worker(plan, ctx, Stage(spec, 0, 1, seed=0), (1, spec.context, spec.dim))
    tokens = torch.randint(0, spec.vocab_size, (1, spec.context + 1))
    batches = {0: (tokens[:, :-1], tokens[:, 1:])}
    for step, factor in ((1, 1.0), (2, 3.0)):
        result = worker.run_iteration(batches, step=step)
        durations = {name[0]: end - start for name, start, end in result.timeline}
        for kind, floor in floors.items():
            assert factor * floor <= durations[kind] < factor * floor + 0.5, (step, kind, durations)
