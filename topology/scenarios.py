"""Named scenarios built from the measured figures in topology/data/regions.yaml.

Each scenario is a function (num_nodes, seed) -> Topology. Nodes are spread over the scenario's regions
as the source describes: round-robin for gcp-12-regions, contiguous blocks for the DT-FM settings.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from topology.errors import ConfigError
from topology.network import Node, Topology, reference_layer_flops

DATA = Path(__file__).resolve().parent / "data" / "regions.yaml"

# DT-FM gives no compute figure; an effective 40 TFLOP/s is a V100/A10-class GPU at realistic utilisation.
DEFAULT_FLOPS = 40e12
# Effective FLOP/s of the GPU classes mixed in the `random` scenario.
GPU_CLASSES = {"H100": 300e12, "A100": 120e12, "V100": 40e12, "T4": 15e12}


@functools.lru_cache(maxsize=1)
def _figures() -> dict:
    return yaml.safe_load(DATA.read_text())


def _pair_table(links: list[dict]) -> dict[frozenset, tuple[float, float]]:
    return {frozenset((l["a"], l["b"])): (float(l["latency_ms"]), float(l["bandwidth_gbit_s"])) for l in links}


def _by_region(name: str, *, regions: list[str], same: tuple[float, float],
               pairs: dict[frozenset, tuple[float, float]], flops: list[float]) -> Topology:
    """Nodes in the given regions (one entry per node); links from the region-pair table."""
    n = len(regions)
    lat, bw = np.zeros((n, n)), np.full((n, n), np.inf)
    for i in range(n):
        for j in range(i + 1, n):
            fig = same if regions[i] == regions[j] else pairs[frozenset((regions[i], regions[j]))]
            lat[i, j] = lat[j, i] = fig[0]
            bw[i, j] = bw[j, i] = fig[1]
    counts: dict[str, int] = {}
    nodes = []
    for i, region in enumerate(regions):
        counts[region] = counts.get(region, 0) + 1
        nodes.append(Node(i, f"{region}-{counts[region] - 1}", region, flops[i]))
    return Topology(name, nodes, lat, bw)


def _blocks(names: list[str], num_nodes: int) -> list[str]:
    """Contiguous, nearly equal blocks of nodes per region (DT-FM: 'half in Ohio, half in Virginia')."""
    return [names[i * len(names) // num_nodes] for i in range(num_nodes)]


def gcp_12_regions(num_nodes: int, seed: int = 0) -> Topology:
    fig = _figures()["gcp-12-regions"]
    regions = [fig["regions"][i % len(fig["regions"])] for i in range(num_nodes)]
    flops = reference_layer_flops() / fig["compute_s_per_sample_per_layer"]
    same = (fig["same_region"]["latency_ms"], fig["same_region"]["bandwidth_gbit_s"])
    return _by_region("gcp-12-regions", regions=regions, same=same,
                      pairs=_pair_table(fig["links"]), flops=[flops] * num_nodes)


def aws_worldwide(num_nodes: int, seed: int = 0) -> Topology:
    fig = _figures()["aws-10-cities"]
    cities = ["Oregon", "Virginia", "Ohio", "Tokyo", "Seoul", "London", "Frankfurt", "Ireland"]
    return _by_region("aws-worldwide", regions=_blocks(cities, num_nodes), same=(5.0, 2.0),
                      pairs=_pair_table(fig["links"]), flops=[DEFAULT_FLOPS] * num_nodes)


def _instances(name: str, *, num_nodes: int, per_instance: int, num_instances: int | None,
               inside: tuple[float, float], between: tuple[float, float]) -> Topology:
    """GPUs grouped in instances (fast inside), standalone beyond num_instances * per_instance."""
    grouped = num_nodes if num_instances is None else min(num_nodes, num_instances * per_instance)
    regions = [f"instance{i // per_instance}" for i in range(grouped)]
    regions += [f"standalone{i}" for i in range(num_nodes - grouped)]
    pairs = {frozenset((a, b)): between for a in set(regions) for b in set(regions) if a != b}
    return _by_region(name, regions=regions, same=inside, pairs=pairs, flops=[DEFAULT_FLOPS] * num_nodes)


def datacenter(num_nodes: int, seed: int = 0) -> Topology:
    return _instances("datacenter", num_nodes=num_nodes, per_instance=8,
                      num_instances=None, inside=(0.0, 100.0), between=(0.0, 3.125))


def spot(num_nodes: int, seed: int = 0) -> Topology:
    return _instances("spot", num_nodes=num_nodes, per_instance=4,
                      num_instances=8, inside=(0.0, 100.0), between=(0.0, 1.25))


def multi_university(num_nodes: int, seed: int = 0) -> Topology:
    pairs = {frozenset(("Ohio", "Virginia")): (11.0, 1.12)}
    return _by_region("multi-university", regions=_blocks(["Ohio", "Virginia"], num_nodes), same=(1.0, 5.0),
                      pairs=pairs, flops=[DEFAULT_FLOPS] * num_nodes)


def regional(num_nodes: int, seed: int = 0) -> Topology:
    table = {("Virginia", "Oregon"): (67, 1.15), ("Virginia", "California"): (59, 1.05),
             ("Virginia", "Ohio"): (11, 1.12), ("Oregon", "California"): (12, 1.25),
             ("Oregon", "Ohio"): (49, 1.10), ("California", "Ohio"): (52, 1.02)}
    pairs = {frozenset(k): (float(v[0]), float(v[1])) for k, v in table.items()}
    regions = _blocks(["Virginia", "Oregon", "California", "Ohio"], num_nodes)
    return _by_region("regional", regions=regions, same=(5.0, 2.0), pairs=pairs, flops=[DEFAULT_FLOPS] * num_nodes)


def single_cluster(num_nodes: int, seed: int = 0) -> Topology:
    return _by_region("single-cluster", regions=["cluster"] * num_nodes, same=(0.01, 100.0),
                      pairs={}, flops=[DEFAULT_FLOPS] * num_nodes)


def random_topology(num_nodes: int, seed: int = 0) -> Topology:
    """Seeded heterogeneous network: 2-6 regions with uneven links, and a mix of GPU classes."""
    rng = np.random.default_rng(seed)
    num_regions = int(rng.integers(2, 7))
    names = [f"r{i}" for i in range(num_regions)]
    regions = [names[int(r)] for r in rng.integers(0, num_regions, num_nodes)]
    pairs = {}
    for i in range(num_regions):
        for j in range(i + 1, num_regions):
            pairs[frozenset((names[i], names[j]))] = (float(rng.uniform(5, 250)), float(10 ** rng.uniform(-1, 0.5)))
    classes = list(GPU_CLASSES.values())
    flops = [classes[int(k)] for k in rng.integers(0, len(classes), num_nodes)]
    return _by_region("random", regions=regions, same=(1.0, 10.0), pairs=pairs, flops=flops)


SCENARIOS: dict[str, Callable[[int, int], Topology]] = {
    "gcp-12-regions": gcp_12_regions,
    "aws-worldwide": aws_worldwide,
    "datacenter": datacenter,
    "spot": spot,
    "multi-university": multi_university,
    "regional": regional,
    "single-cluster": single_cluster,
    "random": random_topology,
}


def scenario(name: str, num_nodes: int, seed: int = 0) -> Topology:
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)} or pass a YAML path")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes <= 0:
        raise ConfigError(f"node count must be a positive integer, got {num_nodes!r}; pass e.g. --nodes 20")
    return SCENARIOS[name](num_nodes, seed)
