"""Byte-level BPE tokenizers trained offline, and reading tokenizer.json files with one-line errors.

    tokenizer = train_bpe(documents, vocab_size=4096)    # a tokenizers.Tokenizer
    tokenizer.save("tokenizer.json")
    tokenizer = read_tokenizer_file("tokenizer.json")  # ConfigError naming the file if it is damaged

Note [special tokens]: a trained tokenizer's first ids are <|bos|> (0), <|eos|> (1) and <|pad|> (2),
declared special so that text never encodes to them and decoding can skip them. Encoding adds none of
them (no post-processor): skippipe trains on the text's own tokens, and an exported tokenizer encodes
exactly as skippipe did. The export declares them (skippipe/evaluation/export.py) so that evaluation harnesses and
batched pipelines find a BOS, an EOS and a pad token.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from skippipe.loaders import loading
from topology.errors import ConfigError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("BPE tokenizers need the 'tokenizers' package; pip install tokenizers, "
                          "or use the byte tokenizer") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens (specials included).

    ``texts`` is consumed once, as a stream (the library counts pairs; it does not keep the text).
    Raises ConfigError if ``vocab_size`` cannot hold the 256 bytes and the special tokens.
    """
    least = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < least:
        raise ConfigError(f"--vocab-size must be an integer >= {least} (256 bytes and {len(SPECIAL_TOKENS)} "
                          f"special tokens), got {vocab_size!r}")
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    # add_prefix_space=False: a document's first word encodes as written, as everywhere else.
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                     special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def read_tokenizer_file(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json; a missing or damaged file is a one-line ConfigError.

    The library raises a bare ``Exception`` for every kind of bad file (empty, truncated, not a
    tokenizer): loaders.loading turns it into a message naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer file not found: {path}; pass a tokenizer.json "
                          f"(scripts/train_tokenizer.py makes one) or 'byte'")
    tk = _tokenizers()
    with loading(path, "tokenizer.json", "pass a tokenizer.json saved by the tokenizers library "
                 "(scripts/train_tokenizer.py makes one), or data.tokenizer=byte"):
        return tk.Tokenizer.from_file(str(path))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks: a tokenizer's identity in prepared data."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def special_token_ids(tokenizer) -> dict[str, tuple[str, int]]:
    """{'bos'|'eos'|'pad': (token, id)} of a ``tokenizers.Tokenizer``, by the usual spellings.

    Finds this project's <|bos|>/<|eos|>/<|pad|> and the common Llama/GPT-2 spellings; the pad token
    falls back to the EOS token (what Llama models do). Raises ConfigError when no BOS or EOS exists.
    """
    vocab = tokenizer.get_vocab()
    spellings = {"bos": (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>"),
                 "eos": (EOS, "</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"),
                 "pad": (PAD, "<pad>", "<|finetune_right_pad_id|>")}
    found = {}
    for role, names in spellings.items():
        name = next((n for n in names if n in vocab), None)
        if name is not None:
            found[role] = (name, vocab[name])
    if "pad" not in found and "eos" in found:
        found["pad"] = found["eos"]
    missing = [role for role in ("bos", "eos") if role not in found]
    if missing:
        raise ConfigError(f"the tokenizer declares no {' or '.join(t.upper() for t in missing)} token "
                          f"(looked for {', '.join(spellings[missing[0]])}); train one with "
                          f"scripts/train_tokenizer.py, which declares {', '.join(SPECIAL_TOKENS)}")
    return found
