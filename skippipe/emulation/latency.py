"""Link latency added in the process: each point-to-point send starts after its link's one-way latency.

The emulated cluster (skippipe/emulation/netns.py) shapes bandwidth in the kernel, but netem (kernel delay) is not
available here, so latency is added where the message is sent. The emulator writes a JSON file with a
rank x rank matrix of one-way latencies and points SKIPPIPE_LINK_LATENCY at it; the launcher
(scripts/train.py) then builds this rank's `LinkLatency` (`link_latency_from_env`) and hands its `isend`
to the runtime as the context's transport (Note [transport] in skippipe/context.py): it behaves as
`torch.distributed.isend` on a link with that latency. Nothing here is module state.

Note [delay before send]: holding a message back for the latency L and then sending it is the same, for
the receiver, as sending it at once over a link with propagation delay L, as long as the messages to one
peer keep their order: a message sent at t arrives at max(t + L, end of the previous one) + bytes / rate
either way. Sends to one peer leave in order (one FIFO per destination, in `LinkLatency`), so the
per-pair message order the runtime relies on (comm.py, Note [message order]) is kept. Collectives
(the data-parallel all-reduce) are not delayed; their latency term is small inside a region.
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ENV = "SKIPPIPE_LINK_LATENCY"
NODE_ENV = "SKIPPIPE_EMULATED_NODE"  # the emulator's node index of this process, checked against the rank


def write_latency_file(path: str | Path, latency_ms) -> None:
    """The file the emulator hands to every rank: one-way latency in ms, indexed [sender rank][receiver rank]."""
    rows = [[float(x) for x in row] for row in latency_ms]
    Path(path).write_text(json.dumps({"latency_ms": rows}))


def read_latency_file(path: str | Path) -> list[list[float]]:
    data = json.loads(Path(path).read_text())
    rows = data.get("latency_ms") if isinstance(data, dict) else None
    if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != len(rows) for r in rows):
        raise ValueError(f"{path}: expected {{'latency_ms': n x n matrix}}; written by skippipe.emulation.latency.write_latency_file")
    return rows


class DelayedWork:
    """What `LinkLatency.isend` returns: the send's Work once it has been issued, with the same wait API."""

    def __init__(self):
        self._issued = threading.Event()
        self._work = None
        self._error: BaseException | None = None

    def _set(self, work=None, error: BaseException | None = None) -> None:
        self._work, self._error = work, error
        self._issued.set()

    def is_completed(self) -> bool:
        return self._issued.is_set() and self._error is None and self._work.is_completed()

    def wait(self, timeout: timedelta | None = None) -> bool:
        start = time.monotonic()
        limit = None if timeout is None else timeout.total_seconds()
        if not self._issued.wait(limit):
            raise RuntimeError(f"a delayed send was not issued within {limit:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"the delayed send failed: {self._error}") from self._error
        if limit is None:
            return self._work.wait()
        return self._work.wait(timedelta(seconds=max(0.001, limit - (time.monotonic() - start))))


class LinkLatency:
    """Sends held back by their link's latency: one scheduler thread, FIFO per destination."""

    def __init__(self, latency_s_to: dict[int, float]):
        self.latency_s_to = dict(latency_s_to)  # destination rank -> one-way latency in seconds
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_matrix(cls, latency_ms: list[list[float]], rank: int) -> "LinkLatency":
        if not 0 <= rank < len(latency_ms):
            raise ValueError(f"rank {rank} is outside the {len(latency_ms)}-rank latency matrix; "
                             f"was the emulator started for this many nodes?")
        return cls({dst: float(ms) / 1e3 for dst, ms in enumerate(latency_ms[rank]) if dst != rank})

    def isend(self, tensor: torch.Tensor, dst: int, group=None, tag: int = 0):
        """dist.isend, issued once the link to `dst` has held it back for its latency (Note [delay before send])."""
        delay = self.latency_s_to.get(dst, 0.0)
        if delay <= 0:
            return dist.isend(tensor, dst=dst, group=group, tag=tag)
        work = DelayedWork()
        # Due times to one destination only grow (constant delay, monotonic clock), and the sequence number
        # breaks ties, so each destination's sends leave in the order they were made.
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), tensor, dst, group, tag, work))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="link-latency", daemon=True)
                self._thread.start()
            self._cv.notify()
        return work

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, tensor, dst, group, tag, work = heapq.heappop(self._heap)
            try:
                work._set(dist.isend(tensor, dst=dst, group=group, tag=tag))
            except BaseException as exc:  # handed to whoever waits on the send
                work._set(error=exc)


def link_latency_from_env(rank: int, rank_nodes: list[int] | None = None, *,
                          environ: Mapping[str, str] = os.environ) -> LinkLatency | None:
    """This rank's LinkLatency from the file SKIPPIPE_LINK_LATENCY names; None when it is unset.

    `rank_nodes`: the emulated node of each rank, for a world whose ranks are not its node indices (the
    survivors of a lost node, re-ranked by torchrun: skippipe/elastic.py); the matrix is then cut to
    those nodes' rows and columns, in rank order. None: rank == node, checked against
    SKIPPIPE_EMULATED_NODE (Note [rank = node] in emulate.py); a mismatch raises RuntimeError.
    """
    path = environ.get(ENV)
    if not path:
        return None
    node = environ.get(NODE_ENV)
    expected = rank if rank_nodes is None else rank_nodes[rank]
    if node is not None and int(node) != expected:
        raise RuntimeError(f"rank {rank} runs in emulated node {node}'s namespace; the latency matrix and the "
                           f"shaped links assume rank == node (the emulator orders ranks by node address)")
    matrix = read_latency_file(path)
    if rank_nodes is not None:  # rows and columns of the ranks' nodes, in rank order
        matrix = [[matrix[a][b] for b in rank_nodes] for a in rank_nodes]
    return LinkLatency.from_matrix(matrix, rank)
