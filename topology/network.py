"""The node graph: nodes with compute and memory, and per-pair latency and bandwidth.

Links are held as dense numpy matrices (fast for the solver and the simulator at 1,000 nodes) and
exposed as a networkx graph for analysis. Times over a link come from the cost model's formulas.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import networkx as nx
import numpy as np

from topology.cost import layer_flops, link_s
from topology.errors import ConfigError

# The SkipPipe artifact measured 0.055 s per sample per layer for one LLaMa layer of this shape; a node
# described by "seconds per sample per layer" is converted to effective FLOP/s through it, so one figure
# serves every model shape.
REFERENCE_LAYER = {"dim": 1024, "ffn_dim": 4096, "context": 1024}


def reference_layer_flops() -> float:
    """Forward FLOPs of one sample through the reference layer (no grouped-query attention)."""
    return layer_flops(dim=REFERENCE_LAYER["dim"], kv_dim=REFERENCE_LAYER["dim"], ffn_dim=REFERENCE_LAYER["ffn_dim"],
                       context=REFERENCE_LAYER["context"])


@dataclass(frozen=True)
class Node:
    id: int
    name: str
    region: str
    flops: float  # effective forward FLOP/s (what the node really achieves, not its peak)
    memory_gb: float | None = None

    def __post_init__(self):
        if not np.isfinite(self.flops) or self.flops <= 0:
            raise ConfigError(f"node {self.name!r}: compute speed must be positive, got {self.flops!r}")

    @property
    def s_per_sample_per_layer(self) -> float:
        return reference_layer_flops() / self.flops


class Topology:
    """Nodes plus symmetric-or-not latency (ms) and bandwidth (Gbit/s) matrices indexed by node id."""

    def __init__(self, name: str, nodes: list[Node], latency_ms: np.ndarray, bandwidth_gbit_s: np.ndarray):
        n = len(nodes)
        if n == 0:
            raise ConfigError(f"topology {name!r} has no nodes; add at least one")
        if [node.id for node in nodes] != list(range(n)):
            raise ConfigError(f"topology {name!r}: node ids must be 0..{n - 1} in order")
        names = [node.name for node in nodes]
        if len(set(names)) != n:
            dup = sorted({x for x in names if names.count(x) > 1})
            raise ConfigError(f"topology {name!r}: duplicate node name(s) {', '.join(dup)}; give each node its own name")
        latency_ms = np.asarray(latency_ms, dtype=float)
        bandwidth_gbit_s = np.asarray(bandwidth_gbit_s, dtype=float)
        for label, matrix in (("latency_ms", latency_ms), ("bandwidth_gbit_s", bandwidth_gbit_s)):
            if matrix.shape != (n, n):
                raise ConfigError(f"topology {name!r}: {label} must be {n}x{n}, got {'x'.join(map(str, matrix.shape))}")
        off = ~np.eye(n, dtype=bool)
        if n > 1:
            bad = np.argwhere(off & ~(bandwidth_gbit_s > 0) | off & ~np.isfinite(bandwidth_gbit_s))
            if len(bad):
                i, j = bad[0]
                raise ConfigError(f"topology {name!r}: link {names[i]}-{names[j]} has bandwidth "
                                  f"{float(bandwidth_gbit_s[i, j])} Gbit/s; every link needs a positive bandwidth")
            bad = np.argwhere(off & (~np.isfinite(latency_ms) | (latency_ms < 0)))
            if len(bad):
                i, j = bad[0]
                raise ConfigError(f"topology {name!r}: link {names[i]}-{names[j]} has latency "
                                  f"{float(latency_ms[i, j])} ms; latency must be zero or positive")
        np.fill_diagonal(latency_ms, 0.0)
        np.fill_diagonal(bandwidth_gbit_s, np.inf)
        self.name = name
        self.nodes = list(nodes)
        self.latency_ms = latency_ms
        self.bandwidth_gbit_s = bandwidth_gbit_s

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def regions(self) -> list[str]:
        return list(dict.fromkeys(node.region for node in self.nodes))

    def transfer_s(self, a: int, b: int, num_bytes: float) -> float:
        """Time for one message: latency plus serialisation at the link's bandwidth."""
        if a == b:
            return 0.0
        return link_s(self.latency_ms[a, b], self.bandwidth_gbit_s[a, b], num_bytes)

    def fingerprint(self) -> str:
        """A short hash of everything a plan depends on, so a plan made for another topology is caught."""
        digest = hashlib.sha256()
        digest.update(repr([(n.name, n.region, round(n.flops, 3)) for n in self.nodes]).encode())
        digest.update(np.round(self.latency_ms, 6).tobytes())
        digest.update(np.round(np.where(np.isinf(self.bandwidth_gbit_s), 0, self.bandwidth_gbit_s), 6).tobytes())
        return digest.hexdigest()[:16]

    def graph(self) -> nx.Graph:
        """Undirected networkx view; an edge carries the slower direction's figures."""
        g = nx.Graph(name=self.name)
        for node in self.nodes:
            g.add_node(node.id, name=node.name, region=node.region, flops=node.flops)
        n = self.num_nodes
        for i in range(n):
            for j in range(i + 1, n):
                g.add_edge(i, j, latency_ms=float(max(self.latency_ms[i, j], self.latency_ms[j, i])),
                           bandwidth_gbit_s=float(min(self.bandwidth_gbit_s[i, j], self.bandwidth_gbit_s[j, i])))
        return g

    def subset(self, node_ids: list[int], name: str | None = None) -> "Topology":
        """The topology restricted to some nodes, renumbered 0..k-1 (names kept): re-planning on survivors."""
        idx = np.asarray(node_ids, dtype=int)
        nodes = [Node(i, self.nodes[j].name, self.nodes[j].region, self.nodes[j].flops, self.nodes[j].memory_gb)
                 for i, j in enumerate(node_ids)]
        return Topology(name or self.name, nodes, self.latency_ms[np.ix_(idx, idx)].copy(),
                        self.bandwidth_gbit_s[np.ix_(idx, idx)].copy())

    def to_dict(self) -> dict:
        """Explicit YAML form (nodes + matrices) that loads back to an equal topology."""
        bw = np.where(np.isinf(self.bandwidth_gbit_s), 0.0, self.bandwidth_gbit_s)
        return {
            "name": self.name,
            "nodes": [{"name": n.name, "region": n.region, "flops": float(n.flops),
                       **({"memory_gb": n.memory_gb} if n.memory_gb is not None else {})} for n in self.nodes],
            "latency_ms": self.latency_ms.round(6).tolist(),
            "bandwidth_gbit_s": bw.round(6).tolist(),
        }
