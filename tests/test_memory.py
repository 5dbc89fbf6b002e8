"""TC1 from memory (topology/memory.py) and the activation count it rests on."""
from __future__ import annotations

import pytest
import torch

from skippipe.model import Stage
from skippipe.precision import resolve_precision
from topology.errors import ConfigError
from topology.memory import auto_memory, layer_activation_bytes_per_token, stage_memory
from topology.model_spec import ModelSpec, load_model_spec

SPEC = ModelSpec(name="m", dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=160, context=32, vocab_size=64)


def saved_bytes(stage: Stage, precision: str, batch: int, seq: int) -> int:
    """Bytes of the distinct per-token tensors autograd saves in one forward (not weights or their bf16 casts:
    with batch x seq chosen prime to the weights' sizes, a per-token tensor is one whose size it divides)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.numel() % (batch * seq) == 0:
            storage = t.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t
    prec = resolve_precision(precision, "cpu")
    x = torch.randn(batch, seq, stage.spec.dim).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), prec.autocast():
        stage(prec.from_wire(x))
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_activation_count_matches_what_autograd_saves(precision):
    stage = Stage(SPEC, 1, 2, seed=0)
    batch, seq = 3, SPEC.context  # 96 tokens: divides no weight's size (64 x 64, 64 x 32, 64 x 160)
    measured = saved_bytes(stage, precision, batch, seq)
    counted = batch * seq * layer_activation_bytes_per_token(SPEC, precision)
    assert measured == pytest.approx(counted, rel=0.05)  # rsqrt and log-sum-exp rows are left out


def test_a_smaller_memory_gives_a_smaller_cap():
    spec = load_model_spec("llama-500m")
    args = dict(num_stages=6, microbatch_size=8, precision="bf16", checkpointing="none")
    small, _ = auto_memory(spec, node_memory_gb=[24.0] * 2, node_names=["a", "b"], **args)
    large, explanation = auto_memory(spec, node_memory_gb=[80.0] * 2, node_names=["a", "b"], **args)
    assert 1 <= small < large
    mixed, why = auto_memory(spec, node_memory_gb=[24.0, 80.0], node_names=["small", "big"], **args)
    assert mixed == small and why["binding"]["node"] == "small"
    assert [row["cap"] for row in why["nodes"]] == [small, large]


def test_checkpointing_and_bf16_raise_the_cap():
    spec = load_model_spec("llama-500m")
    caps = {(p, c): stage_memory(spec, stage=1, num_stages=6, microbatch_size=8, precision=p, checkpointing=c,
                                 memory_bytes=24e9)["cap"] for p in ("fp32", "bf16") for c in ("none", "layer")}
    assert caps[("bf16", "none")] > caps[("fp32", "none")]
    assert caps[("bf16", "layer")] > 3 * caps[("bf16", "none")]


def test_a_node_too_small_for_one_microbatch_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="cannot hold one microbatch of stage 0.*activation_checkpointing"):
        auto_memory(load_model_spec("llama-8b"), node_memory_gb=[24.0], node_names=["tiny-gpu"], num_stages=1,
                    microbatch_size=8, precision="bf16", checkpointing="none")


def test_the_runtime_plan_records_the_auto_cap_and_its_arithmetic():
    from skippipe.config import load_config
    from skippipe.planning import make_plan
    root = "configs/topologies/mixed-memory-6.yaml"
    cfg = load_config(None, ["model=llama-500m", f"schedule.topology={root}", "schedule.num_nodes=6",
                             "schedule.num_stages=6", "schedule.strategy=full", "schedule.microbatch_size=8",
                             "schedule.num_microbatches=6", "schedule.memory=auto", "train.precision=bf16"])
    plan = make_plan(cfg)
    expected, _ = auto_memory(load_model_spec("llama-500m"), node_memory_gb=[24.0] * 3 + [80.0] * 3,
                              node_names=["eu0", "eu1", "eu2", "us0", "us1", "us2"], num_stages=6,
                              microbatch_size=8, precision="bf16", checkpointing="none")
    assert plan.constraints["memory"] == expected
    why = plan.constraints["memory_auto"]
    assert why["binding"]["node"] == "eu0" and why["binding"]["cap"] == expected and why["precision"] == "bf16"
    fixed = make_plan(load_config(None, ["model=llama-500m", f"schedule.topology={root}", "schedule.num_nodes=6",
                                         "schedule.num_stages=6", "schedule.strategy=full", "schedule.memory=2"]))
    assert fixed.constraints["memory"] == 2 and "memory_auto" not in fixed.constraints
