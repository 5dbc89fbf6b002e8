"""What the simulator replays: which node serves which stage, each microbatch's path, each node's order.

This is the plan seen from the network's side, parsed straight from plan JSON so that the topology layer
needs nothing from the scheduler. Actions have a short string form that parses back: ``F3@2`` is the
forward of microbatch 3 at stage 2, ``B3@2`` its backward, ``L3@0`` the loss step (final norm + LM head
forward and backward) of microbatch 3 on its data node.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from topology.errors import ConfigError

_ACTION = re.compile(r"^([FBL])(\d+)@(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    kind: str  # "F" forward, "L" loss (head forward + backward, data node only), "B" backward
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@{self.stage}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        m = _ACTION.match(text.strip()) if isinstance(text, str) else None
        if not m:
            raise ConfigError(f"bad action {text!r}; actions look like F3@2 (forward), B3@2 (backward), L3@0 (loss)")
        return cls(m.group(1), int(m.group(2)), int(m.group(3)))


@dataclass(frozen=True)
class Route:
    """A microbatch's loop: nodes[0] is its data node at stage 0; the return to it for the loss is implied."""
    microbatch: int
    data_node: int
    nodes: tuple[int, ...]
    stages: tuple[int, ...]

    def chain(self) -> list[tuple[Action, int]]:
        """The causal sequence of (action, node): forwards along the path, the loss, backwards in reverse."""
        forward = [(Action("F", self.microbatch, s), n) for n, s in zip(self.nodes, self.stages)]
        backward = [(Action("B", self.microbatch, s), n) for n, s in reversed(list(zip(self.nodes, self.stages)))]
        return forward + [(Action("L", self.microbatch, 0), self.data_node)] + backward


@dataclass
class Workload:
    node_stage: list[int]  # node id -> the stage it serves
    routes: list[Route]
    order: dict[int, list[Action]] | None = None  # node id -> its sequence of actions; None: let the simulator choose

    @property
    def num_stages(self) -> int:
        return max(self.node_stage) + 1

    @classmethod
    def from_plan_dict(cls, plan: dict, where: str = "plan") -> "Workload":
        try:
            node_stage = [int(n["stage"]) for n in sorted(plan["nodes"], key=lambda n: int(n["id"]))]
            routes = [Route(int(p["microbatch"]), int(p["data_node"]), tuple(map(int, p["nodes"])),
                            tuple(map(int, p["stages"]))) for p in plan["paths"]]
            order = {int(k): [Action.parse(a) for a in v] for k, v in plan["order"].items()}
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{where}: malformed plan ({type(exc).__name__}: {exc}); "
                              f"check it with python -m scheduler validate") from None
        return cls(node_stage, routes, order or None)
