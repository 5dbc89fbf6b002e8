"""Model FLOPs, peaks and MFU (skippipe/flops.py), and how a run reports them."""
from __future__ import annotations

import json

import pytest

from skippipe.config import Config
from skippipe.flops import mfu, model_flops_per_token, node_flops, peak_tflops
from skippipe.metrics import format_line
from skippipe.trainer import train
from tests.handplan import hand_plan
from topology.model_spec import ModelSpec, load_model_spec


def test_flops_per_token_is_6n_plus_the_attention_term():
    spec = load_model_spec("llama-500m")
    n = spec.num_layers * spec.layer_params + spec.head_params  # the embedding table is a lookup, not a matmul
    assert model_flops_per_token(spec, 1024) == 6 * n + 12 * 24 * 16 * 64 * 1024
    assert 6 * 4.0e8 < model_flops_per_token(spec, 1024) < 6 * 6.0e8


def test_a_skipping_plan_counts_only_the_layers_each_microbatch_visits():
    spec = ModelSpec(name="t", dim=32, num_layers=4, num_heads=2, ffn_dim=64, context=16, vocab_size=64)
    full = hand_plan("0 1 2 3", ["0@0 1@1 2@2 3@3", "0@0 1@1 2@2 3@3"])
    skip = hand_plan("0 1 2 3", ["0@0 1@1 3@3", "0@0 2@2 3@3"])
    tokens = 1 * 16 * 2  # microbatch size 1, 16 tokens, two microbatches
    assert sum(node_flops(full, spec, 16).values()) == pytest.approx(tokens * model_flops_per_token(spec, 16))
    assert sum(node_flops(skip, spec, 16).values()) < sum(node_flops(full, spec, 16).values())
    assert node_flops(skip, spec, 16)[1] == node_flops(skip, spec, 16)[2] > 0


def test_known_gpus_have_a_peak_and_a_cpu_has_none():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.0 and peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops(None, "bf16") is None and peak_tflops("Some Future GPU", "bf16") is None
    assert peak_tflops(None, "fp32", override=2.5) == 2.5
    assert mfu(1e12, 1.0, None) is None
    assert mfu(989e12 / 2, 1.0, 989.0) == pytest.approx(0.5)


def test_a_cpu_run_logs_throughput_and_a_null_mfu_unless_given_a_peak(tmp_path):
    model = tmp_path / "tiny.yaml"
    model.write_text("name: f\ndim: 32\nnum_layers: 2\nnum_heads: 2\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n")
    records = {}
    for peak in (None, 0.01):
        cfg = Config(model=str(model))
        cfg.data.context, cfg.train.steps, cfg.train.eval_batches, cfg.train.num_threads = 16, 1, 1, 1
        cfg.train.run_dir, cfg.train.peak_tflops = str(tmp_path / f"run{peak}"), peak
        train(cfg, hand_plan("0 1", ["0@0 1@1", "0@0 1@1"]))
        records[peak] = json.loads((tmp_path / f"run{peak}" / "metrics.jsonl").read_text().splitlines()[0])
    plain, peaked = records[None], records[0.01]
    assert plain["mfu"] is None and plain["mfu_per_rank"] is None and "MFU" not in format_line(plain, 1)
    assert plain["model_flops_per_token"] > 0 and plain["tokens_per_s_per_rank"][0] > 0
    assert 0 < peaked["mfu"] < 1 and "MFU" in format_line(peaked, 1)
    # MFU = the step's model FLOPs over (iteration seconds x peak): 2 microbatches of 1 sequence of 16 tokens.
    assert peaked["mfu"] == pytest.approx(2 * 1 * 16 * peaked["model_flops_per_token"]
                                          / (peaked["iteration_s"] * 0.01e12), rel=1e-9)


def test_each_step_counts_the_flops_of_the_plan_it_ran(tmp_path):
    """A run whose plan varies by step (LayerDrop, path_schedule.py) logs each step's own model FLOPs,
    not those of the run's first plan."""
    from skippipe.path_schedule import plan_schedule
    model = tmp_path / "tiny.yaml"
    model.write_text("name: f\ndim: 32\nnum_layers: 4\nnum_heads: 2\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n")
    cfg = Config(model=str(model))
    cfg.data.context, cfg.train.steps, cfg.train.eval_batches, cfg.train.num_threads = 16, 6, 1, 1
    cfg.train.run_dir, cfg.train.peak_tflops, cfg.schedule.layerdrop = str(tmp_path / "run"), 0.01, 0.5
    cfg.schedule.num_stages = 4
    plan = hand_plan("0 1 2 3", ["0@0 1@1 2@2 3@3"] * 4)
    records = train(cfg, plan)
    schedule, spec = plan_schedule(cfg, plan), load_model_spec(str(model))
    expected = [sum(node_flops(schedule.plan_at(r["step"]), spec, 16).values()) for r in records]
    logged = [r["mfu"] * r["iteration_s"] * 0.01e12 for r in records]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert len(set(expected)) > 1  # the draws differ, so a count from the first plan alone would fail
