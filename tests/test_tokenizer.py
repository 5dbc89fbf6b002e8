"""The offline BPE tokenizer: trained from a stream, special tokens declared, damaged files refused."""
from __future__ import annotations

import pytest

from skippipe.data import HFTokenizer, load_corpus
from skippipe.shards import text_pieces
from skippipe.tokenizer import BOS, EOS, PAD, read_tokenizer_file, special_token_ids, train_bpe
from topology.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(text_pieces("builtin"), 512).save(str(path))
    return path


def test_bpe_has_the_requested_vocabulary_specials_first_and_round_trips(tokenizer_file):
    tok = HFTokenizer(str(tokenizer_file))
    assert tok.vocab_size == 512
    assert special_token_ids(tok._tokenizer) == {"bos": (BOS, 0), "eos": (EOS, 1), "pad": (PAD, 2)}
    text = "Hello, wörld: naïve ☃ text\twith\nbytes  and   spaces"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learned: fewer tokens than bytes
    assert not {0, 1, 2} & set(tok.encode(text + " <|eos|>")[:-5])  # no specials added by encoding text


def test_a_model_with_a_smaller_vocabulary_is_refused(tokenizer_file):
    with pytest.raises(ConfigError, match="has 512 tokens but the model's vocab_size is 256"):
        load_corpus("builtin", context=16, tokenizer=str(tokenizer_file), vocab_size=256)


@pytest.mark.parametrize("content", [b"", b'{"version": "1.0", "trunc', b"not json at all", b'{"a": 1}'])
def test_damaged_tokenizer_files_are_one_line_errors_naming_the_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{path}: not a readable tokenizer.json") as info:
        read_tokenizer_file(path)
    assert "\n" not in str(info.value)


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="vocab-size must be an integer >= 259"):
        train_bpe(iter(["abc"]), 100)
