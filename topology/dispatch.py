"""List scheduling: the one greedy dispatcher that the simulator (its order-free mode) and the solver
(scheduler.ordering, TC2) both run.

Work is a set of chains (one per microbatch: forwards, loss, backwards; topology.plan.Route.chain)
numbered flat, chain by chain, so action a's successor is a + 1 unless a ends its chain. Whenever a node
is idle it starts its ready action of smallest (key, arrival time if `by_arrival`, tie, number); a forward
may start only while the node holds fewer than `memory` microbatches' activations (from a forward until
its backward). What an action costs and when its successor's input arrives is the caller's `execute`:
the simulator charges its own link model there and records events, the solver's dispatcher a flat,
cached form of the same cost model. Everything that happens at one instant is applied before any node
chooses, and nodes choose in id order, so the result does not depend on event insertion order.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Sequence

KINDS = ("F", "L", "B")  # kind codes 0, 1, 2: forward, loss, backward
BACKWARD_FIRST = (2.0, 1.0, 0.0)  # keys per kind code: backward, then loss, then forward (frees memory soonest)


def list_schedule(*, num_nodes: int, first: Sequence[int], node_of: Sequence[int], kind: Sequence[int],
                  key: Sequence[float], tie: Sequence[float], by_arrival: bool, memory: int | None,
                  execute: Callable[[int, int, float], tuple[float, float | None]]) -> list[int]:
    """Dispatch every action greedily; return those left waiting forever (empty when all ran).

    first: the first action of every chain, all ready at time 0; node_of, kind (0 F, 1 L, 2 B), key, tie:
    per action. execute(a, node, start) runs action a and returns (its end, the arrival time of a + 1's
    input, or None when a ends its chain). Times are seconds. A non-empty result means the memory cap
    stalled the work: forwards that can never start, and what waits behind them.
    """
    cap = math.inf if memory is None else memory
    push, pop = heapq.heappush, heapq.heappop
    # Ready work per node in two heaps, forwards apart: a forward may start only under the memory cap,
    # so the pick is the better of the two tops, or the other top when the node is full.
    fready: list[list] = [[] for _ in range(num_nodes)]
    oready: list[list] = [[] for _ in range(num_nodes)]
    held = [0] * num_nodes
    idle = [True] * num_nodes
    events = [(0.0, seq, node_of[f], f) for seq, f in enumerate(first)]  # (time, seq, node, action or -1: free)
    heapq.heapify(events)
    seq = len(events)
    while events:
        now = events[0][0]
        touched = []
        while events and events[0][0] == now:  # apply everything at this instant before choosing work
            _, _, node, a = pop(events)
            if a < 0:
                idle[node] = True
            else:
                push(fready[node] if kind[a] == 0 else oready[node], (key[a], now if by_arrival else 0.0, tie[a], a))
            touched.append(node)
        if len(touched) > 1:
            touched = sorted(set(touched))
        for node in touched:
            if not idle[node]:
                continue
            fq, oq = fready[node], oready[node]
            if fq and held[node] < cap and (not oq or fq[0] < oq[0]):
                a = pop(fq)[3]
                held[node] += 1
            elif oq:
                a = pop(oq)[3]
                if kind[a] == 2:
                    held[node] -= 1
            else:
                continue
            idle[node] = False
            end, arrive = execute(a, node, now)
            push(events, (end, seq, node, -1))
            seq += 1
            if arrive is not None:
                push(events, (arrive, seq, node_of[a + 1], a + 1))
                seq += 1
    return sorted(item[3] for queue in fready + oready for item in queue)
