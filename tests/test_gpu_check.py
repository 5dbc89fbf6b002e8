"""scripts/gpu_check.py: its refusal without CUDA, its code path on the CPU, and on CUDA (marker gpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def gpu_check(*args: str, env=ENV, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "r.json"
    done = gpu_check("--out", str(out), env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.startswith("error: no CUDA device is visible") and done.stderr.count("\n") == 1
    assert not out.exists()


def check_report(report: dict, device: str) -> None:
    assert len(report["stages"]) == 2  # llama-tiny, without and with activation checkpointing
    without, with_ = report["stages"]
    assert without["activation_checkpointing"] == "none" and with_["activation_checkpointing"] == "layer"
    for row in report["stages"]:
        assert row["seconds_per_microbatch"] > 0 and row["tokens_per_s"] > 0 and row["activation_bytes"] > 0
    assert with_["activation_bytes"] < without["activation_bytes"]
    training = report["training"]
    assert training["agree"] and len(training["losses_device"]) == len(training["losses_cpu"]) == 3
    if device == "cpu":
        assert report["peak_tflops_bf16"] is None and without["mfu"] is None and without["peak_memory_bytes"] is None
        assert training["losses_device"] == training["losses_cpu"]
    else:
        assert without["peak_memory_bytes"] > 0


def test_the_cpu_self_test_runs_the_whole_check(tmp_path):
    out = tmp_path / "r.json"
    done = gpu_check("--device", "cpu", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr
    check_report(json.loads(out.read_text()), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_the_cuda_path_on_a_gpu(tmp_path):
    out = tmp_path / "r.json"
    done = gpu_check("--device", "cuda", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_report(report, "cuda")
    if report["peak_tflops_bf16"] is not None:  # a known GPU: MFU is a fraction
        assert all(0 < row["mfu"] < 1 for row in report["stages"])
