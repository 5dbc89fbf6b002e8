"""Topology from a scenario name or a YAML file (explicit links, matrices, region links, or a scenario).

YAML forms (all keys checked; unknown keys are errors):

    scenario: gcp-12-regions     # a named scenario ...
    num_nodes: 20                # ... with a node count (or --nodes), and an optional seed

    name: my-cluster             # or explicit nodes ...
    nodes:
      - {name: a0, region: eu, flops: 1.0e14}               # effective FLOP/s, or
      - {name: b0, region: us, s_per_sample_per_layer: 0.055} # seconds for a 1024-dim, 1024-token layer
    links:                       # ... and every pair once (symmetric unless `directed: true`), or
      - {a: a0, b: b0, latency_ms: 80, bandwidth_gbit_s: 0.2}
    region_links:                # ... links between regions, plus `same_region` for pairs inside one, or
      - {a: eu, b: us, latency_ms: 80, bandwidth_gbit_s: 0.2}
    same_region: {latency_ms: 1, bandwidth_gbit_s: 10}
    latency_ms: [[0, 80], [80, 0]]        # ... full matrices
    bandwidth_gbit_s: [[0, 0.2], [0.2, 0]]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from topology import resources
from topology.errors import ConfigError
from topology.network import Node, Topology, reference_layer_flops
from topology.scenarios import SCENARIOS, scenario
from topology.yamlio import check_keys, read_yaml

_NODE_KEYS = {"name", "region", "flops", "s_per_sample_per_layer", "memory_gb"}
_LINK_KEYS = {"a", "b", "latency_ms", "bandwidth_gbit_s", "directed"}


def load_topology(spec: str | Path, num_nodes: int | None = None, seed: int = 0) -> Topology:
    """`spec` is a scenario name or a YAML path; `num_nodes` is required for scenarios."""
    text = str(spec)
    if text in SCENARIOS:
        if num_nodes is None:
            raise ConfigError(f"scenario {text!r} needs a node count; pass --nodes N")
        return scenario(text, num_nodes, seed)
    # A shipped topology by name (emulated-8) or by its repository path from any directory.
    path = resources.find("topology", text) or Path(text)
    if not path.suffix in (".yaml", ".yml") and not path.exists():
        raise ConfigError(f"unknown topology {text!r}; pass a YAML path or one of: "
                          f"{', '.join([*SCENARIOS, *resources.names('topology')])}")
    topo = topology_from_dict(read_yaml(path), where=str(path), num_nodes=num_nodes, seed=seed)
    if num_nodes is not None and topo.num_nodes != num_nodes:
        raise ConfigError(f"{path} has {topo.num_nodes} nodes but --nodes says {num_nodes}; drop --nodes or fix the file")
    return topo


def topology_from_dict(data: dict, where: str = "topology", num_nodes: int | None = None, seed: int = 0) -> Topology:
    if "scenario" in data:
        check_keys(data, {"scenario", "num_nodes", "seed", "name"}, where)
        count = data.get("num_nodes", num_nodes)
        if count is None:
            raise ConfigError(f"{where}: scenario {data['scenario']!r} needs num_nodes (or pass --nodes)")
        return scenario(str(data["scenario"]), count, int(data.get("seed", seed)))
    check_keys(data, {"name", "nodes", "links", "region_links", "same_region", "latency_ms", "bandwidth_gbit_s"},
               where, required={"nodes"})
    nodes = _nodes(data["nodes"], where)
    n = len(nodes)
    index = {node.name: node.id for node in nodes}
    if len(index) != n:  # links name nodes: two of one name cannot both be linked
        dup = sorted({node.name for node in nodes if [m.name for m in nodes].count(node.name) > 1})
        raise ConfigError(f"{where}: duplicate node name(s) {', '.join(dup)}; give each node its own name")
    lat, bw = np.full((n, n), np.nan), np.full((n, n), np.nan)
    forms = [k for k in ("links", "region_links", "latency_ms") if k in data]
    if len(forms) != 1 and n > 1:
        raise ConfigError(f"{where}: give exactly one of links, region_links, or latency_ms + bandwidth_gbit_s matrices")
    if "latency_ms" in data:
        if "bandwidth_gbit_s" not in data:
            raise ConfigError(f"{where}: latency_ms matrix given without a bandwidth_gbit_s matrix")
        lat, bw = _matrix(data["latency_ms"], n, where, "latency_ms"), _matrix(data["bandwidth_gbit_s"], n, where, "bandwidth_gbit_s")
    elif "links" in data:
        for k, link in enumerate(_list(data["links"], where, "links")):
            a, b, fig, directed = _link(link, f"{where}: links[{k}]", index)
            lat[a, b], bw[a, b] = fig
            if not directed:
                lat[b, a], bw[b, a] = fig
    elif "region_links" in data:
        regions = {node.region for node in nodes}
        table = {}
        for k, link in enumerate(_list(data["region_links"], where, "region_links")):
            a, b, fig, _ = _link(link, f"{where}: region_links[{k}]", {r: r for r in regions})
            table[frozenset((a, b))] = fig
        if "same_region" in data:
            same = data["same_region"]
            if not isinstance(same, dict):
                raise ConfigError(f"{where}: same_region must be a mapping with latency_ms and bandwidth_gbit_s")
            table.update({frozenset((r,)): _figures(same, f"{where}: same_region") for r in regions})
        for i in range(n):
            for j in range(n):
                fig = table.get(frozenset((nodes[i].region, nodes[j].region)))
                if i != j and fig is not None:
                    lat[i, j], bw[i, j] = fig
    off = ~np.eye(n, dtype=bool)
    missing = np.argwhere(off & (np.isnan(lat) | np.isnan(bw)))
    if len(missing):
        i, j = missing[0]
        raise ConfigError(f"{where}: the link {nodes[i].name}-{nodes[j].name} is missing; add it "
                          f"(every pair of nodes needs latency_ms and bandwidth_gbit_s)")
    return Topology(str(data.get("name", Path(where).stem)), nodes, np.nan_to_num(lat), np.nan_to_num(bw, nan=np.inf))


def _list(value, where: str, key: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key} must be a list, got {type(value).__name__}")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not np.isfinite(value):  # NaN marks a missing link below, and nan_to_num would turn .inf into 1.8e308
        raise ConfigError(f"{where} must be finite, got {value!r}")
    return float(value)


def _figures(d: dict, where: str) -> tuple[float, float]:
    for key in ("latency_ms", "bandwidth_gbit_s"):
        if key not in d:
            raise ConfigError(f"{where}: missing {key}")
    lat = _number(d["latency_ms"], f"{where}: latency_ms")
    bw = _number(d["bandwidth_gbit_s"], f"{where}: bandwidth_gbit_s")
    if lat < 0:
        raise ConfigError(f"{where}: latency_ms is {lat}; it must be zero or positive")
    if bw <= 0:
        raise ConfigError(f"{where}: bandwidth_gbit_s is {bw}; it must be positive")
    return lat, bw


def _link(link, where: str, index: dict) -> tuple:
    if not isinstance(link, dict):
        raise ConfigError(f"{where} must be a mapping with a, b, latency_ms, bandwidth_gbit_s")
    check_keys(link, _LINK_KEYS, where, required={"a", "b", "latency_ms", "bandwidth_gbit_s"})
    # Node and region names are read as strings (`name: 1` is node "1"), so endpoints are too.
    a, b = str(link["a"]), str(link["b"])
    for end in (a, b):
        if end not in index:
            raise ConfigError(f"{where}: unknown endpoint {end!r}; known: {', '.join(map(str, index))}")
    if a == b:
        raise ConfigError(f"{where}: a link from {a!r} to itself; links join two different ends")
    return index[a], index[b], _figures(link, where), bool(link.get("directed", False))


def _nodes(raw, where: str) -> list[Node]:
    nodes = []
    for k, entry in enumerate(_list(raw, where, "nodes")):
        at = f"{where}: nodes[{k}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be a mapping with name, region and flops or s_per_sample_per_layer")
        check_keys(entry, _NODE_KEYS, at, required={"name"})
        if ("flops" in entry) == ("s_per_sample_per_layer" in entry):
            raise ConfigError(f"{at}: give exactly one of flops (effective FLOP/s) or s_per_sample_per_layer")
        if "flops" in entry:
            flops = _number(entry["flops"], f"{at}: flops")
        else:
            seconds = _number(entry["s_per_sample_per_layer"], f"{at}: s_per_sample_per_layer")
            if seconds <= 0:
                raise ConfigError(f"{at}: s_per_sample_per_layer must be positive, got {seconds}")
            flops = reference_layer_flops() / seconds
        memory = entry.get("memory_gb")
        if memory is not None and _number(memory, f"{at}: memory_gb") <= 0:
            raise ConfigError(f"{at}: memory_gb must be positive, got {memory}")
        nodes.append(Node(k, str(entry["name"]), str(entry.get("region", entry["name"])), flops, memory))
    return nodes


def _matrix(raw, n: int, where: str, key: str) -> np.ndarray:
    try:
        m = np.asarray(raw, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be an {n}x{n} matrix of numbers") from None
    if m.shape != (n, n):
        raise ConfigError(f"{where}: {key} must be {n}x{n} (one row per node), got shape {m.shape}")
    return m
