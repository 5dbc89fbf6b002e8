"""Checkpoints: per-stage weights and optimizer state, data positions, RNG state and the plan.

    RUN_DIR/checkpoints/step_000042/
        stage{s}.safetensors   weights of stage s (written by the stage's lowest rank: replicas are equal)
        stage{s}.optim.pt      AdamW state of stage s
        data{node}.pt          the token stream of data node `node` (its generator is its whole position)
        rng{rank}.pt           torch RNG state of each process
        plan.json, config.yaml, meta.json
    RUN_DIR/checkpoints/latest   the name of the newest complete checkpoint

Every file is written to a temporary name and renamed, and `latest` moves only after every rank has
written its files, so a crash at any moment leaves the previous checkpoint intact and pointed to. Loading
uses safetensors and torch.load(weights_only=True) only: nothing in a checkpoint can run code. The layout
does not depend on how stages are spread over processes: a single-process run and a distributed run of
the same plan read each other's checkpoints. Multi-machine runs need RUN_DIR on a shared filesystem.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scheduler.plan import Plan
from skippipe.config import Config, save_config
from topology.errors import ConfigError

LATEST = "latest"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, stages: dict[int, torch.nn.Module], optimizers: dict,
                    streams: dict, plan: Plan, cfg: Config, rank: int = 0, write_stages: set[int] | None = None,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Every process calls this with what it holds; `write_stages` limits the stage files it writes."""
    root = checkpoint_root(run_dir)
    folder = root / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for stage in sorted(stages if write_stages is None else write_stages):
        # Clone: safetensors refuses tensors that share memory (a tied LM head and embedding).
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in stages[stage].state_dict().items()}
        _atomic(folder / f"stage{stage}.safetensors",
                lambda tmp: save_file(weights, str(tmp), metadata={"stage": str(stage), "step": str(step)}))
        _atomic(folder / f"stage{stage}.optim.pt", lambda tmp: torch.save(optimizers[stage].state_dict(), tmp))
    for node_id, stream in streams.items():
        _atomic(folder / f"data{node_id}.pt", lambda tmp: torch.save(stream.state_dict(), tmp))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _atomic(folder / f"rng{rank}.pt", lambda tmp: torch.save(rng, tmp))
    barrier()  # every rank's files are in place before the checkpoint is declared complete
    if rank == 0:
        plan.save(folder / "plan.json")
        save_config(cfg, folder / "config.yaml")
        meta = {"step": step, "num_stages": plan.num_stages, "num_nodes": len(plan.nodes)}
        _atomic(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))
        _atomic(root / LATEST, lambda tmp: tmp.write_text(folder.name + "\n"))
    barrier()
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path:
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        raise ConfigError(f"no checkpoint to resume from in {root}; run without --resume, or pass the "
                          f"--run-dir of a run that saved one")
    folder = root / pointer.read_text().strip()
    if not (folder / "meta.json").is_file():
        raise ConfigError(f"{pointer} names {folder.name}, which is incomplete or missing; "
                          f"point it at another step_* folder or start afresh")
    return folder


def checkpoint_step(folder: Path) -> int:
    return int(json.loads((folder / "meta.json").read_text())["step"])


def load_checkpoint(folder: Path, stages: dict[int, torch.nn.Module], optimizers: dict, streams: dict,
                    rank: int, device: torch.device) -> int:
    """Restore what this process holds; returns the step the checkpoint was taken after."""
    for stage, module in stages.items():
        path = folder / f"stage{stage}.safetensors"
        if not path.is_file():
            raise ConfigError(f"{path} is missing; the checkpoint is not for this plan's stages")
        module.load_state_dict(load_file(str(path), device=str(device)))
        optimizers[stage].load_state_dict(
            torch.load(folder / f"stage{stage}.optim.pt", map_location=device, weights_only=True))
    for node_id, stream in streams.items():
        # The generator state must stay on the CPU, whatever the device.
        stream.load_state_dict(torch.load(folder / f"data{node_id}.pt", map_location="cpu", weights_only=True))
    rng_path = folder / f"rng{rank}.pt"
    if rng_path.is_file():  # absent when resuming with more processes than saved
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return checkpoint_step(folder)
