"""Export: transformers loads the folder offline, its logits match skippipe's, its tokenizer is the bytes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from skippipe.config import load_config
from skippipe.data import ByteTokenizer
from skippipe.evaluation.export import EXPORT_FILES, export_checkpoint
from skippipe.checkpoint import load_full_model
from skippipe.planning import make_plan
from skippipe.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Hello, wörld: naïve ☃ text\twith\nbytes"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real checkpoint: 1 single-process step of the debug config, tied embeddings to test that path too."""
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(ROOT / "configs/train/debug.yaml", [
        "schedule.strategy=full", "schedule.skip_ratio=0.0", "train.steps=1", "train.eval_batches=1",
        f"train.run_dir={run}", "train.single_process=true"])
    train(cfg, make_plan(cfg))
    return run


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_transformers_loads_the_export_and_matches_the_logits(run_dir, tmp_path):
    out = export_checkpoint(run_dir, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == set(EXPORT_FILES)  # the files the export command names
    model, _, _ = load_full_model(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ByteTokenizer().encode(TEXT)  # token id = UTF-8 byte
    assert tokenizer.decode(ids[0]) == TEXT
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-4, atol=1e-5)


def test_a_partial_export_computes_what_the_evaluator_measured(run_dir, tmp_path):
    model, _, _ = load_full_model(run_dir)
    out = export_checkpoint(run_dir, tmp_path / "half", stages=[0, 2])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    info = json.loads((out / "skippipe.json").read_text())
    kept_layers = model.stages[0].layer_indices + model.stages[2].layer_indices
    assert info["kept_layers"] == kept_layers and hf.config.num_hidden_layers == len(kept_layers)
    ids = torch.tensor([ByteTokenizer().encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model.forward_path(ids, [0, 2]), rtol=1e-4, atol=1e-5)


def test_export_cli_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from tests.test_omission import run_main
    code, err = run_main("export", ["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "o")],
                         monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "checkpoint not found" in err
    assert not os.path.exists(tmp_path / "o")
