"""The GPU check (scripts/gpu_check.py): stage throughput, MFU and peak memory at real shapes, and
path-faithful training on the device against the CPU.

Part 1: one stage of 4 layers (a middle stage: no embedding or head) of each model shape, a microbatch of
8 x 1024 tokens, bf16, with and without activation checkpointing: forward + backward seconds (the best of
a few timed rounds after a warm-up), tokens/s, MFU against the device's peak (skippipe/flops.py: model
FLOPs exclude the recomputation) and the device's peak allocated memory in the round.
Part 2: 50 path-faithful single-process steps of configs/train/debug.yaml on the device and on the CPU,
fp32 both; every step's loss must agree within TOLERANCE (relative): the kernels differ, the maths not.
`tiny=True` swaps in llama-tiny and a few steps so the whole path runs in seconds on a CPU (tests).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from skippipe.flops import layer_flops_per_token, mfu, peak_tflops
from skippipe.memory_probe import probe_stage
from skippipe.precision import resolve_precision
from topology.model_spec import load_model_spec

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3  # relative, per step, fp32 device vs fp32 CPU over 50 steps
SHAPES = ("llama-500m", "llama-1.5b", "llama-8b")
STAGE_LAYERS = 4


def stage_throughput(model: str, *, device: torch.device, batch: int, seq_len: int, checkpointing: bool,
                     repeats: int, peak: float | None) -> dict:
    """Forward+backward of one `STAGE_LAYERS`-layer stage of `model` on (batch, seq_len) tokens, bf16."""
    spec = load_model_spec(model)
    num_stages = spec.num_layers // STAGE_LAYERS
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    probe = probe_stage(spec, stage_index=1, num_stages=num_stages, batch=batch, seq_len=seq_len, in_flight=1,
                        checkpointing=checkpointing, precision=resolve_precision("bf16", device), device=device,
                        repeats=repeats)
    seconds = probe["seconds_per_microbatch"]
    tokens = batch * seq_len
    flops = tokens * STAGE_LAYERS * layer_flops_per_token(spec, seq_len)
    out = {"model": model, "layers": STAGE_LAYERS, "parameters": probe["parameters"], "batch": batch,
           "seq_len": seq_len, "activation_checkpointing": "layer" if checkpointing else "none",
           "seconds_per_microbatch": seconds, "tokens_per_s": tokens / seconds, "model_tflops_per_s": flops / seconds / 1e12,
           "mfu": mfu(flops, seconds, peak), "activation_bytes": probe["activation_bytes"],
           "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    del probe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def debug_losses(device: str, steps: int, run_dir: Path) -> list[float]:
    """Path-faithful training of the debug config (skip ratio 0.25), fp32, on `device`."""
    from skippipe.config import load_config
    from skippipe.planning import make_plan
    from skippipe.trainer import train
    cfg = load_config(REPO / "configs/train/debug.yaml", [
        "schedule.skip_ratio=0.25", f"train.steps={steps}", "train.eval_batches=1", f"train.run_dir={run_dir}",
        "train.single_process=true", f"train.device={device}", "train.precision=fp32", "train.log_every=10"])
    return [r["loss"] for r in train(cfg, make_plan(cfg))]


def run_check(*, device: torch.device, out_dir: Path, tiny: bool = False) -> dict:
    """Both parts; returns the report (also the pass/fail of part 2 as `training.agree`)."""
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_tflops(name, "bf16")
    shapes, batch, seq_len, repeats, steps = ((("llama-tiny",), 8, 64, 2, 3) if tiny else (SHAPES, 8, 1024, 3, 50))
    report = {"device": name or str(device), "peak_tflops_bf16": peak, "stage_layers": STAGE_LAYERS, "stages": []}
    for model in shapes:
        for checkpointing in (False, True):
            row = stage_throughput(model, device=device, batch=batch, seq_len=seq_len, checkpointing=checkpointing,
                                   repeats=repeats, peak=peak)
            report["stages"].append(row)
            print(f"{model} stage ({STAGE_LAYERS} layers), {batch}x{seq_len} tokens, bf16, checkpointing "
                  f"{row['activation_checkpointing']}: {row['seconds_per_microbatch'] * 1e3:.1f} ms, "
                  f"{row['tokens_per_s']:,.0f} tok/s, MFU {'-' if row['mfu'] is None else format(row['mfu'], '.1%')}, "
                  f"peak memory {'-' if row['peak_memory_bytes'] is None else format(row['peak_memory_bytes'] / 2**30, '.2f')} GiB",
                  flush=True)
    on_device = debug_losses(str(device.type), steps, out_dir / "run-device")
    on_cpu = debug_losses("cpu", steps, out_dir / "run-cpu")
    worst = max(abs(a - b) / abs(b) for a, b in zip(on_device, on_cpu))
    report["training"] = {"steps": steps, "precision": "fp32", "tolerance_rel": TOLERANCE, "max_rel_diff": worst,
                          "agree": worst <= TOLERANCE, "losses_device": on_device, "losses_cpu": on_cpu}
    print(f"debug config, {steps} path-faithful steps: {device.type} vs cpu, max relative loss difference "
          f"{worst:.2e} (tolerance {TOLERANCE:g}): {'agree' if worst <= TOLERANCE else 'DISAGREE'}", flush=True)
    report["seconds"] = time.perf_counter() - started
    return report


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
