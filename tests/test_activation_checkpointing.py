"""Activation checkpointing (train.activation_checkpointing=layer): the same gradients, less memory kept."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from skippipe.config import Config
from skippipe.trainer import train
from tests.handplan import hand_plan

REPO = Path(__file__).resolve().parent.parent
TINY = "name: ckpt-tiny\ndim: 32\nnum_layers: 4\nnum_heads: 2\nnum_kv_heads: 1\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n"
# 2 nodes, 2 stages of 2 layers; both microbatches visit both stages.
PLAN = dict(stages="0 1", paths=["0@0 1@1", "0@0 1@1"],
            order={0: "F0@0 F1@0 L0@0 B0@0 L1@0 B1@0", 1: "F0@1 F1@1 B0@1 B1@1"})


def _gradients(tmp: Path, checkpointing: str, precision: str = "fp32") -> dict:
    model = tmp / "tiny.yaml"
    model.write_text(TINY)
    cfg = Config(model=str(model))
    cfg.data.context = 16
    cfg.train.steps, cfg.train.eval_batches, cfg.train.num_threads = 1, 1, 1
    cfg.train.run_dir = str(tmp / f"run-{checkpointing}-{precision}")
    cfg.train.activation_checkpointing, cfg.train.precision = checkpointing, precision
    grads: dict = {}

    def collect(step, stages):
        for s, module in stages.items():
            for name, p in module.named_parameters():
                grads[f"{s}.{name}"] = p.grad.detach().clone()
    train(cfg, hand_plan(**PLAN), on_gradients=collect)
    return grads


def test_checkpointing_gives_every_parameter_the_same_gradient(tmp_path):
    """fp32: max relative difference of every parameter's gradient <= 1e-6 (most are bit-identical)."""
    without, with_ = _gradients(tmp_path, "none"), _gradients(tmp_path, "layer")
    assert without.keys() == with_.keys() and len(without) > 10
    for key in without:
        a, b = without[key], with_[key]
        assert a.abs().max() > 0, key  # every parameter really got a gradient
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-6, key


def test_checkpointing_under_bf16_recomputes_in_bf16(tmp_path):
    """The recomputation runs under the forward's autocast state: gradients agree with bf16 without it."""
    without, with_ = _gradients(tmp_path, "none", "bf16"), _gradients(tmp_path, "layer", "bf16")
    for key in without:
        torch.testing.assert_close(with_[key], without[key], rtol=1e-5, atol=1e-7)


def test_memory_check_keeps_less_with_checkpointing(tmp_path):
    """scripts/memory_check.py end to end on a small stage: each mode in its own process, ratio reported."""
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "memory_check.py"), "--model", "llama-tiny",
                           "--stages", "2", "--batch", "4", "--seq-len", "64", "--out", str(out)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                               "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["activation_bytes_without_checkpointing"] > 0
    assert report["activation_bytes_with_checkpointing"] < report["activation_bytes_without_checkpointing"]
    assert report["ratio"] == report["activation_bytes_with_checkpointing"] / report["activation_bytes_without_checkpointing"]
