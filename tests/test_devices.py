"""The same work on each device: path-faithful training and the omission evaluator agree with the CPU.

The CUDA cases carry the `gpu` marker and are skipped, with the reason, where no CUDA device is visible
(CI has none); the CPU cases run the very same code everywhere, so the test itself is always exercised.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skippipe.evaluation import omission
from skippipe.checkpoint import load_full_model
from skippipe.config import load_config
from skippipe.planning import make_plan
from skippipe.trainer import train

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible")])]


def run(run_dir: Path, device: str) -> list[float]:
    """Three single-process steps of the debug config with the solver's skipping plan."""
    cfg = load_config(ROOT / "configs/train/debug.yaml", [
        "schedule.skip_ratio=0.25", "train.steps=3", "train.eval_batches=1", f"train.run_dir={run_dir}",
        "train.single_process=true", f"train.device={device}"])
    return [r["loss"] for r in train(cfg, make_plan(cfg))]


@pytest.fixture(scope="module")
def on_cpu(tmp_path_factory) -> tuple[Path, list[float]]:
    run_dir = tmp_path_factory.mktemp("cpu") / "run"
    return run_dir, run(run_dir, "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_the_device_matches_the_cpu(device, on_cpu, tmp_path):
    _, cpu_losses = on_cpu
    losses = run(tmp_path / "run", device)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert losses == pytest.approx(cpu_losses, rel=1e-3)  # TF32 / kernel differences only


@pytest.mark.parametrize("device", DEVICES)
def test_omission_table_on_the_device_matches_the_cpu(device, on_cpu):
    run_dir, _ = on_cpu
    tables = {}
    for where in ("cpu", device):
        model, cfg, _ = load_full_model(run_dir, where)
        batches = omission.held_out_batches(cfg, model.spec, max_batches=2)
        tables[where] = omission.omission_table(model, batches, keeps=[1.0, 0.5], placements=["even"])
    assert [r["stages"] for r in tables[device]] == [[0, 1, 2, 3], [0, 2]]
    for cpu_row, row in zip(tables["cpu"], tables[device]):
        assert row["loss"] == pytest.approx(cpu_row["loss"], rel=1e-4)
