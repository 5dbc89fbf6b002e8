"""Spawned rank processes for the multi-process (tier-2) tests."""
from __future__ import annotations

import multiprocessing
import time
from typing import Callable, Sequence


def spawn_ranks(target: Callable, args: Callable[[int], tuple], world: int, timeout: float = 120.0,
                wait_for: Sequence[int] | None = None) -> list:
    """Run target(*args(rank)) in `world` spawned processes and return their exit codes.

    Waits up to `timeout` seconds in all for the ranks in `wait_for` (default: every rank); any process
    still alive then is killed (its exit code is then negative), so a hung rank fails the test, never
    hangs it.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args(rank)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for rank in range(world) if wait_for is None else wait_for:
        procs[rank].join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]
