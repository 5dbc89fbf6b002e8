"""The cost model: compute per stage and node, activation and gradient bytes, ring all-reduce; model specs."""
import pytest

from topology.cost import CostModel, head_forward_flops, layer_forward_flops, ring_order
from topology.errors import ConfigError
from topology.load import topology_from_dict
from topology.model_spec import ModelSpec, load_model_spec, model_spec_from_dict, split_layers
from topology.scenarios import scenario

LLAMA_500M = load_model_spec("llama-500m")
TINY = load_model_spec("llama-tiny")


def three_nodes() -> dict:
    """a-b 1 Gbit/s 10 ms, b-c 2 Gbit/s 20 ms, a-c 0.5 Gbit/s 5 ms."""
    return {"nodes": [{"name": x, "flops": 1e13} for x in "abc"],
            "links": [{"a": "a", "b": "b", "latency_ms": 10, "bandwidth_gbit_s": 1.0},
                      {"a": "b", "b": "c", "latency_ms": 20, "bandwidth_gbit_s": 2.0},
                      {"a": "a", "b": "c", "latency_ms": 5, "bandwidth_gbit_s": 0.5}]}


@pytest.mark.parametrize("num_stages, microbatch_size, expected", [
    (24, 1, 0.055),      # one layer per stage: the measured 0.055 s per sample per layer
    (6, 1, 4 * 0.055),   # four layers per stage
    (6, 8, 8 * 4 * 0.055),
])
def test_llama_500m_forward_on_gcp_nodes_is_the_measured_figure(num_stages, microbatch_size, expected):
    cost = CostModel(scenario("gcp-12-regions", 3), LLAMA_500M, microbatch_size, num_stages)
    assert cost.forward_s.shape == (num_stages, 3)
    assert cost.forward_s == pytest.approx(expected, rel=1e-12)


def test_backward_is_twice_forward_unless_configured():
    cost = CostModel(scenario("gcp-12-regions", 2), LLAMA_500M, 2, 6)
    assert cost.backward_s(3, 1) == pytest.approx(2 * cost.forward_s[3, 1])
    slower = CostModel(scenario("gcp-12-regions", 2), LLAMA_500M, 2, 6, backward_factor=3.0)
    assert slower.backward_s(3, 1) == pytest.approx(3 * cost.forward_s[3, 1])


def test_layer_flops_count_matmuls_and_attention_scores():
    # llama-8b: grouped-query attention, K and V projections are dim x (8 heads x 128)
    m = load_model_spec("llama-8b")
    t, d, kv, f = 8192, 4096, 8 * 128, 14336
    assert layer_forward_flops(m) == 2 * t * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * t * t * d
    assert head_forward_flops(m) == 2 * t * d * 128256


def test_loss_step_is_head_forward_plus_backward():
    # vocab = 4d + 3f + 2t makes the head's forward FLOPs equal one layer's, so the loss step (forward +
    # 2x backward) costs three layer forwards.
    m = ModelSpec(name="paper", dim=64, num_layers=2, num_heads=4, ffn_dim=128, context=64, vocab_size=768)
    assert head_forward_flops(m) == layer_forward_flops(m)
    topo = topology_from_dict({"nodes": [{"name": "a", "flops": layer_forward_flops(m)}]})  # 1 s per layer
    cost = CostModel(topo, m, microbatch_size=2, num_stages=2)
    assert cost.forward_s[0, 0] == pytest.approx(2.0) and cost.loss_s[0] == pytest.approx(2 * 3.0)


def test_node_speed_scales_compute():
    topo = topology_from_dict({"nodes": [{"name": "slow", "flops": 1e13}, {"name": "fast", "flops": 4e13}],
                               "links": [{"a": "slow", "b": "fast", "latency_ms": 1, "bandwidth_gbit_s": 1}]})
    cost = CostModel(topo, TINY, 4, 2)
    assert cost.forward_s[1, 0] == pytest.approx(4 * cost.forward_s[1, 1])


@pytest.mark.parametrize("model, microbatch_size, expected", [
    ("llama-500m", 8, 8 * 1024 * 1024 * 2),  # microbatch x context x dim x bf16
    ("llama-tiny", 3, 3 * 64 * 64 * 2),
])
def test_activation_bytes(model, microbatch_size, expected):
    cost = CostModel(scenario("single-cluster", 2), load_model_spec(model), microbatch_size, 2)
    assert cost.activation_bytes == expected
    assert cost.hop_s(0, 1) == pytest.approx(0.01e-3 + expected * 8 / 100e9)


def test_gradient_bytes_per_stage():
    # llama-tiny: dim 64, 4 heads of 16, 2 KV heads (kv dim 32), ffn 176, vocab 256
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176 + 2 * 64
    assert TINY.layer_params == layer == 46208
    cost = CostModel(scenario("single-cluster", 2), TINY, 1, 2)
    assert cost.stage_params(1) == 4 * layer
    assert cost.stage_params(0) == 4 * layer + 256 * 64 + (64 + 256 * 64)  # + embedding, final norm, LM head
    assert cost.grad_bytes(1) == 2 * 4 * layer


def test_ring_allreduce_for_three_nodes_by_hand():
    topo = topology_from_dict(three_nodes())
    cost = CostModel(topo, TINY, 1, 2)
    assert ring_order(topo, [0, 1, 2]) == [0, 1, 2]  # a, then its best link (b), then c
    # ring a-b-c-a: slowest link a-c 0.5 Gbit/s, worst latency b-c 20 ms; k = 3
    grad = 2 * 4 * 46208
    expected = 2 * 2 / 3 * grad * 8 / 0.5e9 + 2 * 2 * 0.020
    assert cost.allreduce_s(1, [0, 1, 2]) == pytest.approx(expected, rel=1e-12)
    # two nodes: 2 (k-1)/k = 1 of the gradient over a-b, two latencies
    assert cost.allreduce_s(1, [0, 1]) == pytest.approx(grad * 8 / 1e9 + 2 * 0.010, rel=1e-12)
    assert cost.allreduce_s(1, [2]) == 0.0


@pytest.mark.parametrize("num_layers, num_stages, sizes", [
    (24, 6, [4] * 6),
    (10, 4, [3, 3, 2, 2]),
    (5, 5, [1] * 5),
    (7, 1, [7]),
])
def test_split_layers(num_layers, num_stages, sizes):
    ranges = split_layers(num_layers, num_stages)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(num_layers))  # consecutive, each layer once


def test_split_layers_refuses_more_stages_than_layers():
    with pytest.raises(ConfigError, match="at most 3 stages"):
        split_layers(3, 4)


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_microbatch_size_must_be_a_positive_integer(size):
    with pytest.raises(ConfigError, match="microbatch size must be a positive integer"):
        CostModel(scenario("single-cluster", 2), TINY, size, 2)


@pytest.mark.parametrize("name", ["llama-tiny", "llama-500m", "llama-1.5b", "llama-8b"])
def test_model_specs_load(name):
    spec = load_model_spec(name)
    assert spec.name == name and isinstance(spec.norm_eps, float)
    assert spec.dim % spec.num_heads == 0 and spec.num_heads % spec.num_kv_heads == 0


def test_llama_500m_shape():
    s = LLAMA_500M
    assert (s.dim, s.num_layers, s.num_heads, s.ffn_dim, s.context, s.vocab_size) == (1024, 24, 16, 4096, 1024, 32000)


@pytest.mark.parametrize("change, message", [
    ({"dim": 0}, "dim must be a positive integer"),
    ({"dim": 66}, "not divisible by num_heads"),
    ({"num_kv_heads": 3}, "not a multiple of num_kv_heads"),
    ({"dim": 48, "num_heads": 16}, "head dim 3 must be even"),
    ({"layers": 4}, "unknown key"),
])
def test_model_spec_validation(change, message):
    data = {**TINY.to_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        model_spec_from_dict(data)


def test_missing_model_file_lists_the_known_ones():
    with pytest.raises(ConfigError, match="model file not found: llama-9b; pass a path or one of: .*llama-500m"):
        load_model_spec("llama-9b")
