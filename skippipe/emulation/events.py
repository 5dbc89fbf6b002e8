"""Scheduled events on the emulated cluster: a link's bandwidth changes, or a node starts to straggle.

    events = [LinkEvent(step=6, a=3, b=6, factor=0.25), NodeEvent(step=6, node=2, factor=3.0)]
    cluster.train(run_dir, args, events=events)

- `LinkEvent`: from step `step` on, the link a <-> b (both directions) carries `factor` times its
  bandwidth. Applied with `tc class change` on the link's htb class (EmulatedNetwork.set_rate) as soon as
  rank 0 has recorded step - 1 in metrics.jsonl, that is within the first fraction of a second of step
  `step` (the emulator polls every 0.2 s; the iteration is seconds long).
- `NodeEvent`: from step `step` on, every forward, loss and backward of `node` takes `factor` times as
  long: an injected wait after each action (ctx.slowdown in the runtime), set at launch through the
  SKIPPIPE_SLOWDOWN environment variable of that node's processes, so the runtime knows nothing of the
  emulation (Note [transport] in skippipe/context.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from skippipe.context import SLOWDOWN_ENV


@dataclass(frozen=True)
class LinkEvent:
    step: int
    a: int  # node indexes (= ranks on the emulated cluster)
    b: int
    factor: float  # the new bandwidth over the old

    kind = "link"

    def describe(self, names: list[str]) -> str:
        return f"link {names[self.a]}<->{names[self.b]} at {self.factor:g}x bandwidth from step {self.step}"


@dataclass(frozen=True)
class NodeEvent:
    step: int
    node: int
    factor: float  # compute takes this many times as long

    kind = "node"

    def describe(self, names: list[str]) -> str:
        return f"node {names[self.node]} computing {self.factor:g}x slower from step {self.step}"


Event = LinkEvent | NodeEvent


def event_env(events: list[Event]) -> dict[int, dict[str, str]]:
    """node index -> the environment variables its processes need for `events` (the straggler's)."""
    out: dict[int, dict[str, str]] = {}
    for event in events:
        if isinstance(event, NodeEvent):
            if event.node in out:
                raise ValueError(f"node {event.node} has two slowdown events; give it one")
            out[event.node] = {SLOWDOWN_ENV: f"{event.step}:{event.factor:g}"}
    return out


def last_recorded_step(run_dir: str | Path) -> int:
    """The newest step in run_dir/metrics.jsonl (0 before the first); a half-written last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


class LinkEvents:
    """The link events of one job, applied by `poll` once the run has reached their step."""

    def __init__(self, events: list[Event], net, run_dir: str | Path):
        self.pending = sorted((e for e in events if isinstance(e, LinkEvent)), key=lambda e: e.step)
        self.net, self.run_dir = net, Path(run_dir)
        self.applied: list[dict] = []

    def poll(self, elapsed_s: float) -> None:
        """Apply every pending event whose step has begun (its previous step is recorded)."""
        if not self.pending:
            return
        done = last_recorded_step(self.run_dir)
        while self.pending and done >= self.pending[0].step - 1:
            event = self.pending.pop(0)
            for i, j in ((event.a, event.b), (event.b, event.a)):
                self.net.set_rate(i, j, self.net.rates[i, j] * event.factor)
            self.applied.append({"event": event.kind, "step": event.step, "after_recorded_step": done,
                                 "at_s": elapsed_s, "links": [[event.a, event.b], [event.b, event.a]]})

    def applied_links(self) -> list[list[list[int]]]:
        """Per applied event, the directed links it re-shaped."""
        return [record["links"] for record in self.applied]
