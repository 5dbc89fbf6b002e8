"""The explicit runtime context: who this process is in the plan, its device, its process groups and its
transport.

Passed to everything that communicates; there are no module-level globals.

Note [transport]: `Context.isend` is the one function training messages are sent with, chosen at launch
by the entry point: torch.distributed.isend on a real network, or the emulator's latency-delayed send
(skippipe/emulation/latency.py) on an emulated one. The runtime only calls it; it never looks at how the
network is made, so it imports nothing of the emulation.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from topology.errors import ConfigError
from topology.plan import Plan, PlanNode


def pick_device(kind: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA when present (one GPU per local rank), CPU otherwise; nothing else hard-codes a device."""
    if kind not in ("auto", "cpu", "cuda"):  # e.g. evaluate.py --device tpu would otherwise mean cuda
        raise ConfigError(f"device must be auto, cpu or cuda, got {kind!r}")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


Send = Callable[..., object]  # isend(tensor, dst=rank) -> a Work with wait() / is_completed()


@dataclass
class Context:
    """One rank's place in the plan; built by `build_context` after the default group is joined."""
    rank: int
    world_size: int
    node: PlanNode  # the plan node this rank plays
    device: torch.device
    timeout: timedelta  # bound on every wait for a peer
    stage_ranks: dict[int, list[int]]  # stage -> ranks of its replicas, ascending
    stage_groups: dict[int, object] = field(default_factory=dict)  # stage -> data-parallel process group
    node_rank: dict[int, int] = field(default_factory=dict)  # plan node id -> rank
    isend: Send = dist.isend  # the transport of training messages (Note [transport])
    # (from step, factor): from that step on, every forward, loss and backward of this rank takes
    # `factor` times as long (an injected wait after it). A straggling node, for the emulated cluster's
    # scheduled events (skippipe/emulation/events.py); chosen at launch (SLOWDOWN_ENV), None in real runs.
    slowdown: tuple[int, float] | None = None
    # action kind (F, L, B) -> the seconds it takes at least (an injected wait after a faster one): the
    # emulated cluster's compute, scaled like its bandwidths (Note [emulated compute] in
    # skippipe/emulation/emulate.py); chosen at launch (COMPUTE_ENV), None in real runs.
    compute_floor_s: dict[str, float] | None = None

    @property
    def stage(self) -> int:
        return self.node.stage

    @property
    def is_stage_leader(self) -> bool:
        """The lowest rank of the stage: counts the stage once where replicas hold the same values."""
        return self.stage_ranks[self.stage][0] == self.rank


def init_process_group(device: torch.device, *, timeout_s: float, init_method: str | None = None,
                       rank: int | None = None, world_size: int | None = None) -> None:
    """Join the default group; torchrun's environment (env://) unless an init_method is given (tests).

    The timeout bounds collectives and the store; point-to-point waits pass it explicitly (comm.py).
    """
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # eager NCCL init: a missing peer fails here, not mid-iteration
    dist.init_process_group(backend_for(device), init_method=init_method or "env://",
                            rank=-1 if rank is None else rank, world_size=-1 if world_size is None else world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


SLOWDOWN_ENV = "SKIPPIPE_SLOWDOWN"  # "STEP:FACTOR", read by the launcher (scripts/train.py)


def slowdown_from_env() -> tuple[int, float] | None:
    """SKIPPIPE_SLOWDOWN="6:3" -> (6, 3.0): this rank computes 3x slower from step 6; None when unset.
    ConfigError for a malformed value."""
    text = os.environ.get(SLOWDOWN_ENV, "").strip()
    if not text:
        return None
    step, _, factor = text.partition(":")
    try:
        value = (int(step), float(factor))
    except ValueError:
        value = None
    if value is None or value[0] < 1 or not value[1] >= 1.0:
        raise ConfigError(f"{SLOWDOWN_ENV}={text!r}: expected STEP:FACTOR with STEP >= 1 and FACTOR >= 1, e.g. 6:3")
    return value


COMPUTE_ENV = "SKIPPIPE_COMPUTE_S"  # "F=0.41,L=0.02,B=0.82", read by the launcher (scripts/train.py)


def compute_floor_from_env() -> dict[str, float] | None:
    """SKIPPIPE_COMPUTE_S="F=0.41,L=0.02,B=0.82" -> {"F": 0.41, "L": 0.02, "B": 0.82}: every forward, loss
    and backward of this rank takes at least that many seconds; None when unset. ConfigError for a malformed
    value."""
    text = os.environ.get(COMPUTE_ENV, "").strip()
    if not text:
        return None
    floors: dict[str, float] = {}
    for item in text.split(","):
        kind, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if kind.strip() not in ("F", "L", "B") or not value >= 0 or kind.strip() in floors:
            raise ConfigError(f"{COMPUTE_ENV}={text!r}: expected KIND=SECONDS for each of F, L and B at most "
                              f"once, seconds >= 0, e.g. F=0.41,L=0.02,B=0.82")
        floors[kind.strip()] = value
    return floors


def build_context(plan: Plan, device: torch.device, timeout_s: float, *, isend: Send = dist.isend,
                  slowdown: tuple[int, float] | None = None, compute_floor_s: dict[str, float] | None = None
                  ) -> Context:
    """Map this rank to its plan node and create one data-parallel group per stage; `isend` is the
    transport the launcher chose (Note [transport]). ConfigError when the world size is not the plan's.

    Every rank calls new_group for every stage, in stage order, also for groups it is not in: the
    groups are collectives over the default group and must be created in the same order everywhere.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != len(plan.nodes):
        raise ConfigError(f"the plan has {len(plan.nodes)} nodes but {world_size} ranks are running; "
                          f"launch {len(plan.nodes)} ranks or re-solve for {world_size}")
    stage_ranks = {s: sorted(n.rank for n in plan.nodes if n.stage == s) for s in range(plan.num_stages)}
    timeout = timedelta(seconds=timeout_s)
    groups = {}
    for stage in range(plan.num_stages):
        group = dist.new_group(stage_ranks[stage], timeout=timeout)
        if rank in stage_ranks[stage]:
            groups[stage] = group
    return Context(rank=rank, world_size=world_size, node=plan.node_of_rank(rank), device=device, timeout=timeout,
                   stage_ranks=stage_ranks, stage_groups=groups, node_rank={n.id: n.rank for n in plan.nodes},
                   isend=isend, slowdown=slowdown, compute_floor_s=compute_floor_s)


def env_rank() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
