"""A reservation table: what each node is planned to do when, for collision-aware path choice (TC2).

The path builder walks each candidate loop through the table (forwards, loss, backwards, each at the
earliest gap on its node after its input arrives, with a forward also waiting for room under the memory
cap) and keeps the candidate that finishes first; the winner's work is then reserved. A microbatch thus
avoids nodes that earlier microbatches will keep busy at the moment it would get there, which a static
hop-cost choice cannot see: there, every microbatch launched at once picks the same cheapest replicas
and they queue behind each other (or stall on the memory cap) at every stage.

Transfers are priced latency + bytes / bandwidth without uplink queueing; the dispatcher and the
simulator then work out the exact timings.
"""
from __future__ import annotations

from bisect import bisect_right, insort


class Timeline:
    def __init__(self, num_nodes: int, memory: int):
        self.busy: list[list[tuple[float, float]]] = [[] for _ in range(num_nodes)]  # sorted (start, end)
        self.holds: list[list[tuple[float, float]]] = [[] for _ in range(num_nodes)]  # (forward start, backward end)
        self.memory = memory

    def fit(self, node: int, ready: float, duration: float, admit: bool = False) -> float:
        """Earliest start >= ready of a gap of `duration` on `node`; with `admit`, also under the memory cap."""
        t = ready
        while True:
            t = self._gap(node, t, duration)
            if not admit:
                return t
            active = [end for start, end in self.holds[node] if start <= t < end]
            if len(active) < self.memory:
                return t
            t = min(active)

    def _gap(self, node: int, t: float, duration: float) -> float:
        busy = self.busy[node]
        i = bisect_right(busy, (t, float("inf")))
        if i > 0 and busy[i - 1][1] > t:
            t = busy[i - 1][1]
        while i < len(busy) and busy[i][0] < t + duration - 1e-12:
            t = max(t, busy[i][1])
            i += 1
        return t

    def reserve(self, node: int, start: float, end: float) -> None:
        insort(self.busy[node], (start, end))

    def hold(self, node: int, start: float, end: float) -> None:
        self.holds[node].append((start, end))
