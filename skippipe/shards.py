"""Prepared token files: a corpus tokenized once, in a stream, and read back by memory map.

    DIR/train.bin   the training tokens, uint16 when the vocabulary fits (< 65536 ids), else uint32
    DIR/val.bin     the validation tokens (the same split as skippipe.data.split_ranges)
    DIR/meta.json   format and version, dtype, token counts, vocabulary, tokenizer identity (identity.tokenizer_identity), source
    DIR/tokenizer.json   a copy of the BPE tokenizer the tokens were made with (absent for 'byte')

Note [one data path]: every corpus goes through here. `scripts/prepare_data.py` writes DIR once; a
run with ``data.corpus=DIR`` maps the files, so start-up reads only meta.json whatever the corpus's
size, and each data node's windows touch only its own shard's pages. A raw corpus (the built-in text,
.txt/.jsonl files) is prepared the same way into a temporary folder at start-up and mapped from there:
the tokens a run trains on do not depend on whether the corpus was prepared beforehand.

Note [streamed tokenization]: the text is read in pieces (a .txt file in ~64 KiB pieces cut after a
newline, a .jsonl file line by line) whose concatenation is the documents joined by
DOCUMENT_SEPARATOR; a batch of pieces is tokenized at a time (``encode_batch_fast`` runs on the
``tokenizers`` library's own threads) and appended to the token file, so memory does not grow with the
corpus. The split is then copied out of that file in blocks.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from skippipe.data import (BUILTIN, DOCUMENT_SEPARATOR, HF_PREFIX, ByteTokenizer, HFTokenizer, _read_hf_dataset,
                           builtin_text, load_tokenizer, split_ranges)
from skippipe.identity import tokenizer_identity
from skippipe.tokenizer import file_sha256
from topology.errors import ConfigError
from topology.yamlio import read_json

FORMAT = "skippipe-tokens"
FORMAT_VERSION = 1
META = "meta.json"
TOKENIZER_FILE = "tokenizer.json"  # the BPE tokenizer's copy; meta.json's tokenizer record names its sha256
PIECE_CHARS = 1 << 16  # characters per .txt piece: many small texts keep encode_batch parallel and lean
BATCH_CHARS = 4 << 20  # characters tokenized per encode_batch call (bounds the Encodings held)
COPY_TOKENS = 8 << 20  # tokens per block when copying the split out


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_prepared(source) -> bool:
    """True for a folder that is (or claims to be) prepared data: meta.json, train.bin or val.bin in it."""
    if isinstance(source, (list, tuple)) or str(source) == BUILTIN or str(source).startswith(HF_PREFIX):
        return False
    path = Path(source)
    return path.is_dir() and any((path / name).exists() for name in (META, "train.bin", "val.bin"))


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk."""
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _saved_dataset_texts(path: Path, field: str = "text") -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path} is a Hugging Face dataset folder; reading it needs the 'datasets' package "
                          "(pip install datasets)") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise ConfigError(f"{path}: not a readable saved dataset ({' '.join(str(exc).split())[:160]})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ConfigError(f"{path}: a dataset dictionary without a 'train' split; save one split")
        dataset = dataset["train"]
    if field not in dataset.column_names:
        raise ConfigError(f"{path}: no {field!r} field; its fields: {', '.join(dataset.column_names)}")
    for batch in dataset.iter(batch_size=1024):
        yield from batch[field]


def _txt_pieces(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            carry = ""
            while True:
                chunk = f.read(PIECE_CHARS)
                if not chunk:
                    break
                chunk = carry + chunk
                cut = chunk.rfind("\n") + 1
                if cut == 0:  # no newline in a piece: cut anywhere rather than grow
                    cut = len(chunk)
                carry = chunk[cut:]
                yield chunk[:cut]
            if carry:
                yield carry
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; convert it or pass another file") from None


def _jsonl_texts(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{line_number}: malformed JSON ({exc.msg}); one JSON object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ConfigError(f"{path}:{line_number}: expected an object with a string 'text' field")
                yield record["text"]
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; convert it or pass another file") from None


def _documents(source) -> Iterator[Iterator[str]]:
    """Each document as an iterator of its pieces (Note [streamed tokenization])."""
    if isinstance(source, (list, tuple)):
        for item in source:
            yield from _documents(item)
        return
    text = str(source)
    if text == BUILTIN:
        yield iter([builtin_text()])
        return
    if text.startswith(HF_PREFIX):
        for doc in _read_hf_dataset(text):
            yield iter([doc])
        return
    path = Path(text)
    if _is_saved_dataset(path):
        for doc in _saved_dataset_texts(path):
            yield iter([doc])
        return
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise ConfigError(f"{path}: no .txt or .jsonl files in this directory; add some or pass a file")
        for file in files:
            yield from _documents(file)
        return
    if not path.exists():
        raise ConfigError(f"corpus file not found: {path}; pass an existing .txt/.jsonl file, a directory of "
                          f"them, a prepared data folder, a saved Hugging Face dataset or '{BUILTIN}'")
    if path.suffix == ".txt":
        yield _txt_pieces(path)
    elif path.suffix == ".jsonl":
        for doc in _jsonl_texts(path):
            yield iter([doc])
    else:
        raise ConfigError(f"{path}: unsupported corpus file type {path.suffix!r}; use .txt or .jsonl")


def text_pieces(source) -> Iterator[str]:
    """Pieces whose concatenation is the source's documents joined by DOCUMENT_SEPARATOR."""
    for index, pieces in enumerate(_documents(source)):
        if index:
            yield DOCUMENT_SEPARATOR
        yield from pieces


def _encode_batch(tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(dtype)
    # The fast variant skips offsets: the same ids (tests/test_shards.py), less memory and time.
    encodings = tokenizer._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encodings] or [np.zeros(0, dtype)])


def _source_text(source) -> str:
    return ", ".join(str(s) for s in source) if isinstance(source, (list, tuple)) else str(source)


def prepare(source, tokenizer: str, out_dir: str | Path, *, context: int = 1024, val_fraction: float = 0.05,
            progress=None) -> dict:
    """Tokenize ``source`` into a new prepared folder ``out_dir``; returns its meta.json content.

    ``context`` sizes the validation blocks (each holds at least one window of context + 1 tokens); a
    run may use any context up to it. The folder is written beside ``out_dir`` under a temporary name
    and renamed when complete, so an interrupted prepare leaves nothing that looks prepared. Raises
    ConfigError for an existing non-empty ``out_dir``, a bad source or tokenizer, or too few tokens.
    ``progress(bytes_read)`` is called after each batch when given.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} exists and is not an empty folder; pass a new folder "
                          "(prepared data is never overwritten)")
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        started, text_bytes = time.perf_counter(), 0
        with (tmp / "all.bin").open("wb") as sink:
            batch, chars = [], 0
            for piece in text_pieces(source):
                batch.append(piece)
                chars += len(piece)
                if chars >= BATCH_CHARS:
                    sink.write(_encode_batch(tok, batch, dtype).tobytes())
                    text_bytes += sum(len(p.encode("utf-8")) for p in batch)
                    batch, chars = [], 0
                    if progress:
                        progress(text_bytes)
            if batch:
                sink.write(_encode_batch(tok, batch, dtype).tobytes())
                text_bytes += sum(len(p.encode("utf-8")) for p in batch)
        num_tokens = (tmp / "all.bin").stat().st_size // dtype.itemsize
        if num_tokens == 0:
            raise ConfigError(f"the corpus {_source_text(source)} is empty; pass files with text in them")
        train_ranges, val_ranges = split_ranges(num_tokens, context, val_fraction)
        counts = {}
        # Plain reads, not a memory map: a mapped file's pages count in this process's resident memory,
        # which would then grow with the corpus (1 GB of text: 800 MB peak against 340 MB for 10 MB).
        with (tmp / "all.bin").open("rb") as tokens:
            for name, ranges in (("train", train_ranges), ("val", val_ranges)):
                with (tmp / f"{name}.bin").open("wb") as sink:
                    for r in ranges:
                        tokens.seek(r.start * dtype.itemsize)
                        for start in range(r.start, r.stop, COPY_TOKENS):
                            sink.write(tokens.read((min(start + COPY_TOKENS, r.stop) - start) * dtype.itemsize))
                counts[name] = sum(len(r) for r in ranges)
        (tmp / "all.bin").unlink()
        if isinstance(tok, HFTokenizer):
            shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name,
                "vocab_size": tok.vocab_size, "tokenizer": tokenizer_identity(tok),
                "num_tokens": {"train": counts["train"], "val": counts["val"], "total": num_tokens},
                "source": _source_text(source), "text_bytes": text_bytes,
                "split": {"context": context, "val_fraction": val_fraction, "blocks": len(val_ranges)},
                "document_separator": DOCUMENT_SEPARATOR, "seconds": round(time.perf_counter() - started, 3)}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked above
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_meta(folder: str | Path) -> dict:
    """meta.json of a prepared folder, checked; a one-line ConfigError for anything missing or foreign."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise ConfigError(f"{folder}: no {META}; not a prepared data folder: make one with "
                          f"scripts/prepare_data.py --corpus SRC --tokenizer T --out {folder}")
    meta = read_json(folder / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{folder / META}: not skippipe prepared data (format must be {FORMAT!r}); "
                          "re-create it with scripts/prepare_data.py")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{folder / META}: format_version {meta.get('format_version')!r} but this skippipe reads "
                          f"version {FORMAT_VERSION}; re-create it with scripts/prepare_data.py")
    counts = meta.get("num_tokens")
    if (meta.get("dtype") not in ("uint16", "uint32") or not isinstance(counts, dict)
            or not all(isinstance(counts.get(k), int) and counts[k] >= 0 for k in ("train", "val"))
            or not isinstance(meta.get("vocab_size"), int) or not isinstance(meta.get("tokenizer"), dict)
            or not isinstance(meta["tokenizer"].get("sha256"), (str, type(None)))):
        raise ConfigError(f"{folder / META}: dtype, num_tokens, vocab_size or tokenizer is missing or malformed; "
                          "re-create it with scripts/prepare_data.py")
    return meta


def _map(path: Path, dtype: np.dtype, count: int) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"{path} is missing; re-create the folder with scripts/prepare_data.py")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise ConfigError(f"{path} holds {size} bytes but meta.json says {count} {dtype.name} tokens "
                          f"({count * dtype.itemsize} bytes); the folder is damaged: re-create it")
    if count == 0:
        return torch.zeros(0, dtype=torch.int32)
    # Copy-on-write mapping: writable for torch.from_numpy, yet nothing is ever written back or read
    # until a window touches its pages.
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", shape=(count,)))


def run_tokenizer(corpus, tokenizer: str) -> str:
    """The tokenizer a run with data.corpus=`corpus` and data.tokenizer=`tokenizer` trains with: a prepared
    BPE folder's own tokenizer.json when `tokenizer` is 'byte' (the default), else `tokenizer`. The run
    records it (config.yaml, the checkpoint's identity), so evaluation and export load the same one."""
    if tokenizer == "byte" and is_prepared(corpus) and read_meta(corpus)["tokenizer"].get("sha256") is not None:
        return str(Path(corpus) / TOKENIZER_FILE)
    return tokenizer


def open_prepared(folder: str | Path, context: int, tokenizer: str = "byte"):
    """(train tokens, validation tokens, tokenizer) of a prepared folder, memory-mapped.

    ``tokenizer`` is the run's data.tokenizer: 'byte' (the default) takes the folder's own tokenizer;
    a tokenizer file must be the one the tokens were made with (same sha256). Raises ConfigError for a
    damaged folder, another tokenizer, or a validation split shorter than one window of ``context``.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    identity = meta["tokenizer"]
    if identity.get("sha256") is None:  # the byte tokenizer: no file (identity.tokenizer_identity)
        if tokenizer != "byte":
            raise ConfigError(f"{folder} was prepared with the byte tokenizer but data.tokenizer is {tokenizer!r}; "
                              "set data.tokenizer=byte or prepare the corpus with that tokenizer")
        tok = load_tokenizer("byte")
    else:
        own = folder / TOKENIZER_FILE
        if not own.is_file() or file_sha256(own) != identity["sha256"]:
            raise ConfigError(f"{own} is missing or is not the tokenizer meta.json names (sha256 differs); "
                              "re-create the folder with scripts/prepare_data.py")
        # The run's own tokenizer when it names one (the same file, by sha256): its name is what the run records.
        tok = load_tokenizer(str(own) if tokenizer == "byte" else tokenizer)
        if file_sha256(tok.path) != identity["sha256"]:
            raise ConfigError(f"data.tokenizer {tokenizer!r} is not the tokenizer {folder} was prepared with "
                              f"(sha256 {identity['sha256'][:12]}...); leave data.tokenizer unset to use the folder's")
    if tok.vocab_size != meta["vocab_size"]:
        raise ConfigError(f"{folder / META}: vocab_size {meta['vocab_size']} but its tokenizer has {tok.vocab_size}")
    dtype = np.dtype(meta["dtype"])
    train = _map(folder / "train.bin", dtype, meta["num_tokens"]["train"])
    val = _map(folder / "val.bin", dtype, meta["num_tokens"]["val"])
    if len(val) < context + 1 or len(train) < context + 1:
        raise ConfigError(f"{folder} has {len(train)} training and {len(val)} validation tokens, fewer than one "
                          f"window of context {context} + 1 in a split; prepare it with --context {context} or more")
    return train, val, tok
