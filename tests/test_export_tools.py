"""Exports that the field's tools accept: BOS/EOS/pad declared and in the vocabulary, the BPE tokenizer
carried over, batched and padded inference (Note [declared special tokens] in skippipe/evaluation/export.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from skippipe.config import load_config
from skippipe.data import load_tokenizer
from skippipe.evaluation.export import export_checkpoint
from skippipe.checkpoint import load_full_model
from skippipe.shards import prepare, text_pieces
from skippipe.tokenizer import train_bpe
from skippipe.planning import make_plan
from skippipe.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["Hello, wörld: naïve ☃ text", "The with statement is used to wrap the execution of a block"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _train(run: Path, *overrides: str) -> Path:
    cfg = load_config(ROOT / "configs/train/debug.yaml", [
        "schedule.strategy=full", "schedule.skip_ratio=0.0", "train.steps=1", "train.eval_batches=1",
        f"train.run_dir={run}", "train.single_process=true", *overrides])
    train(cfg, make_plan(cfg))
    return run


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("byte") / "run")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """1 step of llama-tiny-4k on the built-in corpus prepared with a 1024-token BPE tokenizer."""
    root = tmp_path_factory.mktemp("bpe")
    train_bpe(text_pieces("builtin"), 1024).save(str(root / "tokenizer.json"))
    prepare("builtin", str(root / "tokenizer.json"), root / "data", context=64)
    return _train(root / "run", "model=llama-tiny-4k", f"data.corpus={root / 'data'}")


def _load(out: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)


@pytest.mark.parametrize("stages", [None, [0, 2]], ids=["full", "keep-half"])
@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_every_export_declares_bos_eos_pad_in_the_vocabulary(which, stages, byte_run, bpe_run, tmp_path):
    run = byte_run if which == "byte" else bpe_run
    out = export_checkpoint(run, tmp_path / "hf", stages)
    hf, tok = _load(out)
    vocab = hf.config.vocab_size
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tok, f"{role}_token_id")
        assert token_id is not None and 0 <= token_id < vocab, role
        assert getattr(hf.config, f"{role}_token_id") == token_id == getattr(hf.generation_config, f"{role}_token_id")
    assert tok.model_max_length == 64 == hf.config.max_position_embeddings
    if which == "bpe":
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    else:
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 0)


def test_the_bpe_export_encodes_like_skippipe_and_reproduces_its_logits(bpe_run, tmp_path):
    out = export_checkpoint(bpe_run, tmp_path / "hf")
    hf, tok = _load(out)
    model, cfg, _ = load_full_model(bpe_run)
    ours = load_tokenizer(cfg.data.tokenizer)
    assert ours.vocab_size == 1024 and json.loads((out / "skippipe.json").read_text())["tokenizer"] == cfg.data.tokenizer
    for text in TEXTS:
        ids = tok(text, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == ours.encode(text)
        assert tok.decode(ids[0]) == text
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_batched_padded_inference_and_a_generation_pipeline_work(which, byte_run, bpe_run, tmp_path):
    out = export_checkpoint(byte_run if which == "byte" else bpe_run, tmp_path / "hf")
    hf, tok = _load(out)
    tok.padding_side = "left"
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # the texts differ in length: padding was needed
    with torch.no_grad():
        logits = hf(**batch).logits
        for row, text in enumerate(TEXTS):
            alone = hf(**tok(text, return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[row, -len(alone):], alone, rtol=1e-4, atol=1e-4)
    generate = transformers.pipeline("text-generation", model=hf, tokenizer=tok, device="cpu")
    results = generate(TEXTS, batch_size=2, max_new_tokens=4, do_sample=False)
    assert [r[0]["generated_text"][:len(t)] for r, t in zip(results, TEXTS)] == TEXTS
