"""Train a byte-level BPE tokenizer offline, with <|bos|>, <|eos|> and <|pad|> declared (ids 0, 1, 2).

    python scripts/train_tokenizer.py --corpus builtin --vocab-size 4096 --out tokenizer.json
    python scripts/train_tokenizer.py --corpus data/texts/ --vocab-size 32000 --out tok32k.json

--corpus takes what data.corpus takes: 'builtin', a .txt/.jsonl file, a folder of them, or a saved Hugging
Face dataset folder. The text is streamed to the `tokenizers` library, which keeps pair counts, not text.
A model trained with it needs vocab_size >= --vocab-size (checked at start-up).
"""
from pathlib import Path

from topology.errors import ArgumentParser, ConfigError, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--corpus", default="builtin", help="builtin, a .txt/.jsonl file or folder, or a saved dataset "
                   "(default: builtin)")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, specials included")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair merges only if seen this often (default: 2)")
    p.add_argument("--out", required=True, help="the tokenizer.json to write (never overwritten)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        from skippipe.checkpoint import atomic_write
        from skippipe.shards import text_pieces
        from skippipe.tokenizer import train_bpe

        out = Path(args.out)
        if out.exists():
            raise ConfigError(f"--out {out} exists; pass a new file name (tokenizers are never overwritten)")
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: folder {out.parent} does not exist; create it first")
        tokenizer = train_bpe(text_pieces(args.corpus), args.vocab_size, args.min_frequency)
        atomic_write(out, lambda tmp: tokenizer.save(str(tmp)))
        print(f"wrote {out}: byte-level BPE, {tokenizer.get_vocab_size()} tokens (<|bos|> 0, <|eos|> 1, <|pad|> 2)")


if __name__ == "__main__":
    main()
