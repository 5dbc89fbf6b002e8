"""Tier 1: the typed config (defaults < YAML < overrides) and the training script's one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skippipe.config import Config, load_config, parse_override, save_config
from tests.handplan import hand_plan
from topology.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "configs" / "train" / "debug.yaml"


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 5\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4  # override beats YAML
    assert cfg.optim.warmup_steps == 5 and cfg.train.steps == 7  # YAML beats defaults
    assert cfg.optim.beta2 == Config().optim.beta2  # defaults where nothing is said


@pytest.mark.parametrize("text, key, value", [
    ("optim.lr=3e-4", ("optim", "lr"), 3e-4),
    ("train.steps=12", ("train", "steps"), 12),
    ("schedule.stage_sizes=2,2,2,2", ("schedule", "stage_sizes"), [2, 2, 2, 2]),
    ("schedule.stage_sizes=[3,1,2,2]", ("schedule", "stage_sizes"), [3, 1, 2, 2]),
    ("optim.decay_steps=null", ("optim", "decay_steps"), None),
    ("train.single_process=true", ("train", "single_process"), True),
    ("model=llama-500m", ("model",), "llama-500m"),
    ("data.corpus=/tmp/x.txt", ("data", "corpus"), "/tmp/x.txt"),
])
def test_overrides_are_typed_by_the_field(text, key, value):
    cfg = load_config(None, [text])
    got = cfg
    for part in key:
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("optim:\n  lr_max: 1\n", [], "unknown key 'optim.lr_max'"),
    ("trian:\n  steps: 1\n", [], "unknown key 'trian'"),
    ("", ["optim.lrr=1"], "unknown key 'optim.lrr'"),
    ("", ["optim.lr"], "bad override"),
    ("", ["=3"], "bad override"),
    ("", ["optim.lr=fast"], "optim.lr: expected float, got 'fast'; e.g. optim.lr=0.001"),
    ("", ["train.steps=2.5"], "train.steps: expected int"),
    ("schedule:\n  num_nodes: eight\n", [], "c.yaml: schedule.num_nodes: expected int, got 'eight'"),
    ("", ["train.steps=many"], "override 'train.steps=many': train.steps: expected int"),
    ("", ["train.steps=0"], "train.steps must be positive"),
    ("", ["schedule.skip_ratio=1"], "skip_ratio must be in"),
    ("", ["schedule.stage_sizes=2,2"], "stage_sizes"),
    ("optim: 3\n", [], "must be a mapping"),
])
def test_bad_input_names_the_key(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text or "{}\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path, overrides)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEBUG, ["optim.lr=3e-4", "schedule.skip_ratio=0.25", "data.context=32"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert parse_override("a.b=1") == {"a": {"b": "1"}}


def test_debug_config_describes_eight_nodes_in_four_stages():
    cfg = load_config(DEBUG)
    assert cfg.schedule.num_nodes == 8 and cfg.schedule.stage_sizes == [2, 2, 2, 2] and cfg.model == "llama-tiny"


def _script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("case", ["missing config", "unknown key", "bad override", "no checkpoint",
                                  "plan for another world size", "not under torchrun"])
def test_script_bad_input_is_one_line_and_exit_2(tmp_path, case):
    plan = tmp_path / "plan.json"
    hand_plan("0 1 2", ["0@0 1@1 2@2"]).save(plan)
    torchrun_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    args, env, expected = {
        "missing config": (["--config", str(tmp_path / "nope.yaml")], None, "file not found"),
        "unknown key": (["--config", str(DEBUG), "optim.learning_rate=1"], None, "unknown key 'optim.learning_rate'"),
        "bad override": (["--config", str(DEBUG), "optim.lr"], None, "bad override"),
        "no checkpoint": (["--config", str(DEBUG), "--single-process", "--resume", "--run-dir", str(tmp_path / "r")],
                          None, "no checkpoint to resume from"),
        "plan for another world size": (["--plan", str(plan)], torchrun_env, "the plan has 3 nodes but 2 ranks"),
        "not under torchrun": (["--config", str(DEBUG)], None, "not launched by torchrun"),
    }[case]
    result = _script(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
