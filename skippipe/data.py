"""The offline data layer: tokenizer, corpus, train/validation split, per-data-node token streams.

Nothing here downloads anything. The default corpus is the English documentation Python ships in
``pydoc_data.topics``; local ``.txt`` and ``.jsonl`` files (or directories of them) work too, and a
Hugging Face dataset or tokenizer is used only when asked for and only from the local cache.

Note [data determinism]: the corpus is tokenized into one token sequence (memory-mapped: Note [one data
path] in shards.py); ``val_fraction`` of it, spread over up to 20 blocks, is the validation split. Each data node (stage-0 replica) reads a contiguous shard of the training split and
draws random windows from a generator seeded by (seed, shard_index). The generator's state is the
stream's whole state, so a resumed run draws exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from skippipe.model import derive_seed
from topology.errors import ConfigError

BUILTIN = "builtin"
HF_PREFIX = "hf:"
DOCUMENT_SEPARATOR = "\n\n"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no files, nothing to download."""

    vocab_size = 256
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: Sequence[int]) -> str:
        # A window may cut a multi-byte character; replace it rather than fail.
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")

    def encode_tensor(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        if not data:  # frombuffer rejects an empty buffer
            return torch.zeros(0, dtype=torch.int32)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)


class HFTokenizer:
    """A ``tokenizers`` tokenizer from a local tokenizer.json, or one in the Hugging Face cache."""

    def __init__(self, name_or_path: str):
        from skippipe.tokenizer import read_tokenizer_file
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file() and not path.suffix == ".json":
            path = Path(_cached_hub_file(name_or_path, "tokenizer.json", repo_type="model"))
        self._tokenizer = read_tokenizer_file(path)  # wrapped in loaders.loading: a bad file is one line
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.name = name_or_path
        self.path = path  # identity.tokenizer_identity hashes it into every checkpoint

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode([int(t) for t in tokens])

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.int32)


def _cached_hub_file(repo_id: str, filename: str, repo_type: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(repo_id, filename, repo_type=repo_type, local_files_only=True)
    except Exception:  # not installed, not a repo id, or not cached: all mean "not available offline"
        raise ConfigError(f"{repo_id!r} is neither a local tokenizer file nor in the Hugging Face cache; "
                          "pass a path to tokenizer.json, or download it beforehand") from None


def load_tokenizer(name: str = "byte") -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def builtin_text() -> str:
    from pydoc_data.topics import topics
    return DOCUMENT_SEPARATOR.join(topics[key] for key in sorted(topics))


def _read_hf_dataset(spec: str) -> list[str]:
    """``hf:<name>[:<split>[:<field>]]`` from the local datasets cache only."""
    name, split, field = (spec[len(HF_PREFIX):].split(":") + ["train", "text"])[:3]
    if importlib.util.find_spec("datasets") is None:
        raise ConfigError(f"corpus {spec!r} needs the 'datasets' package; pip install datasets, "
                          "or use the built-in corpus or a local .txt/.jsonl file")
    # No downloads at run time. datasets reads these variables when first imported; if it already was,
    # set its flags directly.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if hasattr(datasets.config, flag):
            setattr(datasets.config, flag, True)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise ConfigError(f"dataset {name!r} (split {split!r}) is not in the local Hugging Face cache ({exc}); "
                          "download it beforehand or use a local .txt/.jsonl file") from None
    if field not in dataset.column_names:
        raise ConfigError(f"dataset {name!r} has no field {field!r}; its fields: {', '.join(dataset.column_names)}")
    return list(dataset[field])


def read_documents(source: str | Path | Sequence[str | Path] = BUILTIN) -> list[str]:
    """Documents from one source or several: 'builtin', a .txt/.jsonl file, a directory of them, a saved
    Hugging Face dataset folder, or hf:... (whole, in memory: tokenizer training and tests use it)."""
    from skippipe.shards import _documents
    return ["".join(pieces) for pieces in _documents(source)]


def split_ranges(num_tokens: int, context: int, val_fraction: float = 0.05) -> tuple[list[range], list[range]]:
    """(train ranges, validation ranges) of token positions: validation is the tail of each of up to 20
    equal blocks, each at least a window of ``context + 1`` tokens.

    Held-out text is spread over the corpus rather than taken from its end: the built-in corpus ends in
    whitespace-padded tables that are far easier to predict than the prose before them.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    window = context + 1
    if num_tokens == 0:
        raise ConfigError("the corpus is empty; pass a corpus with text in it")
    if num_tokens < 2 * window:
        raise ConfigError(f"the corpus has {num_tokens} tokens but needs at least {2 * window} "
                          f"(a training and a validation window of context {context} + 1); "
                          "use a larger corpus or a model with a shorter context")
    num_val = min(max(window, round(num_tokens * val_fraction)), num_tokens - window)
    num_blocks = max(1, min(20, num_val // window))
    block, held = num_tokens // num_blocks, num_val // num_blocks
    train, val = [], []
    for b in range(num_blocks):
        end = num_tokens if b == num_blocks - 1 else (b + 1) * block
        train.append(range(b * block, end - held))
        val.append(range(end - held, end))
    return train, val


def split_tokens(tokens: torch.Tensor, context: int, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) tokens by :func:`split_ranges`."""
    train, val = split_ranges(len(tokens), context, val_fraction)
    return (torch.cat([tokens[r.start:r.stop] for r in train]), torch.cat([tokens[r.start:r.stop] for r in val]))


class TokenStream:
    """Training batches for one data node: random windows from its shard (Note [data determinism])."""

    def __init__(self, tokens: torch.Tensor, *, context: int, batch_size: int, shard_index: int = 0,
                 num_shards: int = 1, seed: int = 0):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} is out of range for {num_shards} shards")
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        begin = len(tokens) * shard_index // num_shards
        end = len(tokens) * (shard_index + 1) // num_shards
        if end - begin < context + 1:
            raise ConfigError(f"data shard {shard_index} of {num_shards} has {end - begin} tokens, fewer than "
                              f"one window of {context + 1}; use fewer data nodes or a larger corpus")
        if batch_size > end - begin - context:  # also keeps an absurd batch (a plan's 1e12) from exhausting memory
            raise ConfigError(f"a batch of {batch_size} sequences exceeds the {end - begin - context} distinct windows "
                              f"of data shard {shard_index} of {num_shards}; use a smaller microbatch size or a "
                              f"larger corpus")
        self.shard = tokens[begin:end]
        self.context, self.batch_size = context, batch_size
        self.shard_index, self.num_shards, self.seed = shard_index, num_shards, seed
        self.num_batches = 0
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "data", shard_index))

    def next_batch(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 of shape (batch, context); targets are inputs shifted by one token."""
        batch_size = batch_size or self.batch_size
        num_starts = len(self.shard) - self.context
        starts = torch.randint(num_starts, (batch_size,), generator=self.generator)
        offsets = torch.arange(self.context + 1)
        windows = self.shard[starts[:, None] + offsets].long()
        self.num_batches += 1
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "num_batches": self.num_batches,
                "shard_index": self.shard_index, "num_shards": self.num_shards, "seed": self.seed,
                "shard_tokens": len(self.shard)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("shard_index", "num_shards", "seed", "shard_tokens"):
            if state[key] != mine[key]:
                raise ConfigError(f"data state was saved with {key}={state[key]} but this run has {mine[key]}; "
                                  "resume with the same corpus, seed and data nodes")
        self.generator.set_state(state["generator"])
        self.num_batches = state["num_batches"]


def validation_batches(tokens: torch.Tensor, context: int, batch_size: int,
                       max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows over the validation split, in order (the last batch may be short)."""
    num_windows = (len(tokens) - 1) // context
    offsets = torch.arange(context + 1)
    for batch_index, first in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and batch_index >= max_batches:
            return
        starts = torch.arange(first, min(first + batch_size, num_windows)) * context
        windows = tokens[starts[:, None] + offsets].long()
        yield windows[:, :-1], windows[:, 1:]


@dataclass
class Corpus:
    """A tokenized corpus split into training and validation tokens."""

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: ByteTokenizer | HFTokenizer
    context: int

    def stream(self, batch_size: int, shard_index: int = 0, num_shards: int = 1, seed: int = 0) -> TokenStream:
        return TokenStream(self.train, context=self.context, batch_size=batch_size, shard_index=shard_index,
                           num_shards=num_shards, seed=seed)

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return validation_batches(self.val, self.context, batch_size, max_batches)


def load_corpus(source: str | Path | Sequence[str | Path] = BUILTIN, *, context: int = 64, tokenizer: str = "byte",
                val_fraction: float = 0.05, vocab_size: int | None = None) -> Corpus:
    """A corpus split into training and validation tokens, memory-mapped (Note [one data path], shards.py).

    A prepared folder is mapped as it is; any other source is prepared into a temporary folder first.
    ``vocab_size`` (the model's) must hold every id of the tokenizer, else ConfigError.
    """
    from skippipe.shards import is_prepared, open_prepared, prepare
    if is_prepared(source):
        train, val, tok = open_prepared(source, context, tokenizer)
    else:
        tok = load_tokenizer(tokenizer)  # a bad tokenizer fails before the corpus is read
        _check_vocab(tok, vocab_size)
        with tempfile.TemporaryDirectory(prefix="skippipe-corpus-") as tmp:
            prepare(source, tokenizer, Path(tmp) / "tokens", context=context, val_fraction=val_fraction)
            # The maps keep the files alive after the folder is removed (POSIX unlink semantics).
            train, val, tok = open_prepared(Path(tmp) / "tokens", context, tokenizer)
    _check_vocab(tok, vocab_size)
    return Corpus(train, val, tok, context)


def _check_vocab(tok: ByteTokenizer | HFTokenizer, vocab_size: int | None) -> None:
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model's vocab_size is "
                          f"{vocab_size}; use a model with vocab_size >= {tok.vocab_size} or another tokenizer")
