"""The data layer: tokenizer, corpus sources, split, shards, resumable streams, validation windows."""
import json

import pytest
import torch

from skippipe.data import (ByteTokenizer, TokenStream, builtin_text, load_corpus, read_documents, split_tokens,
                           validation_batches)
from topology.errors import ConfigError

CONTEXT = 32


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(context=CONTEXT)


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "def f(x):\n    return 'héllo → wörld'"
    tokens = tokenizer.encode(text)
    assert all(0 <= t < 256 for t in tokens) and len(tokens) == len(text.encode())
    assert tokenizer.decode(tokens) == text
    assert tokenizer.encode_tensor(text).tolist() == tokens


def test_builtin_corpus_is_deterministic_and_large(corpus):
    text = builtin_text()
    assert len(text) > 300_000 and text == builtin_text()
    assert len(corpus.train) + len(corpus.val) == len(text.encode())
    assert corpus.tokenizer.decode(corpus.train[:200].tolist()) == text.encode()[:200].decode()


def test_validation_split_is_spread_over_the_corpus_and_disjoint():
    tokens = torch.arange(100_000, dtype=torch.int64)  # every position distinct, so positions are traceable
    train, val = split_tokens(tokens, context=CONTEXT, val_fraction=0.05)
    assert len(train) + len(val) == len(tokens)
    assert abs(len(val) - 5_000) <= 20  # 5%, give or take the rounding into 20 blocks
    assert not set(train.tolist()) & set(val.tolist())
    # Held out from all over the corpus, not only its end.
    assert val.min() < len(tokens) // 10 and val.max() == len(tokens) - 1
    # Each held-out block is contiguous text at least one window long.
    seams = (val[1:] - val[:-1] != 1).nonzero().flatten()
    assert len(seams) == 19 and (seams[1:] - seams[:-1]).min() >= CONTEXT + 1


def test_builtin_corpus_splits_into_train_and_val(corpus):
    inputs, targets = next(corpus.val_batches(4))
    assert inputs.shape == targets.shape == (4, CONTEXT)
    assert torch.equal(inputs[0, 1:], targets[0, :-1])
    stream = corpus.stream(batch_size=8)
    assert len(stream.shard) == len(corpus.train)


def test_validation_windows_are_fixed_and_cover_the_split():
    val = torch.arange(100, dtype=torch.int32)
    batches = list(validation_batches(val, context=10, batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 1]  # 99 // 10 = 9 windows
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert torch.equal(inputs.flatten(), torch.arange(90))
    assert torch.equal(targets, inputs + 1)
    assert len(list(validation_batches(val, 10, 4, max_batches=2))) == 2


def test_batches_are_shifted_windows(corpus):
    inputs, targets = corpus.stream(batch_size=5, seed=3).next_batch()
    assert inputs.shape == targets.shape == (5, CONTEXT) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_shards_differ_and_are_deterministic(corpus):
    first = [corpus.stream(8, shard_index=0, num_shards=3, seed=7).next_batch()[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    other = corpus.stream(8, shard_index=1, num_shards=3, seed=7).next_batch()[0]
    assert not torch.equal(first[0], other)
    assert not torch.equal(first[0], corpus.stream(8, shard_index=0, num_shards=3, seed=8).next_batch()[0])
    # Shards are disjoint slices of the training split that together cover it.
    shards = [corpus.stream(8, i, 3).shard for i in range(3)]
    assert torch.equal(torch.cat(shards), corpus.train)


def test_resume_draws_the_same_batches(corpus):
    uninterrupted = corpus.stream(4, shard_index=1, num_shards=2, seed=5)
    expected = [uninterrupted.next_batch() for _ in range(6)]
    first = corpus.stream(4, shard_index=1, num_shards=2, seed=5)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    resumed = corpus.stream(4, shard_index=1, num_shards=2, seed=5)
    resumed.load_state_dict(state)
    assert resumed.num_batches == 3
    for want, got in zip(expected[3:], (resumed.next_batch() for _ in range(3))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    with pytest.raises(ConfigError, match="shard_index"):
        corpus.stream(4, shard_index=0, num_shards=2, seed=5).load_state_dict(state)


def test_local_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 40)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 10}) for i in range(3)) + "\n")
    assert read_documents(tmp_path / "b.jsonl") == [f"doc {i} " * 10 for i in range(3)]
    docs = read_documents(tmp_path)
    assert docs[0] == "alpha " * 40 and len(docs) == 4
    corpus = load_corpus(tmp_path, context=16)
    assert corpus.tokenizer.decode(corpus.train[:6].tolist()) == "alpha "


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("short", "at least"),
    ("bad_jsonl", "text"),
    ("wrong_type", ".txt or .jsonl"),
])
def test_bad_corpora_raise_config_errors(tmp_path, case, message):
    files = {"empty": ("e.txt", ""), "short": ("s.txt", "too short"), "bad_jsonl": ("j.jsonl", '{"body": 1}\n'),
             "wrong_type": ("w.csv", "a,b")}
    path = tmp_path / "nope.txt"
    if case in files:
        name, content = files[case]
        path = tmp_path / name
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_corpus(path, context=CONTEXT)


def test_other_config_errors(corpus):
    with pytest.raises(ConfigError, match="vocab_size"):
        load_corpus(context=CONTEXT, vocab_size=128)
    with pytest.raises(ConfigError, match="data nodes"):
        TokenStream(torch.arange(100), context=CONTEXT, batch_size=2, shard_index=0, num_shards=4)
    with pytest.raises(ConfigError, match="cache|datasets"):
        load_corpus("hf:surely-not-cached-dataset-xyz", context=CONTEXT)
    with pytest.raises(ConfigError, match="tokenizer"):
        load_corpus(context=CONTEXT, tokenizer="/no/such/tokenizer.json")


def test_split_keeps_at_least_one_window_each():
    train, val = split_tokens(torch.arange(100), context=20, val_fraction=0.05)
    assert len(val) == 21 and len(train) == 79
    with pytest.raises(ConfigError, match="shorter context"):
        split_tokens(torch.arange(30), context=20)
