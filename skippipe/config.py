"""The training configuration: typed dataclasses, defaults < YAML < dotted overrides.

    cfg = load_config("configs/train/debug.yaml", ["optim.lr=3e-4", "train.steps=100"])

Unknown keys and values of the wrong type are errors that name the key. The resolved config is saved
beside the run (``save_config``) and loads back unchanged (``load_config`` of that file).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from topology import resources
from topology.errors import ConfigError
from topology.yamlio import read_yaml

SHALLOW_SETS = ("solver", "drawn", "even", "even_drawn")  # schedule.shallow_sets: where the shallow iterations' paths come from


@dataclass
class ReplanConfig:
    """Re-planning while training (skippipe/replan.py): when the iteration runs `threshold` over its
    reference for `patience` consecutive steps, re-estimate the network from the action timelines and
    re-solve with the node-to-stage placement fixed. Off by default: the plan stays as solved."""
    enabled: bool = False
    threshold: float = 0.2  # drift: measured iteration / reference - 1
    patience: int = 3  # consecutive drifting steps that trigger a re-plan
    # Steps after a plan takes force whose median measured iteration is the reference (the first step of
    # a run, which includes start-up, is not one of them).
    warmup: int = 2
    window: int = 4  # steps of timelines the re-estimate uses (the newest ones)
    max_replans: int = 3  # re-plans per run at most: a network that keeps changing is the elastic path's job


@dataclass
class ScheduleConfig:
    """What the scheduler needs to make a plan (ignored when `plan` names a plan file)."""
    topology: str = "single-cluster"  # a named scenario or a topology YAML
    num_nodes: int = 8  # nodes of a named scenario; must equal the world size under torchrun
    num_stages: int = 4
    stage_sizes: list[int] | None = None  # nodes per stage; None: as even as possible
    strategy: str = "skippipe"  # the solver strategy; "full" is the ordinary full pipeline
    skip_ratio: float = 0.0
    microbatch_size: int = 4  # sequences per microbatch
    num_microbatches: int = 8  # microbatches per iteration, over all data nodes
    # TC1: microbatches' activations a node may hold at once, or "auto": derived from each node's memory,
    # the stage's parameters and optimizer state, precision and checkpointing (topology/memory.py)
    memory: int | str = 3
    max_swaps: int = 2  # CC3
    plan: str | None = None  # use this plan.json instead of solving
    replan: ReplanConfig = field(default_factory=ReplanConfig)
    # Full-depth work mixed into a skipping plan (scheduler/depth.py; README, "Inference with stages
    # omitted"): this fraction of each iteration's microbatches visits every stage, in order.
    full_fraction: float = 0.0
    # One iteration in full_every runs every microbatch at full depth (0: never); single-process only.
    full_every: int = 0
    # The last full_tail of the learning-rate schedule's steps (optim.decay_steps or train.steps) run at
    # full depth: a full-depth cooldown, so the model ends trained at the depth it will mostly be served
    # at (0: none); single-process only.
    full_tail: float = 0.0
    # Up to this many plans of the same placement and (within 2%) the same predicted iteration time, one
    # per iteration in turn: more distinct stage sets (scheduler/rotation.py; 1: the plan only);
    # single-process only.
    rotate: int = 1
    # One iteration in shallow_every runs the plan solved at skip ratio shallow_ratio with this placement
    # (scheduler.depth.shallow_depth; 0: never): deeper omissions in training; single-process only.
    shallow_every: int = 0
    shallow_ratio: float = 0.5
    # The shallow iterations' stage sets (skippipe/path_schedule.py; SHALLOW_SETS): "solver", the plan
    # solved at shallow_ratio; "drawn", fresh in-order sets each shallow step (strategy random-skip, seeded
    # by the step): every shallow set trained, at network-blind paths' cost; "even", every microbatch on
    # the evenly spaced stages an even omission keeps (scheduler.depth.even_depth); "even_drawn", the two
    # in turn (even on the first shallow step, drawn on the next, ...).
    shallow_sets: str = "solver"
    # On the plan's own steps, about this fraction of the microbatches moves one stage visit to another
    # microbatch (scheduler.depth.spread_depth, drawn fresh each step): depths one either side of the
    # plan's path length, as LayerDrop's spread around their mean, every stage's visits kept (0: off);
    # single-process only.
    depth_spread: float = 0.0
    # On those steps, first about this fraction of the microbatches (those whose paths hold the set in
    # order) give their other stages away, one visit to each of as many microbatches, and run only the
    # evenly spaced stages of schedule.shallow_ratio's depth that an even omission keeps: the half-depth
    # model is trained inside every step, beside the deeper paths (scheduler.depth.spread_depth; 0: off);
    # single-process only.
    spread_even: float = 0.0
    # LayerDrop instead of the plan's paths (single-process only): each microbatch keeps stage 0 and each
    # other stage with the probability that gives the expected depth of this skip ratio, natural order.
    layerdrop: float = 0.0


@dataclass
class DataConfig:
    corpus: str = "builtin"  # 'builtin', a .txt/.jsonl file or directory, or hf:<name>[:split[:field]]
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    context: int | None = None  # tokens per sequence; None: the model's context


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine decays to this
    warmup_steps: int = 10
    # Steps of the cosine; None: train.steps. Set it when a run may be stopped and resumed with another
    # --steps, so that the learning rate of a step does not depend on when the run was planned to end.
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 turns it off


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    run_dir: str = "runs/default"
    single_process: bool = False  # path-faithful mode: the whole model on one device
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda
    # CPU threads per process; 0: torch's default. Tiny models run faster on one thread, and many
    # threads per process on a busy or shared CPU can slow a step down tenfold.
    num_threads: int = 0
    comm_timeout_s: float = 300.0  # a peer silent for this long ends the run with an error
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the last step
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: save only at the last step
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on CUDA, fp32 on CPU); Note [mixed precision]
    activation_checkpointing: str = "none"  # none | layer: keep each layer's input, recompute in backward
    peak_tflops: float | None = None  # the device's peak for MFU; None: known GPUs by name, none on CPU
    # Start from these weights (a run dir from scripts/import_hf.py or training, or a Hugging Face
    # LlamaForCausalLM folder) instead of the seeded init; ignored when resuming.
    init_from: str | None = None
    nonfinite: str = "stop"  # a NaN/infinite loss or gradient norm: stop the run, or skip the step's update


@dataclass
class Config:
    model: str = "llama-tiny"  # a name in configs/models/ or a model YAML path
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        s, o, t = self.schedule, self.optim, self.train
        positive = {"schedule.num_nodes": s.num_nodes, "schedule.num_stages": s.num_stages,
                    "schedule.microbatch_size": s.microbatch_size, "schedule.num_microbatches": s.num_microbatches,
                    "train.steps": t.steps, "train.log_every": t.log_every,
                    "train.comm_timeout_s": t.comm_timeout_s, "optim.lr": o.lr}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        for key, value in {"optim.warmup_steps": o.warmup_steps, "optim.min_lr": o.min_lr,
                           "optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip,
                           "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
                           "train.checkpoint_every": t.checkpoint_every, "train.num_threads": t.num_threads}.items():
            if value < 0:
                raise ConfigError(f"{key} must not be negative, got {value}")
        r = s.replan
        if not r.threshold > 0 or r.patience < 1 or r.warmup < 1 or r.window < 1 or r.max_replans < 0:
            raise ConfigError(f"schedule.replan needs threshold > 0, patience, warmup and window >= 1 and "
                              f"max_replans >= 0; got {r}")
        if s.memory != "auto" and (not isinstance(s.memory, int) or s.memory <= 0):
            raise ConfigError(f"schedule.memory must be a positive integer or auto, got {s.memory!r}")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
        if t.activation_checkpointing not in ("none", "layer"):
            raise ConfigError(f"train.activation_checkpointing must be none or layer, got {t.activation_checkpointing!r}")
        if t.peak_tflops is not None and t.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops must be positive or null, got {t.peak_tflops}")
        if not 0 <= s.skip_ratio < 1:
            raise ConfigError(f"schedule.skip_ratio must be in [0, 1), got {s.skip_ratio}; e.g. --skip-ratio 0.25")
        if not 0 <= s.full_fraction <= 1:
            raise ConfigError(f"schedule.full_fraction must be in [0, 1], got {s.full_fraction}; e.g. 0.125")
        if s.rotate < 1:
            raise ConfigError(f"schedule.rotate must be a positive integer, got {s.rotate!r}; 1 turns it off, e.g. 8")
        if s.full_every < 0:
            raise ConfigError(f"schedule.full_every must not be negative, got {s.full_every}; 0 turns it off")
        if not 0 <= s.full_tail < 1:
            raise ConfigError(f"schedule.full_tail must be in [0, 1), got {s.full_tail}; 0 turns it off, e.g. 0.1")
        if s.shallow_every < 0:
            raise ConfigError(f"schedule.shallow_every must not be negative, got {s.shallow_every}; 0 turns it off")
        if s.shallow_every and not s.skip_ratio < s.shallow_ratio < 1:
            raise ConfigError(f"schedule.shallow_ratio must be above schedule.skip_ratio ({s.skip_ratio}) and below 1, "
                              f"got {s.shallow_ratio}; e.g. 0.5")
        if s.shallow_sets not in SHALLOW_SETS:
            raise ConfigError(f"schedule.shallow_sets must be one of {', '.join(SHALLOW_SETS)}, got {s.shallow_sets!r}")
        if s.shallow_sets != "solver" and not s.shallow_every:
            raise ConfigError(f"schedule.shallow_sets={s.shallow_sets} chooses the shallow iterations' stage sets: set "
                              "schedule.shallow_every too, e.g. 4")
        if not 0 <= s.depth_spread <= 1:
            raise ConfigError(f"schedule.depth_spread must be in [0, 1], got {s.depth_spread}; 0 turns it off, e.g. 1.0")
        if not 0 <= s.spread_even <= 0.5:
            raise ConfigError(f"schedule.spread_even must be in [0, 0.5], got {s.spread_even}; 0 turns it off, e.g. 0.125")
        if s.spread_even and not s.skip_ratio < s.shallow_ratio < 1:
            raise ConfigError(f"schedule.spread_even trains the even stages of schedule.shallow_ratio's depth: "
                              f"shallow_ratio must be above schedule.skip_ratio ({s.skip_ratio}) and below 1, "
                              f"got {s.shallow_ratio}; e.g. 0.5")
        for key in ("depth_spread", "spread_even"):
            if getattr(s, key) and not s.skip_ratio:
                raise ConfigError(f"schedule.{key} spreads the depths of a skipping plan's paths: set "
                                  f"schedule.skip_ratio above 0, or {key} to 0")
        if not 0 <= s.layerdrop < 1:
            raise ConfigError(f"schedule.layerdrop must be in [0, 1), got {s.layerdrop}; e.g. 0.33 (a skip ratio)")
        if s.layerdrop and (s.skip_ratio or s.full_fraction or s.full_every or s.full_tail or s.rotate > 1
                            or s.shallow_every or s.depth_spread or s.spread_even):
            raise ConfigError("schedule.layerdrop replaces the plan's paths: train it on a full pipeline "
                              "(skip_ratio 0, full_fraction 0, full_every 0, full_tail 0, rotate 1, shallow_every 0, "
                              "depth_spread 0, spread_even 0)")
        if t.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite must be stop or skip, got {t.nonfinite!r}")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
        if o.decay_steps is not None and o.decay_steps <= 0:
            raise ConfigError(f"optim.decay_steps must be positive or null, got {o.decay_steps}")
        if s.stage_sizes is not None and (len(s.stage_sizes) != s.num_stages or sum(s.stage_sizes) != s.num_nodes):
            raise ConfigError(f"schedule.stage_sizes {s.stage_sizes} must have num_stages={s.num_stages} entries "
                              f"summing to num_nodes={s.num_nodes}; fix one of them")
        return self


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check (and, for strings from the command line, convert) one value against its annotated type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        kinds = [a for a in args if a is not type(None)]
        for alternative in kinds[:-1]:  # int | str: a number when it reads as one, else the string
            try:
                return _coerce(value, alternative, key)
            except ConfigError:
                pass
        return _coerce(value, kinds[-1], key)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}; e.g. {key}=2,2,2,2")
        return [_coerce(v, args[0], key) for v in value]
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
        elif kind is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        elif kind is float and not isinstance(value, bool):
            number = float(value)  # YAML reads 3e-4 as a string; float() does not mind
            if math.isfinite(number):  # NaN passes every `<= 0` check; no setting here means infinity
                return number
        elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except (TypeError, ValueError):
        pass
    example = {int: "8", float: "0.001", bool: "true"}.get(kind)
    hint = f"; e.g. {key}={example}" if example else ""
    raise ConfigError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}{hint}")


def _merge(target: Any, data: dict, where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    fields = _fields(type(target))
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {name!r}; known keys here: {', '.join(prefix + f for f in fields)}")
        kind = fields[key]
        if dataclasses.is_dataclass(kind):
            _merge(getattr(target, key), value, where, f"{name}.")
        else:
            try:
                setattr(target, key, _coerce(value, kind, name))
            except ConfigError as exc:  # name the file (or override) the bad value came from
                raise ConfigError(f"{where}: {exc}") from None


def parse_override(text: str) -> dict:
    """'optim.lr=3e-4' -> {'optim': {'lr': '3e-4'}}; the value is typed later, against the field."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"bad override {text!r}; overrides look like optim.lr=3e-4")
    value = value.strip()
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    nested: Any = parsed if isinstance(parsed, (list, bool)) or parsed is None else value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < the YAML at `path` < dotted `overrides`; validated. Raises ConfigError on bad input.

    `path` is a file (relative to the current directory) or the name of a shipped config (``debug``,
    ``emulated``, ``omission``: topology/resources.py); None: the defaults alone.
    """
    cfg = Config()
    if path is not None:
        path = resources.resolve("config", path)
        _merge(cfg, read_yaml(path), str(path))
    for text in overrides:
        _merge(cfg, parse_override(text), f"override {text!r}")
    return cfg.validate()


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
