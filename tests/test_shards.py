"""Prepared token files: the same tokens as the in-memory split, exact training and resume from them,
uint32 for large vocabularies, and damaged folders refused (skippipe/shards.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from skippipe.config import load_config
from skippipe.data import ByteTokenizer, builtin_text, load_corpus, split_tokens
from skippipe.metrics import read_metrics
from skippipe.shards import open_prepared, prepare, read_meta
from skippipe.planning import make_plan, plan_for_run
from skippipe.trainer import train
from topology.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "builtin-byte"
    prepare("builtin", "byte", out, context=64)
    return out


def test_prepared_files_hold_the_in_memory_split(prepared):
    meta = read_meta(prepared)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == {"name": "byte", "vocab_size": 256, "sha256": None}
    tokens = ByteTokenizer().encode_tensor(builtin_text())
    train, val = split_tokens(tokens, 64)
    mapped_train, mapped_val, _ = open_prepared(prepared, 64)
    assert torch.equal(mapped_train.long(), train.long()) and torch.equal(mapped_val.long(), val.long())
    assert meta["num_tokens"] == {"train": len(train), "val": len(val), "total": len(tokens)}
    assert np.fromfile(prepared / "train.bin", dtype=np.uint16).size == len(train)


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.txt").write_text(" ".join(f"w{69999 - i % 7}" for i in range(400)))
    prepare(tmp_path / "c.txt", str(tmp_path / "tokenizer.json"), tmp_path / "out", context=8)
    train, val, tok = open_prepared(tmp_path / "out", 8)
    assert read_meta(tmp_path / "out")["dtype"] == "uint32" and tok.vocab_size == 70000
    assert sorted(set(torch.cat([train, val]).tolist())) == list(range(69993, 70000))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def _run(run: Path, corpus: str, steps: int, resume: bool = False) -> list[float]:
    cfg = load_config(ROOT / "configs/train/debug.yaml", [
        "schedule.skip_ratio=0.25", f"train.steps={steps}", "train.eval_every=2", "train.eval_batches=2",
        "train.checkpoint_every=2", f"train.run_dir={run}", "train.single_process=true", f"data.corpus={corpus}"])
    return [r["loss"] for r in train(cfg, plan_for_run(cfg, resume) if resume else make_plan(cfg), resume=resume)]


def test_training_from_prepared_files_equals_in_memory_training_and_resumes_exactly(prepared, tmp_path):
    in_memory = _run(tmp_path / "memory", "builtin", 4)
    from_files = _run(tmp_path / "files", str(prepared), 4)
    assert from_files == in_memory  # bit for bit
    _run(tmp_path / "resumed", str(prepared), 2)
    resumed = _run(tmp_path / "resumed", str(prepared), 4, resume=True)
    assert resumed == from_files[2:]
    assert _losses(tmp_path / "resumed") == from_files
    assert [r["val_loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == \
        [r["val_loss"] for r in read_metrics(tmp_path / "files" / "metrics.jsonl")]


def test_each_data_node_maps_its_own_shard(prepared):
    corpus = load_corpus(prepared, context=64)
    shards = [corpus.stream(4, i, 2).shard for i in range(2)]
    assert isinstance(corpus.train.numpy(), np.ndarray)  # a view of the map, not a copy
    assert shards[0].data_ptr() == corpus.train.data_ptr()
    assert shards[1].data_ptr() == corpus.train.data_ptr() + len(shards[0]) * corpus.train.element_size()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "meta.json").unlink(), "no meta.json; not a prepared data folder"),
    (lambda d: _edit_meta(d, format_version=99), "format_version 99 but this skippipe reads version 1"),
    (lambda d: _edit_meta(d, format="other"), "not skippipe prepared data"),
    (lambda d: (d / "train.bin").write_bytes(b"\0" * 10), "train.bin holds 10 bytes but meta.json says"),
    (lambda d: (d / "val.bin").unlink(), "val.bin is missing"),
])
def test_damaged_prepared_folders_are_one_line_errors(prepared, tmp_path, damage, message):
    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder)
    damage(folder)
    with pytest.raises(ConfigError, match=message) as info:
        load_corpus(folder, context=64)
    assert "\n" not in str(info.value)


def _edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_prepare_never_overwrites_and_checks_the_context(prepared, tmp_path):
    before = (prepared / "meta.json").read_bytes()
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        prepare("builtin", "byte", prepared, context=64)
    assert (prepared / "meta.json").read_bytes() == before
    with pytest.raises(ConfigError, match="prepare it with --context 100000"):
        load_corpus(prepared, context=100000)
    with pytest.raises(ConfigError, match="prepared with the byte tokenizer"):
        load_corpus(prepared, context=64, tokenizer=str(tmp_path / "other.json"))


def test_a_saved_hugging_face_dataset_is_a_source(tmp_path):
    datasets = pytest.importorskip("datasets")  # an optional extra: pip install datasets
    texts = [f"document {i}: " + "some words here " * 20 for i in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    prepare(tmp_path / "saved", "byte", tmp_path / "out", context=16)
    train, val, _ = open_prepared(tmp_path / "out", 16)
    assert len(train) + len(val) == len("\n\n".join(texts).encode())
    assert read_meta(tmp_path / "out")["source"] == str(tmp_path / "saved")


def test_bpe_prepared_tokens_are_the_tokenizers_ids_of_each_piece(tmp_path):
    from skippipe.data import HFTokenizer
    from skippipe.shards import text_pieces
    from skippipe.tokenizer import train_bpe
    train_bpe(text_pieces("builtin"), 600).save(str(tmp_path / "tok.json"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("First document.\nWith lines  and  spaces.\n" * 300)
    (tmp_path / "docs" / "b.jsonl").write_text("".join(json.dumps({"text": f"doc {i} ünïcode"}) + "\n" for i in range(50)))
    prepare(tmp_path / "docs", str(tmp_path / "tok.json"), tmp_path / "out", context=8)
    train, val, tok = open_prepared(tmp_path / "out", 8)
    expected = [i for piece in text_pieces(tmp_path / "docs") for i in HFTokenizer(str(tmp_path / "tok.json")).encode(piece)]
    assert read_meta(tmp_path / "out")["num_tokens"]["total"] == len(expected)
    assert sorted(torch.cat([train, val]).tolist()) == sorted(expected)
    assert tok.decode(expected) == "\n\n".join(["First document.\nWith lines  and  spaces.\n" * 300]
                                               + [f"doc {i} ünïcode" for i in range(50)])


def test_a_bpe_prepared_run_records_the_folders_tokenizer_identity_and_resumes(tmp_path):
    """The prepared folder's meta.json and the checkpoint hold one tokenizer record (identity.tokenizer_identity):
    same vocabulary and sha256; the run names the folder's tokenizer.json, and the same command resumes."""
    from skippipe.checkpoint import latest_checkpoint, load_full_model
    from skippipe.shards import text_pieces
    from skippipe.tokenizer import train_bpe
    train_bpe(text_pieces("builtin"), 600).save(str(tmp_path / "tok.json"))
    prepare("builtin", str(tmp_path / "tok.json"), tmp_path / "data", context=32)

    def run(steps: int, resume: bool = False) -> list[dict]:
        cfg = load_config(ROOT / "configs/train/debug.yaml", [
            "model=llama-tiny-4k", "data.context=32", "schedule.skip_ratio=0.25", f"train.steps={steps}",
            "train.eval_batches=1", f"train.run_dir={tmp_path / 'run'}", "train.single_process=true",
            f"data.corpus={tmp_path / 'data'}"])
        return train(cfg, plan_for_run(cfg, resume) if resume else make_plan(cfg), resume=resume)

    run(1)
    recorded = json.loads((latest_checkpoint(tmp_path / "run") / "meta.json").read_text())["tokenizer"]
    prepared = read_meta(tmp_path / "data")["tokenizer"]
    assert set(recorded) == set(prepared) == {"name", "vocab_size", "sha256"}
    assert recorded["vocab_size"] == prepared["vocab_size"] == 600 and recorded["sha256"] == prepared["sha256"]
    assert recorded["name"] == str(tmp_path / "data" / "tokenizer.json") and prepared["name"] == str(tmp_path / "tok.json")
    assert [r["step"] for r in run(2, resume=True)] == [2]
    assert load_full_model(tmp_path / "run")[1].data.tokenizer == recorded["name"]
