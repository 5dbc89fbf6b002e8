"""A solve request, checked at construction with the fix in every message, and a strategy's answer."""
from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.constraints import path_length
from topology.cost import CostModel
from topology.errors import ConfigError
from topology.model_spec import ModelSpec
from topology.network import Topology
from topology.plan import Action, Route


@dataclass
class Problem:
    topology: Topology
    model: ModelSpec
    microbatch_size: int = 1
    num_stages: int | None = None
    stage_sizes: list[int] | None = None  # nodes per stage; None: the strategy chooses (even by default)
    num_microbatches: int | None = None  # per iteration, spread over the data nodes; None: memory per data node
    memory: int = 3
    skip_ratio: float = 0.0
    max_swaps: int = 2
    seed: int = 0
    time_limit: float | None = None
    topology_source: dict = field(default_factory=dict)  # how to rebuild the topology: {"spec", "seed"}
    cost: CostModel = field(init=False, repr=False)

    def __post_init__(self):
        n = self.topology.num_nodes
        if self.stage_sizes is not None:
            sizes = list(self.stage_sizes)
            if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
                raise ConfigError(f"stage sizes {sizes} must be positive integers; every stage needs a node")
            if sum(sizes) != n:
                raise ConfigError(f"stage sizes sum to {sum(sizes)} but the topology has {n} nodes; "
                                  f"pass --stage-sizes that sum to {n} or --nodes {sum(sizes)}")
            if self.num_stages is not None and self.num_stages != len(sizes):
                raise ConfigError(f"--stages {self.num_stages} disagrees with {len(sizes)} stage sizes; pass one of them")
            self.num_stages = len(sizes)
        if self.num_stages is None:
            raise ConfigError("pass --stages S or --stage-sizes a,b,...")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages <= 0:
            raise ConfigError(f"--stages must be a positive integer, got {self.num_stages!r}")
        if self.num_stages > n:
            raise ConfigError(f"{self.num_stages} stages need at least {self.num_stages} nodes but the topology has {n}; "
                              f"use fewer stages or more nodes")
        if self.num_stages > self.model.num_layers:
            raise ConfigError(f"{self.num_stages} stages but model {self.model.name!r} has {self.model.num_layers} layers; "
                              f"use at most {self.model.num_layers} stages")
        if not isinstance(self.memory, int) or isinstance(self.memory, bool) or self.memory < 1:
            raise ConfigError(f"--memory is {self.memory!r}; a node must hold at least 1 microbatch's activations")
        if not isinstance(self.max_swaps, int) or self.max_swaps < 0:
            raise ConfigError(f"max_swaps must be a non-negative integer, got {self.max_swaps!r}")
        path_length(self.num_stages, self.skip_ratio)  # refuses impossible skip ratios with the reason
        if self.num_microbatches is not None and (isinstance(self.num_microbatches, bool)
                                                  or not isinstance(self.num_microbatches, int) or self.num_microbatches < 1):
            raise ConfigError(f"--microbatches is {self.num_microbatches!r}; pass at least 1 microbatch per iteration")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ConfigError(f"--time-limit must be positive seconds, got {self.time_limit}")
        self.cost = CostModel(self.topology, self.model, self.microbatch_size, self.num_stages)

    @property
    def path_length(self) -> int:
        return path_length(self.num_stages, self.skip_ratio)

    def even_stage_sizes(self) -> list[int]:
        """Nodes per stage when not given: even, the remainder to the lowest stages (stage 0 also does the loss)."""
        if self.stage_sizes is not None:
            return list(self.stage_sizes)
        base, extra = divmod(self.topology.num_nodes, self.num_stages)
        return [base + (1 if s < extra else 0) for s in range(self.num_stages)]

    def microbatches_for(self, num_data_nodes: int) -> int:
        return self.num_microbatches if self.num_microbatches is not None else self.memory * num_data_nodes


@dataclass
class Solution:
    """What a strategy returns: node id -> stage, every microbatch's route, and each node's order of
    actions (None: the simulator's default dispatch chooses it)."""
    node_stage: list[int]
    routes: list[Route]
    order: dict[int, list[Action]] | None = None
