"""Who owns a run directory, and what a resumed run may change.

Note [run dir ownership]: a fresh run (no --resume) writes metrics.jsonl, config.yaml, plan.json,
checkpoints/, tensorboard/ and loss.png into its run dir. If the dir already holds any of them, another
run lives there, and starting afresh would cut its metrics, rewrite its checkpoints and move its `latest`
back: the start is refused with one line saying what the dir holds, unless the command says
--resume (continue it) or --overwrite (delete that run's files first, then start). Files that are not a
run's are never touched. An elastic restart of the same torchrun job (elastic.py, Note [node loss]) is the
same run and is not refused.

Note [fixed on resume]: a checkpoint fixes the model it holds, the plan it trains and the data position
it reached; the settings in FIXED_ON_RESUME decide those, so a resumed run whose command changes one would
train the checkpoint's value while reporting the new one. Each is refused with one line naming the
setting and both values. The settings in MAY_CHANGE_ON_RESUME only steer what happens from now on (how
long, how often to log, evaluate and checkpoint, timeouts, threads, the optimizer's hyper-parameters).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from skippipe.config import Config
from topology.errors import ConfigError

# What a run writes into its run dir (train.py, metrics.py, checkpoint.py).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "plan.json", "tensorboard", "loss.png",
             "replans")  # replans/: the plans and network estimates of re-planning while training (replan.py)

# Dotted config keys a resumed run must keep (Note [fixed on resume]); data.context and model are compared
# by what they resolve to (a context of null is the model's; a model by its full spec, not its name).
FIXED_ON_RESUME = ("model", "schedule.topology", "schedule.num_stages", "schedule.stage_sizes",
                   "schedule.strategy", "schedule.skip_ratio", "schedule.microbatch_size",
                   "schedule.num_microbatches", "schedule.memory", "schedule.max_swaps", "data.corpus",
                   "data.tokenizer", "data.val_fraction", "data.context", "train.seed",
                   # the full-depth remedies and LayerDrop decide which paths the steps train (path_schedule.py)
                   "schedule.full_fraction", "schedule.full_every", "schedule.full_tail", "schedule.layerdrop",
                   "schedule.rotate", "schedule.shallow_every", "schedule.shallow_ratio", "schedule.shallow_sets",
                   "schedule.depth_spread", "schedule.spread_even")
# precision, activation checkpointing and the MFU peak change how a step is computed or reported, not the
# fp32 master weights the checkpoint holds (precision.py); auto precision follows train.device, which may change.
MAY_CHANGE_ON_RESUME = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                        "train.checkpoint_every", "train.comm_timeout_s", "train.num_threads", "train.device",
                        "train.run_dir", "train.single_process", "train.nonfinite", "train.init_from", "optim.*",
                        "train.precision", "train.activation_checkpointing", "train.peak_tflops",
                        "schedule.num_nodes", "schedule.plan",  # init_from: ignored when resuming
                        # re-planning only decides later switches; the checkpoint's plan in force runs on
                        "schedule.replan")


def run_contents(run_dir: str | Path) -> str | None:
    """What a run dir holds, in words ('a run up to step 5'), or None when it holds no run's files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        step = name.removeprefix("step_").split("-")[0]
        return f"a run up to step {int(step)}" if step.isdigit() else f"a run (checkpoint {name[:40]!r})"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        steps = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
        return f"a run's metrics ({steps} step(s), no checkpoint)"
    return f"a run's files ({', '.join(present)})"


def claim_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, flag: str = "--run-dir") -> None:
    """Make `run_dir` this fresh run's, or refuse (Note [run dir ownership]).

    Resuming claims nothing (the checkpoint is read, then appended to). With `overwrite`, the previous
    run's files (RUN_FILES only) are deleted. Raises ConfigError (one line) when the dir holds a run and
    neither flag is given, or when both are.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the run dir and --overwrite deletes it; pass one of them")
    if resume:
        return
    held = run_contents(run_dir)
    if held is None:
        return
    if not overwrite:
        raise ConfigError(f"{flag} {run_dir} holds {held}; pass --resume to continue it, another {flag}, "
                          f"or --overwrite to replace it")
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def claim_output_dir(out_dir: str | Path, *, overwrite: bool, flag: str = "--out") -> None:
    """An output folder (an export, a report folder) must be empty or absent unless `overwrite`.

    Raises ConfigError naming the folder and what is in it. With `overwrite` nothing is deleted here: the
    command replaces the files it writes and leaves any other file alone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{flag} {out_dir} is a file; pass a directory")
    if overwrite or not out_dir.is_dir():
        return
    names = sorted(p.name for p in out_dir.iterdir())
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError(f"{flag} {out_dir} is not empty (it holds {shown}); pass an empty or new folder, "
                          f"or --overwrite to replace the files this command writes")


def setting_value(cfg: Config, key: str):
    """The value of dotted `key` (``schedule.replan.enabled``) in `cfg`; AttributeError for an unknown key."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_resume_settings(saved: Config, cfg: Config, *, saved_context: int, context: int, where: Path) -> None:
    """Refuse a resumed run whose command changes a setting the checkpoint fixes (Note [fixed on resume]).

    `saved_context` and `context`: tokens per sequence each resolves to. The model is compared by spec
    elsewhere (checkpoint_spec.check_model), so the model's name or path may change. Raises ConfigError
    naming the setting, the checkpoint's value, the command's value and what to do.
    """
    for key in FIXED_ON_RESUME:
        if key == "model":
            continue
        old, new = ((saved_context, context) if key == "data.context"
                    else (setting_value(saved, key), setting_value(cfg, key)))
        if old != new:
            raise ConfigError(f"{key} is {old!r} in the checkpoint {where} but {new!r} now; a resumed run keeps "
                              f"it: drop the change (or pass {key}={old}), or start a new run in another --run-dir")


def fork_run(source: str | Path, step: int, run_dir: str | Path) -> Path:
    """Start `run_dir` as a branch of the run in `source` at its checkpoint of `step`; returns the forked
    checkpoint.

    `run_dir` must hold no run. It gets the checkpoint (checkpoint.fork_checkpoint: hard links) and the
    source run's metrics records up to `step`, so that `--resume` there continues that run from the step,
    with the resuming command's own steps and optimizer settings, and its metrics read as one run from
    step 1. Raises ConfigError when `run_dir` holds a run or the checkpoint is missing or incomplete.
    """
    from skippipe.checkpoint import fork_checkpoint, step_folder
    from skippipe.metrics import read_metrics
    held = run_contents(run_dir)
    if held:
        raise ConfigError(f"{run_dir} holds {held}; fork into another run dir")
    forked = fork_checkpoint(step_folder(source, step), run_dir)
    records = [r for r in read_metrics(Path(source) / "metrics.jsonl") if r["step"] <= step]
    (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return forked
