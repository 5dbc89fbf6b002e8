"""The cost model: one source of compute and communication times for the solver, the simulator and the
predicted-vs-measured report.

Compute of a stage on a node is its FLOPs over the node's effective FLOP/s; backward costs
`backward_factor` x forward. Stage 0's forward is the embedding plus its layers; the loss step on the data
node is the final norm + LM head forward and backward. A hop costs latency + bytes / bandwidth; a stage's
data-parallel all-reduce follows the ring formula over the slowest link of a greedy ring.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from topology.errors import ConfigError
from topology.model_spec import ModelSpec, split_layers
from topology.network import Topology


def layer_forward_flops(spec: ModelSpec) -> float:
    """Forward FLOPs of one sample (spec.context tokens) through one layer: matmuls + attention scores."""
    kv_dim = spec.num_kv_heads * spec.head_dim
    matmul_params = 2 * spec.dim * spec.dim + 2 * spec.dim * kv_dim + 3 * spec.dim * spec.ffn_dim
    return 2.0 * spec.context * matmul_params + 4.0 * spec.context * spec.context * spec.dim


def head_forward_flops(spec: ModelSpec) -> float:
    return 2.0 * spec.context * spec.dim * spec.vocab_size


@dataclass
class CostModel:
    topology: Topology
    model: ModelSpec
    microbatch_size: int
    num_stages: int
    backward_factor: float = 2.0
    # Bytes per gradient element in the all-reduce; None: the model's wire dtype (dtype_bytes), as the
    # runtime all-reduces gradients in the dtype it trains in (bf16: 2; float32 on CPU: 4).
    grad_bytes_per_param: int | None = None
    forward_s: np.ndarray = field(init=False, repr=False)  # [stage, node]

    def __post_init__(self):
        if self.grad_bytes_per_param is None:
            self.grad_bytes_per_param = self.model.dtype_bytes
        if isinstance(self.microbatch_size, bool) or not isinstance(self.microbatch_size, int) or self.microbatch_size <= 0:
            raise ConfigError(f"microbatch size must be a positive integer, got {self.microbatch_size!r}")
        self.layers = split_layers(self.model.num_layers, self.num_stages)
        flops = np.array([node.flops for node in self.topology.nodes])
        stage_flops = np.array([len(r) * layer_forward_flops(self.model) for r in self.layers])
        self.forward_s = self.microbatch_size * stage_flops[:, None] / flops[None, :]
        self.loss_s = self.microbatch_size * (1 + self.backward_factor) * head_forward_flops(self.model) / flops

    def backward_s(self, stage: int, node: int) -> float:
        return float(self.forward_s[stage, node] * self.backward_factor)

    @property
    def activation_bytes(self) -> int:
        """One hop's message: hidden states forward, or their gradient backward."""
        return self.microbatch_size * self.model.context * self.model.dim * self.model.dtype_bytes

    def hop_s(self, src: int, dst: int) -> float:
        return self.topology.transfer_s(src, dst, self.activation_bytes)

    def stage_params(self, stage: int) -> int:
        params = len(self.layers[stage]) * self.model.layer_params
        if stage == 0:
            params += self.model.embedding_params + self.model.head_params
        return params

    def grad_bytes(self, stage: int) -> int:
        return self.stage_params(stage) * self.grad_bytes_per_param

    def allreduce_s(self, stage: int, nodes: list[int]) -> float:
        """Ring all-reduce: 2(k-1)/k of the gradient over the ring's slowest link, plus 2(k-1) latencies."""
        k = len(nodes)
        if k <= 1:
            return 0.0
        ring = ring_order(self.topology, nodes)
        pairs = list(zip(ring, ring[1:] + ring[:1]))
        bw = min(self.topology.bandwidth_gbit_s[a, b] for a, b in pairs)
        lat = max(self.topology.latency_ms[a, b] for a, b in pairs) / 1e3
        return float(2 * (k - 1) / k * self.grad_bytes(stage) * 8 / (bw * 1e9) + 2 * (k - 1) * lat)

    def assumptions(self) -> dict:
        """The figures a prediction rests on, recorded in the plan and the simulator's report."""
        return {"topology": self.topology.name, "topology_fingerprint": self.topology.fingerprint(),
                "model": self.model.name, "microbatch_size": self.microbatch_size,
                "backward_factor": self.backward_factor, "grad_bytes_per_param": self.grad_bytes_per_param,
                "activation_bytes": self.activation_bytes}


def ring_order(topology: Topology, nodes: list[int]) -> list[int]:
    """A greedy ring: from the first node, always on to the best-connected unvisited node."""
    ring, rest = [nodes[0]], list(nodes[1:])
    while rest:
        last = ring[-1]
        best = max(rest, key=lambda j: (topology.bandwidth_gbit_s[last, j], -topology.latency_ms[last, j]))
        ring.append(best)
        rest.remove(best)
    return ring
