"""The plan: the only contract between the solver, the simulator and the runtime (docs/design.md,
"The plan: the contract").

A plan is data: nodes on stages, each microbatch's path, each node's order of actions. Plans round-trip
through JSON unchanged, and `Plan.from_dict` is the one parser of plan JSON: the solver writes plans, the
simulator (`python -m topology simulate`) and the runtime read them through it. It lives in `topology`,
the lowest layer, so that the simulator reads plans without importing the scheduler.

Actions have a short string form that parses back: ``F3@2`` is the forward of microbatch 3 at stage 2,
``B3@2`` its backward, ``L3@0`` the loss step (final norm + LM head forward and backward) of microbatch 3
on its data node. A `Workload` is the part of a plan the simulator replays (placement, routes, and an
order or none): the solver simulates workloads before it has a plan, and `Plan.workload()` gives a
plan's.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from topology.errors import ConfigError
from topology.yamlio import read_json

PLAN_VERSION = 1
DEFAULT_CONSTRAINTS = {"max_swaps": 2, "memory": 3}
_ACTION = re.compile(r"^([FBL])(\d+)@(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """One unit of a node's work (see the module docstring for the ``F3@2`` form); ConfigError on bad text."""
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
    """What the simulator replays: which node serves which stage, each microbatch's route, each node's order."""
    node_stage: list[int]  # node id -> the stage it serves
    routes: list[Route]
    order: dict[int, list[Action]] | None = None  # node id -> its sequence of actions; None: let the simulator choose

    @property
    def num_stages(self) -> int:
        return max(self.node_stage) + 1


@dataclass(frozen=True)
class PlanNode:
    """A node of the plan: its topology id and name, region, the stage it serves and its runtime rank."""
    id: int
    name: str
    region: str
    stage: int
    rank: int


@dataclass
class Plan:
    """A solved plan (fields as in its JSON form); `from_dict`/`load` raise a one-line ConfigError naming
    the file for anything malformed."""
    skip_ratio: float
    num_stages: int
    nodes: list[PlanNode]
    paths: list[Route]  # "paths" in JSON: each microbatch's route
    order: dict[int, list[Action]]  # node id -> preferred sequence of its actions
    constraints: dict = field(default_factory=lambda: dict(DEFAULT_CONSTRAINTS))
    seed: int = 0
    strategy: str = "full"
    model: str = ""
    microbatch_size: int = 1
    topology: dict = field(default_factory=dict)  # {"name", "num_nodes", "fingerprint"}
    predicted: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def num_microbatches(self) -> int:
        return len(self.paths)

    def placement(self) -> list[int]:
        """node id -> its stage: what a re-plan or a rotation keeps fixed (Problem.fixed_placement)."""
        return [node.stage for node in sorted(self.nodes, key=lambda n: n.id)]

    def stage_nodes(self, stage: int) -> list[int]:
        return [n.id for n in self.nodes if n.stage == stage]

    def node_of_rank(self, rank: int) -> PlanNode:
        for node in self.nodes:
            if node.rank == rank:
                return node
        raise ConfigError(f"the plan has no node for rank {rank}; it was made for {len(self.nodes)} ranks")

    def workload(self) -> Workload:
        """The placement, routes and order, as the simulator reads them (order None when the plan has none)."""
        node_stage = [n.stage for n in sorted(self.nodes, key=lambda n: n.id)]
        return Workload(node_stage, list(self.paths), dict(self.order) or None)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "strategy": self.strategy,
            "skip_ratio": self.skip_ratio,
            "num_stages": self.num_stages,
            "constraints": dict(self.constraints),
            "seed": self.seed,
            "model": self.model,
            "microbatch_size": self.microbatch_size,
            "topology": dict(self.topology),
            "nodes": [asdict(n) for n in self.nodes],
            "paths": [{"microbatch": p.microbatch, "data_node": p.data_node,
                       "nodes": list(p.nodes), "stages": list(p.stages)} for p in self.paths],
            "order": {str(node): [str(a) for a in actions] for node, actions in sorted(self.order.items())},
            "predicted": self.predicted,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "Plan":
        required = {"version", "skip_ratio", "num_stages", "constraints", "nodes", "paths", "order", "predicted"}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}; is this a skippipe plan?")
        if data["version"] != PLAN_VERSION:
            raise ConfigError(f"{where}: plan version {data['version']!r} is not supported (expected {PLAN_VERSION}); re-solve it")
        try:
            nodes = [PlanNode(int(n["id"]), str(n["name"]), str(n["region"]), int(n["stage"]), int(n["rank"]))
                     for n in data["nodes"]]
            paths = [Route(int(p["microbatch"]), int(p["data_node"]), tuple(int(x) for x in p["nodes"]),
                          tuple(int(x) for x in p["stages"])) for p in data["paths"]]
            order = {int(node): [Action.parse(a) for a in actions] for node, actions in data["order"].items()}
            constraints = dict(data["constraints"].items())  # a mapping: a list of pairs would pass dict()
            return cls(skip_ratio=float(data["skip_ratio"]), num_stages=int(data["num_stages"]), nodes=nodes,
                       paths=paths, order=order, constraints=constraints, seed=int(data.get("seed", 0)),
                       strategy=str(data.get("strategy", "")), model=str(data.get("model", "")),
                       microbatch_size=int(data.get("microbatch_size", 1)), topology=dict(data.get("topology", {})),
                       predicted=dict(data["predicted"]), version=int(data["version"]))
        except ConfigError as exc:  # a bad action string: say which file it is in
            raise ConfigError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{where}: malformed plan ({type(exc).__name__}: {exc}); re-solve it with python -m scheduler solve") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written plan behind."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_json(path), where=str(path))


def path_actions(path: Route) -> dict[int, list[Action]]:
    """The actions one microbatch's path puts on each node, in dependency order."""
    per_node: dict[int, list[Action]] = {}
    for action, node in path.chain():
        per_node.setdefault(node, []).append(action)
    return per_node


def sequential_order(paths: list[Route]) -> dict[int, list[Action]]:
    """Each node's actions when the microbatches run one after another, in microbatch order: a valid order
    for any routes (no node waits on an action that comes later), for plans made without the solver's."""
    order: dict[int, list[Action]] = {}
    for path in sorted(paths, key=lambda p: p.microbatch):
        for action, node in path.chain():
            order.setdefault(node, []).append(action)
    return order


def dependencies(path: Route) -> list[tuple[Action, int, Action, int]]:
    """The causal chain of a path: (action, node, next action, next node), forward then loss then backward."""
    chain = path.chain()
    return [(a, n, b, m) for (a, n), (b, m) in zip(chain, chain[1:])]


def message_order(plan: Plan) -> dict[tuple[int, int], list[tuple[Action, Action]]]:
    """Per (sender, receiver) pair, the messages in the order the sender emits them.

    A message is (producing action, consuming action). The sender emits in its plan order, so both ends
    derive the same sequence from the plan: this is what makes point-to-point traffic NCCL-safe (NCCL
    ignores tags and matches by order on each pair).
    """
    consumer: dict[Action, tuple[int, Action]] = {}
    for path in plan.paths:
        for a, n, b, m in dependencies(path):
            if n != m:
                consumer[a] = (m, b)
    pairs: dict[tuple[int, int], list[tuple[Action, Action]]] = {}
    for node, actions in sorted(plan.order.items()):
        for action in actions:
            if action in consumer:
                dst, nxt = consumer[action]
                pairs.setdefault((node, dst), []).append((action, nxt))
    return pairs
