"""Named models, configs and topologies are found from any directory (topology/resources.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from skippipe.config import load_config
from topology import resources
from topology.errors import ConfigError
from topology.load import load_topology
from topology.model_spec import load_model_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The current directory is an empty folder outside the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_names_and_repository_paths_resolve_outside_the_checkout(elsewhere):
    assert load_model_spec("llama-500m").name == load_model_spec(ROOT / "configs/models/llama-500m.yaml").name
    assert load_model_spec("configs/models/llama-tiny.yaml").num_layers == 8
    assert load_config("debug").schedule.num_nodes == 8
    assert load_config("configs/train/debug.yaml").model == "llama-tiny"
    assert load_topology("emulated-8").num_nodes == 8
    assert load_topology("configs/topologies/emulated-8.yaml").num_nodes == 8
    assert load_model_spec("llama-1.5b").name == "llama-1.5b"  # a dot in the name is no file suffix
    assert {"llama-500m", "llama-tiny"} <= set(resources.names("model"))
    assert resources.names("config") == ["debug", "emulated", "omission", "real-shape"]


def test_a_file_where_the_user_stands_wins_over_a_shipped_name(elsewhere):
    (elsewhere / "configs" / "models").mkdir(parents=True)
    (elsewhere / "configs/models/llama-tiny.yaml").write_text(
        "name: mine\ndim: 32\nnum_layers: 2\nnum_heads: 2\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n")
    assert load_model_spec("configs/models/llama-tiny.yaml").name == "mine"
    assert load_model_spec("llama-tiny").name == "llama-tiny"  # a bare name is the shipped spec


def test_unknown_names_list_the_known_ones(elsewhere):
    with pytest.raises(ConfigError, match=r"model file not found: llama-5b; pass a path or one of: .*llama-500m"):
        load_model_spec("llama-5b")
    with pytest.raises(ConfigError, match=r"config file not found: debgu; pass a path or one of: debug, emulated"):
        load_config("debgu")
    with pytest.raises(ConfigError, match=r"unknown topology 'gcp'; .*emulated-8"):
        load_topology("gcp", 4)


def test_scripts_run_from_another_directory(elsewhere):
    """`python /path/to/scripts/evaluate.py --help` from elsewhere (the wrappers import their checkout)."""
    for script in ("train", "evaluate", "export"):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"], cwd=elsewhere,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "--checkpoint" in result.stdout or "--config" in result.stdout
