"""Checkpoints: per-stage weights and optimizer state, data positions, RNG state and the plan.

    RUN_DIR/checkpoints/step_000042/
        stage{s}.safetensors   weights of stage s (written by the stage's lowest rank: replicas are equal)
        stage{s}.optim.pt      AdamW state of stage s
        data{node}.pt          the token stream of data node `node` (its generator is its whole position)
        rng{rank}.pt           torch RNG state of each process
        plan.json, config.yaml, meta.json  (meta: step, stages, nodes, model spec, tokenizer identity)
    RUN_DIR/checkpoints/latest   the name of the newest complete checkpoint

Every file is written to a temporary name and renamed, and `latest` moves only after every rank has
written its files, so a crash at any moment leaves the previous checkpoint intact and pointed to. Loading
uses safetensors and torch.load(weights_only=True) only: nothing in a checkpoint can run code. The layout
does not depend on how stages are spread over processes: a single-process run and a distributed run of
the same plan read each other's checkpoints. Multi-machine runs need RUN_DIR on a shared filesystem.

This module is the one owner of the layout: the trainer, node loss (elastic.py: `derive_checkpoint`)
and the evaluator (`load_full_model`) name no file of a checkpoint themselves.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from skippipe.config import Config, load_config, save_config
from skippipe.finite import check_finite_weights
from skippipe.model import FullModel
from topology.errors import ConfigError
from topology.plan import Plan
from topology.yamlio import read_json

LATEST = "latest"


def _umask() -> int:
    """The process's file-creation mask, read without changing it (Linux: /proc; elsewhere a round trip)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary sibling, then rename it onto `path`: a kill never leaves half a file.

    The file gets the mode of any new file (0644 under the usual umask 022): safetensors creates its
    files 0600, which would hide checkpoints and exports from the other users of a shared machine.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(path)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_folder(run_dir: str | Path, step: int) -> Path:
    """The folder of `run_dir`'s checkpoint at `step`, whether or not it exists or is complete."""
    return checkpoint_root(run_dir) / f"step_{step:06d}"


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a complete checkpoint: meta.json is written last (save_checkpoint)."""
    return (folder / "meta.json").is_file()


def stage_weights_file(folder: Path, stage: int) -> Path:
    return folder / f"stage{stage}.safetensors"


def stage_optimizer_file(folder: Path, stage: int) -> Path:
    return folder / f"stage{stage}.optim.pt"


def data_file(folder: Path, node_id: int) -> Path:
    return folder / f"data{node_id}.pt"


def _point_latest(root: Path, folder: Path) -> None:
    atomic_write(root / LATEST, lambda tmp: tmp.write_text(folder.name + "\n"))


def save_checkpoint(run_dir: str | Path, *, step: int, stages: dict[int, torch.nn.Module], optimizers: dict,
                    streams: dict, plan: Plan, cfg: Config, rank: int = 0, write_stages: set[int] | None = None,
                    barrier: Callable[[], None] = lambda: None, identity: dict | None = None,
                    plan_version: int = 0) -> Path:
    """Every process calls this with what it holds (its stages, their optimizers, its data nodes' streams);
    `write_stages` limits the stage files it writes (None: all it holds); `barrier` waits for every process.
    `identity` (identity.checkpoint_identity: the model spec and tokenizer) goes into meta.json.
    `plan_version` (0: the run's first plan; +1 per re-plan while training) goes there too, beside the
    plan in force (plan.json). Returns the checkpoint folder."""
    root = checkpoint_root(run_dir)
    folder = step_folder(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        # Rewriting a step that exists (a fresh run in an old run dir, a redone step): from here until the
        # new meta.json the folder is a mix of old and new files, so it must not look complete. A kill in
        # between then leaves an "incomplete" error, never a silently mixed checkpoint.
        (folder / "meta.json").unlink(missing_ok=True)
    for stage in sorted(stages if write_stages is None else write_stages):
        # Clone: safetensors refuses tensors that share memory (a tied LM head and embedding).
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in stages[stage].state_dict().items()}
        atomic_write(stage_weights_file(folder, stage),
                lambda tmp: save_file(weights, str(tmp), metadata={"stage": str(stage), "step": str(step)}))
        atomic_write(stage_optimizer_file(folder, stage), lambda tmp: torch.save(optimizers[stage].state_dict(), tmp))
    for node_id, stream in streams.items():
        atomic_write(data_file(folder, node_id), lambda tmp: torch.save(stream.state_dict(), tmp))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    atomic_write(folder / f"rng{rank}.pt", lambda tmp: torch.save(rng, tmp))
    barrier()  # every rank's files are in place before the checkpoint is declared complete
    if rank == 0:
        plan.save(folder / "plan.json")
        save_config(cfg, folder / "config.yaml")
        meta = {"step": step, "num_stages": plan.num_stages, "num_nodes": len(plan.nodes),
                "plan_version": plan_version, **(identity or {})}
        atomic_write(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))
        _point_latest(root, folder)
    barrier()
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path:
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        raise ConfigError(f"no checkpoint to resume from in {root}; run without --resume, or pass the "
                          f"--run-dir of a run that saved one")
    name = pointer.read_text(errors="replace").strip()
    folder = root / name
    # A step_* folder beside `latest` (step_000042, or step_000042-replan1 after a node loss), nothing else.
    if not re.fullmatch(r"step_[\w.-]+", name) or ".." in name or not is_complete(folder):
        raise ConfigError(f"{pointer} names {name[:80]!r}, which is incomplete or not a checkpoint folder; "
                          f"point it at another step_* folder or start afresh")
    return folder


def checkpoint_meta(folder: Path) -> dict:
    """meta.json: step, num_stages, num_nodes, checked."""
    meta = read_json(folder / "meta.json")
    for key, least in (("step", 0), ("num_stages", 1)):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < least:
            raise ConfigError(f"{folder / 'meta.json'}: {key} must be an integer >= {least}, got "
                              f"{meta.get(key)!r}; the checkpoint is damaged")
    return meta


def checkpoint_step(folder: Path) -> int:
    return checkpoint_meta(folder)["step"]


def _damaged(path: Path, exc: BaseException, what: str) -> ConfigError:
    detail = " ".join(str(exc).split())
    detail = detail if len(detail) <= 240 else detail[:240] + "..."
    return ConfigError(f"{path}: {what} ({type(exc).__name__}: {detail}); the checkpoint is damaged or from "
                       f"another model or plan: resume from another step_* folder or start afresh")


def read_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file, or a one-line ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing; the checkpoint is incomplete or not for this plan's stages")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error type for every kind of bad file
        raise _damaged(path, exc, "not a readable safetensors file") from None


def load_weights(module: torch.nn.Module, path: Path, device: torch.device | str = "cpu") -> None:
    """Load a stage's safetensors file into `module`; wrong names or shapes are a one-line ConfigError."""
    weights = read_weights(path, device)
    check_finite_weights(weights, path)  # Note [non-finite steps]: never resume from or read such weights
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise _damaged(path, exc, "does not fit this model's stage") from None


def read_state(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load(weights_only=True): tensors and plain containers only; nothing in the file runs code."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing; the checkpoint is incomplete")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, a pickle of other objects, not a torch file at all
        raise _damaged(path, exc, "not a readable weights-only torch file") from None
    if not isinstance(state, dict):  # every state file of a checkpoint is a dict
        raise ConfigError(f"{path} holds a {type(state).__name__}, not the state dict a checkpoint saves; "
                          f"the checkpoint is damaged: resume from another step_* folder or start afresh")
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """load_state_dict checks the parameter counts; the moments' shapes only fail at the next step: check them."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"optimizer state {key} has shape {tuple(value.shape)} for a parameter of "
                                     f"shape {tuple(param.shape)}")


def _restore(path: Path, restore: Callable[[], None]) -> None:
    try:
        restore()
    except ConfigError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise _damaged(path, exc, "holds the wrong state") from None


def load_checkpoint(folder: Path, *, stages: dict[int, torch.nn.Module], optimizers: dict, streams: dict,
                    rank: int, device: torch.device) -> int:
    """Restore what this process holds; returns the step the checkpoint was taken after.

    Raises ConfigError (one line, naming the file) for a missing, damaged or foreign file."""
    step = checkpoint_step(folder)
    for stage, module in stages.items():
        load_weights(module, stage_weights_file(folder, stage), device)
        path = stage_optimizer_file(folder, stage)
        state = read_state(path, device)
        _restore(path, lambda: _load_optimizer(optimizers[stage], state))
    for node_id, stream in streams.items():
        # The generator state must stay on the CPU, whatever the device.
        path = data_file(folder, node_id)
        state = read_state(path, "cpu")
        _restore(path, lambda: stream.load_state_dict(state))
    rng_path = folder / f"rng{rank}.pt"
    if rng_path.is_file():  # absent when resuming with more processes than saved
        rng = read_state(rng_path, "cpu")

        def set_rng() -> None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        _restore(rng_path, set_rng)
    return step


# -- a whole model, for evaluation and export -------------------------------------------------------------

def checkpoint_folder(path: str | Path) -> Path:
    """A run dir (its newest checkpoint) or one checkpoints/step_* folder; ConfigError when neither."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}; pass the --run-dir of a training run "
                          "(or one of its checkpoints/step_* folders)")
    if is_complete(path):
        return path
    if not (checkpoint_root(path) / LATEST).is_file():
        raise ConfigError(f"{path} holds no checkpoint (no {checkpoint_root(path) / LATEST}); train with "
                          "--run-dir there first, or pass a checkpoints/step_* folder")
    return latest_checkpoint(path)


def load_full_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[FullModel, Config, Path]:
    """(model with every stage's trained weights, in eval mode; the run's resolved config; the checkpoint folder).

    `path`: a run dir or a checkpoints/step_* folder. Reads only the weight files, never the optimizer
    state: evaluation and export need neither the optimizer nor the data position. The model is built
    from the spec the checkpoint records (Note [self-describing checkpoints] in identity.py), and the
    run's tokenizer must still be the one it recorded. Raises ConfigError (one line) for a missing,
    damaged, foreign or non-finite checkpoint, or a changed tokenizer file.
    """
    from skippipe.data import load_tokenizer
    from skippipe.identity import check_tokenizer, recorded_spec
    folder = checkpoint_folder(path)
    cfg = load_config(folder / "config.yaml")
    meta = checkpoint_meta(folder)
    spec, fallback = recorded_spec(meta, folder, cfg.model)
    check_tokenizer(meta, load_tokenizer(cfg.data.tokenizer), folder)
    model = FullModel(spec, meta["num_stages"], cfg.train.seed)
    for stage_index, stage in enumerate(model.stages):
        # A missing, damaged, foreign or non-finite weights file is a one-line ConfigError naming it.
        load_weights(stage, stage_weights_file(folder, stage_index))
    if fallback:
        print(fallback, file=sys.stderr, flush=True)
    return model.to(device).eval(), cfg, folder


# -- a run branched off another run's checkpoint ---------------------------------------------------------

def fork_checkpoint(folder: Path, run_dir: str | Path) -> Path:
    """`folder` (a complete checkpoint of another run) as the newest checkpoint of `run_dir`; returns it.

    `--resume` in `run_dir` then continues the other run from that step: the same weights, optimizer
    state, data position and RNG, under the resuming command's own steps and optimizer settings (Note
    [fixed on resume] in rundir.py). The files are hard links (never written in place, so neither run can
    change the other's), meta.json last, then `latest`. The omission study branches its equal-wall-clock
    run off the full run after the warmup this way. `run_dir` must hold no run (rundir.fork_run checks).
    ConfigError for an incomplete or unreadable checkpoint.
    """
    checkpoint_meta(folder)  # complete and readable, or a one-line ConfigError
    root = checkpoint_root(run_dir)
    out = root / folder.name
    out.mkdir(parents=True)
    for path in sorted(folder.iterdir(), key=lambda p: p.name == "meta.json"):
        if path.is_file() and not path.name.startswith("."):
            _link(path, out / path.name)
    _point_latest(root, out)
    return out


# -- a checkpoint carried over to another plan (node loss: Note [node loss] in elastic.py) -----------------

def latest_token(run_dir: str | Path) -> list | None:
    """What `latest` names and when it last moved ([name, mtime_ns]); None without one. Tells whether a
    checkpoint was saved since the token was taken."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    return [pointer.read_text().strip(), pointer.stat().st_mtime_ns]


def data_files_by_shard(folder: Path, node_ids: list[int]) -> dict[int, Path]:
    """The data files of `node_ids` in `folder`, keyed by the shard index each stream reads."""
    out = {}
    for node in node_ids:
        path = data_file(folder, node)
        out[int(read_state(path, "cpu")["shard_index"])] = path
    return out


def _link(src: Path, dst: Path) -> None:
    """Hard link (checkpoint files are only ever replaced, never written in place), else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links
        import shutil
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


def derive_checkpoint(folder: Path, *, plan: Plan, data: dict[int, Path | dict], meta: dict) -> Path:
    """A complete checkpoint for `plan` beside `folder`, at the same step, made the `latest`; returns it.

    The folder is step_N-replanK (K: the first free number). Every stage's weights and optimizer state
    are `folder`'s (linked); `data` gives each of `plan`'s data nodes its stream: a data file (linked) or
    a state dict (saved). config.yaml and the model and tokenizer identity are `folder`'s; meta.json (step,
    num_stages, num_nodes, identity and `meta`) is written last, since a folder without it is incomplete.
    ConfigError when a stage file is missing.
    """
    old_meta = checkpoint_meta(folder)
    step = old_meta["step"]
    identity = {k: v for k, v in old_meta.items() if k in ("model", "tokenizer")}
    root = folder.parent
    base = f"step_{step:06d}"
    number = 1
    while (root / f"{base}-replan{number}").exists():
        number += 1
    out = root / f"{base}-replan{number}"
    out.mkdir()
    for stage in range(plan.num_stages):
        for name in (stage_weights_file, stage_optimizer_file):
            if not name(folder, stage).is_file():
                raise ConfigError(f"{name(folder, stage)} is missing; the checkpoint cannot be carried over")
            _link(name(folder, stage), name(out, stage))
    for node, source in data.items():
        if isinstance(source, Path):
            _link(source, data_file(out, node))
        else:
            torch.save(source, data_file(out, node))
    (out / "config.yaml").write_bytes((folder / "config.yaml").read_bytes())
    plan.save(out / "plan.json")
    full = {"step": step, "num_stages": plan.num_stages, "num_nodes": len(plan.nodes), **identity, **meta}
    (out / "meta.json").write_text(json.dumps(full))
    _point_latest(root, out)
    return out
