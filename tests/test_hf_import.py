"""Pretrained weights in: randomly initialised transformers LlamaForCausalLM models (GQA, rope_theta
500000, tied and untied heads) imported, fine-tuned with skipping, exported (skippipe/hf_import.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from skippipe.config import load_config
from skippipe.data import load_corpus
from skippipe.evaluation.export import export_checkpoint
from skippipe.hf_import import import_hf
from skippipe.model import FullModel
from skippipe.checkpoint import load_full_model
from skippipe.planning import make_plan
from skippipe.trainer import data_streams, draw_batches, train
from topology.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _hf_model(folder: Path, tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(1 + tied)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a norm left out would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_reproduces_transformers_logits_and_fine_tunes_with_skipping(tied, tmp_path):
    hf = _hf_model(tmp_path / "hf", tied)
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # GQA
    run = import_hf(tmp_path / "hf", tmp_path / "init", num_stages=4)
    model, cfg, _ = load_full_model(run)
    assert model.spec.rope_theta == 500000.0 and model.spec.norm_eps == 1e-6 and model.spec.tie_embeddings == tied
    ids = torch.randint(300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - _hf_logits(hf, ids)).abs().max() <= 1e-5

    # Fine-tune two steps from the imported weights, with skipping, and check the first loss is the
    # imported model's on the same batches (full paths at step 1 of a 0-skip plan would say less).
    cfg = load_config(ROOT / "configs/train/debug.yaml", [
        f"model={run / 'model.yaml'}", f"train.init_from={run}", "schedule.skip_ratio=0.25", "train.steps=2",
        "train.eval_batches=1", f"train.run_dir={tmp_path / 'ft'}", "train.single_process=true"])
    plan = make_plan(cfg)
    records = train(cfg, plan)
    corpus = load_corpus("builtin", context=64, vocab_size=300)
    batches = draw_batches(plan, data_streams(plan, corpus, [n.id for n in plan.nodes], cfg.train.seed))
    with torch.no_grad():
        expected = sum(float(FullModel.loss(model.forward_path(batches[p.microbatch][0], p.stages),
                                            batches[p.microbatch][1])) for p in plan.paths) / len(plan.paths)
    assert any(len(p.stages) < 4 for p in plan.paths)  # the plan skips
    assert records[0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert records[1]["loss"] < records[0]["loss"] + 0.5  # trained on, finite

    out = export_checkpoint(tmp_path / "ft", tmp_path / "hf-ft")
    tuned, _, _ = load_full_model(tmp_path / "ft")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert (tuned(ids) - _hf_logits(exported, ids)).abs().max() <= 1e-5
        assert (tuned(ids) - model(ids)).abs().max() > 1e-3  # the weights did change


def test_init_from_a_hugging_face_folder_directly_and_from_another_cut(tmp_path):
    hf = _hf_model(tmp_path / "hf", False)
    run = import_hf(tmp_path / "hf", tmp_path / "init", num_stages=2)  # a 2-stage checkpoint ...
    from skippipe.hf_import import load_stage_weights
    from topology.model_spec import load_model_spec
    spec = load_model_spec(run / "model.yaml")
    for source in (run, tmp_path / "hf"):  # ... loads into a 4-stage cut, as does the HF folder
        model = FullModel(spec, 4, seed=5)
        load_stage_weights(source, dict(enumerate(model.stages)), spec)
        ids = torch.arange(40).view(2, 20)
        with torch.no_grad():
            assert (model(ids) - _hf_logits(hf, ids)).abs().max() <= 1e-5
    other = FullModel(load_model_spec("llama-tiny"), 4, seed=0)
    with pytest.raises(ConfigError, match="of other shapes"):
        load_stage_weights(run, dict(enumerate(other.stages)), load_model_spec("llama-tiny"))


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("attention_bias", True), ("mlp_bias", True),
    ("sliding_window", 32), ("architectures", ["MistralForCausalLM"]), ("hidden_act", "gelu"), ("head_dim", 32),
])
def test_unsupported_configs_are_refused_naming_the_field(field, value, tmp_path):
    _hf_model(tmp_path / "hf", False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field) as info:
        import_hf(tmp_path / "hf", tmp_path / "run", num_stages=2)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
