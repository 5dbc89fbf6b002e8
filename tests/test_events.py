"""Scheduled emulation events without namespaces: who gets which environment, when a link event fires."""
import json

import numpy as np
import pytest

from skippipe.context import slowdown_from_env
from skippipe.emulation.events import LinkEvent, LinkEvents, NodeEvent, last_recorded_step, node_env
from topology.errors import ConfigError


class FakeNet:
    def __init__(self):
        self.rates = np.full((3, 3), 8.0)
        self.calls = []

    def set_rate(self, i, j, mbit):
        self.calls.append((i, j, mbit))
        self.rates[i, j] = mbit


def test_node_event_sets_the_stragglers_environment(monkeypatch):
    env = node_env([NodeEvent(step=6, node=2, factor=3.0), LinkEvent(step=6, a=0, b=1, factor=0.25)])
    assert env == {2: {"SKIPPIPE_SLOWDOWN": "6:3"}}
    monkeypatch.setenv("SKIPPIPE_SLOWDOWN", env[2]["SKIPPIPE_SLOWDOWN"])
    assert slowdown_from_env() == (6, 3.0)
    with pytest.raises(ValueError):
        node_env([NodeEvent(6, 2, 3.0), NodeEvent(8, 2, 2.0)])


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
