"""Topology: node and link validation, the YAML forms, every named scenario, fingerprint, subset."""
import numpy as np
import pytest
import yaml

from topology.errors import ConfigError
from topology.load import load_topology, topology_from_dict
from topology.network import Node, Topology, reference_layer_flops
from topology.scenarios import SCENARIOS, scenario
from topology.yamlio import load_yaml_text

GCP_ORDER = ["Australia", "Belgium", "Canada", "Germany", "Iowa", "Japan", "LA", "NL", "Oregon", "Singapore",
             "Taiwan", "London"]
GIB_S_IN_GBIT_S = 2**30 * 8 / 1e9  # 1 GiB/s = 8.589934592 Gbit/s


def from_yaml(text: str, **kw) -> Topology:
    return topology_from_dict(load_yaml_text(text), **kw)


def two_nodes(**link) -> dict:
    return {"nodes": [{"name": "a", "flops": 1e13}, {"name": "b", "flops": 1e13}],
            "links": [{"a": "a", "b": "b", "latency_ms": 10, "bandwidth_gbit_s": 1.0, **link}]}


# ---- nodes and links -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flops", [0.0, -1.0, float("nan"), float("inf")])
def test_node_needs_positive_finite_compute(flops):
    with pytest.raises(ConfigError, match="compute speed must be positive"):
        Node(0, "a", "r", flops)


def test_node_seconds_per_sample_per_layer_is_the_reference_layer_over_flops():
    assert Node(0, "a", "r", reference_layer_flops() / 0.055).s_per_sample_per_layer == pytest.approx(0.055, rel=1e-12)


def _matrices(lat_ab: float, bw_ab: float):
    return np.array([[0, lat_ab], [lat_ab, 0]], float), np.array([[0, bw_ab], [bw_ab, 0]], float)


@pytest.mark.parametrize("lat, bw, message", [
    (10, 0.0, "a-b has bandwidth 0.0"),
    (10, -1.0, "a-b has bandwidth -1.0"),
    (10, float("nan"), "positive bandwidth"),
    (10, float("inf"), "positive bandwidth"),
    (-1, 1.0, "a-b has latency -1.0"),
    (float("nan"), 1.0, "latency must be zero or positive"),
])
def test_topology_refuses_bad_links(lat, bw, message):
    nodes = [Node(0, "a", "r", 1e13), Node(1, "b", "r", 1e13)]
    with pytest.raises(ConfigError, match=message):
        Topology("t", nodes, *_matrices(lat, bw))


@pytest.mark.parametrize("nodes, message", [
    ([], "no nodes"),
    ([Node(1, "a", "r", 1e13), Node(0, "b", "r", 1e13)], "node ids must be 0..1"),
    ([Node(0, "a", "r", 1e13), Node(1, "a", "r", 1e13)], "duplicate node name"),
])
def test_topology_refuses_bad_nodes(nodes, message):
    n = len(nodes)
    with pytest.raises(ConfigError, match=message):
        Topology("t", nodes, np.zeros((n, n)), np.ones((n, n)))


def test_topology_refuses_wrong_matrix_shape():
    with pytest.raises(ConfigError, match="latency_ms must be 2x2, got 3x3"):
        Topology("t", [Node(0, "a", "r", 1e13), Node(1, "b", "r", 1e13)], np.zeros((3, 3)), np.ones((3, 3)))


def test_transfer_is_latency_plus_bytes_over_bandwidth():
    topo = topology_from_dict(two_nodes(latency_ms=10, bandwidth_gbit_s=0.8))
    # 10 ms + 1e6 bytes * 8 bit / 0.8e9 bit/s = 0.010 + 0.010
    assert topo.transfer_s(0, 1, 1e6) == pytest.approx(0.020)
    assert topo.transfer_s(1, 1, 1e6) == 0.0


# ---- YAML forms ------------------------------------------------------------------------------------------

def test_explicit_links_are_symmetric_by_default():
    topo = topology_from_dict(two_nodes(latency_ms=80, bandwidth_gbit_s=0.2))
    assert topo.latency_ms[0, 1] == topo.latency_ms[1, 0] == 80
    assert topo.bandwidth_gbit_s[0, 1] == topo.bandwidth_gbit_s[1, 0] == 0.2
    assert [n.name for n in topo.nodes] == ["a", "b"] and topo.nodes[0].region == "a"  # region defaults to name


def test_directed_links_give_each_direction_its_figures():
    topo = from_yaml("""
        nodes: [{name: a, flops: 1.0e13}, {name: b, flops: 1.0e13}]
        links:
          - {a: a, b: b, latency_ms: 5, bandwidth_gbit_s: 10, directed: true}
          - {a: b, b: a, latency_ms: 7, bandwidth_gbit_s: 0.5, directed: true}
    """)
    assert (topo.latency_ms[0, 1], topo.bandwidth_gbit_s[0, 1]) == (5, 10)
    assert (topo.latency_ms[1, 0], topo.bandwidth_gbit_s[1, 0]) == (7, 0.5)
    assert topo.graph().edges[0, 1] == {"latency_ms": 7.0, "bandwidth_gbit_s": 0.5}  # the slower direction


def test_one_directed_link_leaves_the_way_back_missing():
    with pytest.raises(ConfigError, match="link b-a is missing"):
        topology_from_dict(two_nodes(directed=True))


def test_region_links_and_same_region():
    topo = from_yaml("""
        name: two-sites
        nodes:
          - {name: eu0, region: eu, flops: 1.0e14}
          - {name: eu1, region: eu, s_per_sample_per_layer: 0.055}
          - {name: us0, region: us, flops: 2.0e14, memory_gb: 24}
        region_links: [{a: eu, b: us, latency_ms: 80, bandwidth_gbit_s: 0.2}]
        same_region: {latency_ms: 1, bandwidth_gbit_s: 10}
    """)
    assert topo.name == "two-sites" and topo.regions == ["eu", "us"]
    assert topo.latency_ms.tolist() == [[0, 1, 80], [1, 0, 80], [80, 80, 0]]
    assert topo.bandwidth_gbit_s[0, 1] == 10 and topo.bandwidth_gbit_s[0, 2] == topo.bandwidth_gbit_s[2, 1] == 0.2
    assert topo.nodes[0].flops == 1e14  # the 1.0e14 form reads as a number (YAML 1.2), not a string
    assert topo.nodes[1].s_per_sample_per_layer == pytest.approx(0.055)
    assert topo.nodes[2].memory_gb == 24


def test_region_links_without_same_region_miss_the_pairs_inside_a_region():
    with pytest.raises(ConfigError, match="link eu0-eu1 is missing"):
        from_yaml("""
            nodes: [{name: eu0, region: eu, flops: 1.0e13}, {name: eu1, region: eu, flops: 1.0e13}]
            region_links: []
        """)


@pytest.mark.parametrize("links", [
    "links: [{a: 1, b: 2, latency_ms: 3, bandwidth_gbit_s: 4}]",
    "region_links: [{a: 7, b: 8, latency_ms: 3, bandwidth_gbit_s: 4}]",
])
def test_numeric_names_match_their_links(links):
    topo = from_yaml("nodes: [{name: 1, region: 7, flops: 1.0e13}, {name: 2, region: 8, flops: 1.0e13}]\n" + links)
    assert [n.name for n in topo.nodes] == ["1", "2"] and topo.regions == ["7", "8"]
    assert (topo.latency_ms[0, 1], topo.bandwidth_gbit_s[1, 0]) == (3, 4)


def test_matrices():
    topo = from_yaml("""
        nodes: [{name: a, flops: 1.0e13}, {name: b, flops: 1.0e13}, {name: c, flops: 1.0e13}]
        latency_ms: [[0, 1, 2], [1, 0, 3], [2, 3, 0]]
        bandwidth_gbit_s: [[0, 5, 6], [5, 0, 7], [6, 7, 0]]
    """)
    assert topo.latency_ms[1, 2] == 3 and topo.bandwidth_gbit_s[2, 0] == 6
    assert np.isinf(np.diag(topo.bandwidth_gbit_s)).all()


def test_scenario_form_with_num_nodes_and_seed():
    topo = from_yaml("{scenario: random, num_nodes: 7, seed: 3}")
    assert topo.num_nodes == 7 and topo.fingerprint() == scenario("random", 7, seed=3).fingerprint()
    assert from_yaml("{scenario: gcp-12-regions}", num_nodes=5).num_nodes == 5  # count from --nodes


def test_to_dict_loads_back_to_the_same_topology():
    topo = scenario("random", 9, seed=1)
    again = topology_from_dict(topo.to_dict())
    assert again.fingerprint() == topo.fingerprint()


@pytest.mark.parametrize("data, message", [
    ({"nodes": [{"name": "a", "flops": 1e13}], "colour": "red"}, "unknown key"),
    ({"nodes": [{"name": "a", "flops": 1e13, "speed": 3}]}, r"nodes\[0\]: unknown key"),
    ({"nodes": [{"name": "a"}]}, "exactly one of flops"),
    ({"nodes": [{"name": "a", "flops": 1e13, "s_per_sample_per_layer": 0.05}]}, "exactly one of flops"),
    ({"nodes": [{"name": "a", "flops": "fast"}]}, "flops must be a number"),
    ({"nodes": [{"name": "a", "s_per_sample_per_layer": 0}]}, "must be positive"),
    ({"nodes": [{"name": "a", "flops": 1e13, "memory_gb": -4}]}, "memory_gb must be positive"),
    ({"nodes": "a, b"}, "nodes must be a list"),
    ({"scenario": "gcp-12-regions"}, "needs num_nodes"),
    ({"scenario": "nowhere", "num_nodes": 4}, "unknown scenario 'nowhere'"),
    ({"scenario": "gcp-12-regions", "num_nodes": 2.5}, "positive integer"),
    ({"scenario": "gcp-12-regions", "num_nodes": 0}, "positive integer"),
    ({**two_nodes(), "latency_ms": [[0, 1], [1, 0]]}, "exactly one of links"),
    ({"nodes": two_nodes()["nodes"], "latency_ms": [[0, 1], [1, 0]]}, "without a bandwidth_gbit_s"),
    ({"nodes": two_nodes()["nodes"], "latency_ms": [[0]], "bandwidth_gbit_s": [[0]]}, "must be 2x2"),
    (two_nodes(bandwidth_gbit_s=0), "bandwidth_gbit_s is 0.0; it must be positive"),
    (two_nodes(latency_ms=-3), "latency_ms is -3.0; it must be zero or positive"),
    (two_nodes(b="z"), "unknown endpoint 'z'"),
    (two_nodes(b="a"), "to itself"),
    ({"nodes": [{"name": "a", "flops": 1e13}, {"name": "b", "flops": 1e13}, {"name": "c", "flops": 1e13}],
      "links": two_nodes()["links"]}, "link a-c is missing"),
])
def test_yaml_form_errors_say_what_is_wrong(data, message):
    with pytest.raises(ConfigError, match=message):
        topology_from_dict(data)


def test_load_topology_from_file_and_name(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(two_nodes()))
    assert load_topology(path).num_nodes == 2
    assert load_topology(str(path), num_nodes=2).name == "net"
    with pytest.raises(ConfigError, match="has 2 nodes but --nodes says 3"):
        load_topology(path, num_nodes=3)
    with pytest.raises(ConfigError, match="needs a node count"):
        load_topology("gcp-12-regions")
    with pytest.raises(ConfigError, match="unknown topology 'gcp-13-regions'"):
        load_topology("gcp-13-regions", 4)
    with pytest.raises(ConfigError, match="file not found"):
        load_topology(tmp_path / "absent.yaml")


# ---- named scenarios -------------------------------------------------------------------------------------

def test_gcp_12_regions_round_robin_in_listed_order():
    topo = scenario("gcp-12-regions", 20)
    assert [n.region for n in topo.nodes] == [GCP_ORDER[i % 12] for i in range(20)]
    assert topo.nodes[12].name == "Australia-1"
    for node in topo.nodes:
        assert node.s_per_sample_per_layer == pytest.approx(0.055, rel=1e-12)


def test_gcp_12_regions_link_figures():
    topo = scenario("gcp-12-regions", 24)
    # nodes 0 and 12 are both in Australia: 1 ms, 2 GiB/s = 17.18 Gbit/s
    assert topo.latency_ms[0, 12] == 1.0
    assert topo.bandwidth_gbit_s[0, 12] == pytest.approx(2 * GIB_S_IN_GBIT_S, abs=0.005)
    # Australia (0) - Belgium (1): the measured pair
    assert topo.latency_ms[0, 1] == topo.latency_ms[1, 0] == 129
    assert topo.bandwidth_gbit_s[0, 1] == topo.bandwidth_gbit_s[1, 0] == 0.0844
    # NL (7) - London (11): the corrected pair (0.2368 GiB/s, not 1000x less)
    assert topo.bandwidth_gbit_s[7, 11] == pytest.approx(2.0342)


def test_aws_worldwide_is_eight_cities_in_blocks():
    topo = scenario("aws-worldwide", 64)
    cities = ["Oregon", "Virginia", "Ohio", "Tokyo", "Seoul", "London", "Frankfurt", "Ireland"]
    assert [n.region for n in topo.nodes] == [c for c in cities for _ in range(8)]
    assert (topo.latency_ms[0, 1], topo.bandwidth_gbit_s[0, 1]) == (5.0, 2.0)  # inside Oregon
    assert (topo.latency_ms[0, 8], topo.bandwidth_gbit_s[0, 8]) == (67, 0.79)  # Oregon - Virginia


@pytest.mark.parametrize("name, inside, between, group", [
    ("datacenter", (0.0, 100.0), (0.0, 3.125), 8),
    ("spot", (0.0, 100.0), (0.0, 1.25), 4),
])
def test_instance_scenarios(name, inside, between, group):
    topo = scenario(name, 64)
    assert (topo.latency_ms[0, 1], topo.bandwidth_gbit_s[0, 1]) == inside
    assert (topo.latency_ms[0, group], topo.bandwidth_gbit_s[0, group]) == between
    assert topo.nodes[0].region == topo.nodes[group - 1].region != topo.nodes[group].region


def test_spot_has_32_grouped_gpus_then_standalone_ones():
    topo = scenario("spot", 64)
    assert len({n.region for n in topo.nodes[:32]}) == 8
    assert [n.region for n in topo.nodes[32:]] == [f"standalone{i}" for i in range(32)]
    assert topo.bandwidth_gbit_s[32, 33] == 1.25


def test_multi_university_half_ohio_half_virginia():
    topo = scenario("multi-university", 10)
    assert [n.region for n in topo.nodes] == ["Ohio"] * 5 + ["Virginia"] * 5
    assert (topo.latency_ms[0, 1], topo.bandwidth_gbit_s[0, 1]) == (1.0, 5.0)
    assert (topo.latency_ms[0, 9], topo.bandwidth_gbit_s[0, 9]) == (11.0, 1.12)


def test_regional_four_us_regions():
    topo = scenario("regional", 8)
    assert topo.regions == ["Virginia", "Oregon", "California", "Ohio"]
    assert (topo.latency_ms[0, 1], topo.bandwidth_gbit_s[0, 1]) == (5.0, 2.0)
    assert (topo.latency_ms[2, 4], topo.bandwidth_gbit_s[2, 4]) == (12.0, 1.25)  # Oregon - California
    assert (topo.latency_ms[0, 6], topo.bandwidth_gbit_s[0, 6]) == (11.0, 1.12)  # Virginia - Ohio


def test_single_cluster_is_uniform():
    topo = scenario("single-cluster", 6)
    off = ~np.eye(6, dtype=bool)
    assert topo.regions == ["cluster"]
    assert set(topo.bandwidth_gbit_s[off]) == {100.0} and set(topo.latency_ms[off]) == {0.01}


def test_random_is_seeded_and_heterogeneous():
    a, b, c = scenario("random", 40, seed=5), scenario("random", 40, seed=5), scenario("random", 40, seed=6)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    off = ~np.eye(40, dtype=bool)
    assert len(a.regions) >= 2
    assert len(set(a.bandwidth_gbit_s[off].round(6))) > 2  # links of several speeds
    assert len({n.flops for n in a.nodes}) > 1  # a mix of GPU classes


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("num_nodes", [1, 2, 13])
def test_every_scenario_builds_a_valid_topology(name, num_nodes):
    topo = scenario(name, num_nodes)
    assert topo.num_nodes == num_nodes and topo.name == name
    assert len({n.name for n in topo.nodes}) == num_nodes
    assert (topo.latency_ms == topo.latency_ms.T).all() and (topo.bandwidth_gbit_s == topo.bandwidth_gbit_s.T).all()
    g = topo.graph()
    assert g.number_of_nodes() == num_nodes and g.number_of_edges() == num_nodes * (num_nodes - 1) // 2


@pytest.mark.parametrize("count", [0, -1, 2.0, "4", True, None])
def test_scenario_node_count_must_be_a_positive_integer(count):
    with pytest.raises(ConfigError, match="node count must be a positive integer"):
        scenario("gcp-12-regions", count)


# ---- fingerprint and subset ------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"latency_ms": 11}, {"bandwidth_gbit_s": 1.5},
])
def test_fingerprint_changes_when_a_link_changes(change):
    base = topology_from_dict(two_nodes())
    assert topology_from_dict(two_nodes()).fingerprint() == base.fingerprint()
    assert topology_from_dict(two_nodes(**change)).fingerprint() != base.fingerprint()


def test_fingerprint_changes_when_a_node_changes():
    data = two_nodes()
    data["nodes"][1]["flops"] = 2e13
    assert topology_from_dict(data).fingerprint() != topology_from_dict(two_nodes()).fingerprint()


def test_subset_renumbers_and_keeps_names_and_links():
    topo = scenario("gcp-12-regions", 6)
    sub = topo.subset([4, 1, 5])
    assert [n.id for n in sub.nodes] == [0, 1, 2]
    assert [n.name for n in sub.nodes] == ["Iowa-0", "Belgium-0", "Japan-0"]
    assert sub.latency_ms[0, 1] == topo.latency_ms[4, 1] and sub.bandwidth_gbit_s[2, 0] == topo.bandwidth_gbit_s[5, 4]
    assert np.isinf(np.diag(sub.bandwidth_gbit_s)).all()
    assert sub.fingerprint() != topo.fingerprint()
