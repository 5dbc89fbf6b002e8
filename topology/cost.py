"""The cost model: the one source of compute and communication times for the solver, the simulator and
the predicted-vs-measured report (docs/design.md, "Cost model").

Compute of a stage on a node is its FLOPs over the node's effective FLOP/s; backward costs
`backward_factor` x forward. Stage 0's forward is the embedding plus its layers; the loss step on the data
node is the final norm + LM head forward and backward. A hop costs latency + bytes / bandwidth
(`link_s`, with its serialisation part `serialise_s`); a stage's data-parallel all-reduce follows the ring
formula (`ring_allreduce_s`) over the slowest link of a greedy ring (`ring_order`).

Everything else that needs a time (the simulator, the solver's placement estimate, path costs and
dispatcher) reads it from here: the formulas as functions that take scalars or numpy arrays alike, and
the per-pair matrices a `CostModel` caches for the solver's inner loops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from topology.errors import ConfigError
from topology.model_spec import ModelSpec, split_layers

if TYPE_CHECKING:  # network.py imports the link formula from here
    from topology.network import Topology


def layer_flops(*, dim: int, kv_dim: int, ffn_dim: int, context: int) -> float:
    """Forward FLOPs of one sample (`context` tokens) through one LLaMa layer: 2 FLOPs per multiply-add of
    the q/o (dim x dim), k/v (dim x kv_dim) and SwiGLU (3 x dim x ffn_dim) matmuls per token, plus the
    attention scores and their weighted sum (2 x 2 x context^2 x dim)."""
    matmul_params = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * ffn_dim
    return 2.0 * context * matmul_params + 4.0 * context * context * dim


def layer_forward_flops(spec: ModelSpec) -> float:
    """Forward FLOPs of one sample (spec.context tokens) through one layer of `spec` (see layer_flops)."""
    return layer_flops(dim=spec.dim, kv_dim=spec.num_kv_heads * spec.head_dim, ffn_dim=spec.ffn_dim,
                       context=spec.context)


def head_forward_flops(spec: ModelSpec) -> float:
    """Forward FLOPs of one sample through the LM head (context x dim x vocab multiply-adds)."""
    return 2.0 * spec.context * spec.dim * spec.vocab_size


def serialise_s(num_bytes, bandwidth_gbit_s):
    """Seconds to put `num_bytes` on a link of `bandwidth_gbit_s` (scalars or numpy arrays; an infinite
    bandwidth, a node to itself, gives 0)."""
    return num_bytes * 8.0 / (bandwidth_gbit_s * 1e9)


def link_s(latency_ms, bandwidth_gbit_s, num_bytes):
    """One message over a link: latency plus serialisation (scalars or numpy arrays), in seconds."""
    return latency_ms / 1e3 + serialise_s(num_bytes, bandwidth_gbit_s)


def ring_allreduce_s(*, grad_bytes: float, k: int, bandwidth_gbit_s: float, latency_ms: float) -> float:
    """Ring all-reduce of `grad_bytes` over `k` nodes whose slowest link has `bandwidth_gbit_s` and worst
    latency `latency_ms`: 2(k-1)/k of the gradient serialised, plus 2(k-1) latencies (reduce-scatter then
    all-gather, k-1 steps each; Patarasuk & Yuan 2009)."""
    lat = latency_ms / 1e3
    return float(2 * (k - 1) / k * grad_bytes * 8 / (bandwidth_gbit_s * 1e9) + 2 * (k - 1) * lat)


def ring_order(topology: Topology, nodes) -> list[int]:
    """A greedy ring: from the first node, always on to the best-connected unvisited node (highest
    bandwidth, then lowest latency, then first in `nodes`). Vectorised over the candidates: the placement
    search asks for thousands of rings (networkx's greedy_tsp walks the same way, but building a graph per
    ring cost a tenth of a whole solve at 100 nodes, and it breaks ties by set order)."""
    idx = np.asarray(nodes, dtype=int)
    k = len(idx)
    bw = topology.bandwidth_gbit_s[np.ix_(idx, idx)]
    lat = topology.latency_ms[np.ix_(idx, idx)]
    visited = np.zeros(k, dtype=bool)
    ring = [0] if k else []
    for _ in range(k - 1):
        visited[ring[-1]] = True
        row = np.where(visited, -np.inf, bw[ring[-1]])
        ring.append(int(np.argmin(np.where(row == row.max(), lat[ring[-1]], np.inf))))
    return [int(idx[i]) for i in ring]


@dataclass
class CostModel:
    """Times (seconds) for one model shape and microbatch size on one topology.

    forward_s [stage, node], loss_s [node]; latency_matrix_s, serialise_matrix_s and hop_matrix_s
    [src, dst]: one activation message's latency, serialisation and total (0 from a node to itself). Raises ConfigError
    for a microbatch size that is not a positive integer.
    """
    topology: Topology
    model: ModelSpec
    microbatch_size: int
    num_stages: int
    backward_factor: float = 2.0
    # Bytes per gradient element in the all-reduce; None: the model's wire dtype (dtype_bytes), as the
    # runtime all-reduces gradients in the dtype it trains in (bf16: 2; float32 on CPU: 4).
    grad_bytes_per_param: int | None = None
    forward_s: np.ndarray = field(init=False, repr=False)  # [stage, node]
    # stage, nodes -> seconds: the placement search re-scores the same groups again and again
    _allreduce_cache: dict = field(init=False, repr=False, default_factory=dict)

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
        topo = self.topology
        self.latency_matrix_s = topo.latency_ms / 1e3
        self.serialise_matrix_s = serialise_s(self.activation_bytes, topo.bandwidth_gbit_s)
        self.hop_matrix_s = link_s(topo.latency_ms, topo.bandwidth_gbit_s, self.activation_bytes)
        np.fill_diagonal(self.hop_matrix_s, 0.0)

    def backward_s(self, stage: int, node: int) -> float:
        return float(self.forward_s[stage, node] * self.backward_factor)

    @property
    def activation_bytes(self) -> int:
        """One hop's message: hidden states forward, or their gradient backward."""
        return self.microbatch_size * self.model.context * self.model.dim * self.model.dtype_bytes

    def hop_s(self, src: int, dst: int) -> float:
        """One activation message from `src` to `dst` (0 on the same node)."""
        return float(self.hop_matrix_s[src, dst])

    def stage_params(self, stage: int) -> int:
        params = len(self.layers[stage]) * self.model.layer_params
        if stage == 0:
            params += self.model.embedding_params + self.model.head_params
        return params

    def grad_bytes(self, stage: int) -> int:
        return self.stage_params(stage) * self.grad_bytes_per_param

    def allreduce_s(self, stage: int, nodes) -> float:
        """The stage's gradient all-reduced over `nodes` (ring_allreduce_s over a ring_order ring)."""
        key = (stage, tuple(int(n) for n in nodes))
        seconds = self._allreduce_cache.get(key)
        if seconds is None:
            seconds = self._allreduce_cache[key] = self._ring_allreduce(stage, list(key[1]))
        return seconds

    def _ring_allreduce(self, stage: int, nodes: list[int]) -> float:
        k = len(nodes)
        if k <= 1:
            return 0.0
        ring = ring_order(self.topology, nodes)
        pairs = list(zip(ring, ring[1:] + ring[:1]))
        bw = min(self.topology.bandwidth_gbit_s[a, b] for a, b in pairs)
        lat = max(self.topology.latency_ms[a, b] for a, b in pairs)
        return ring_allreduce_s(grad_bytes=self.grad_bytes(stage), k=k, bandwidth_gbit_s=bw, latency_ms=lat)

    def assumptions(self) -> dict:
        """The figures a prediction rests on, recorded in the plan and the simulator's report."""
        return {"topology": self.topology.name, "topology_fingerprint": self.topology.fingerprint(),
                "model": self.model.name, "microbatch_size": self.microbatch_size,
                "backward_factor": self.backward_factor, "grad_bytes_per_param": self.grad_bytes_per_param,
                "activation_bytes": self.activation_bytes}
