"""Tokenize a corpus once into memory-mappable token files (train.bin, val.bin, meta.json).

    python scripts/prepare_data.py --corpus builtin --tokenizer byte --out data/builtin-byte
    python scripts/prepare_data.py --corpus texts/ --tokenizer tokenizer.json --out data/texts-bpe
    python scripts/train.py --config configs/train/debug.yaml data.corpus=data/texts-bpe model=...

--corpus: 'builtin', a .txt/.jsonl file, a folder of them, a saved Hugging Face dataset folder
(datasets' save_to_disk, field 'text'), or hf:NAME[:split[:field]] from the local cache. The text is read
and tokenized as a stream (constant memory); ids are uint16 when the vocabulary fits, else uint32.
--context sizes the validation blocks: a run may use any context up to it. See skippipe/shards.py.
"""
import time

from topology.errors import ArgumentParser, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--corpus", required=True, help="builtin, a .txt/.jsonl file or folder, a saved dataset, hf:...")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (skippipe-train-tokenizer) "
                   "(default: byte)")
    p.add_argument("--out", required=True, help="a new folder for train.bin, val.bin, meta.json")
    p.add_argument("--context", type=int, default=2048, help="the longest context a run will use (default: 2048)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens held out for validation "
                   "(default: 0.05)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        from skippipe.shards import prepare

        started = time.perf_counter()

        def progress(done: int) -> None:
            seconds = time.perf_counter() - started
            print(f"  {done / 1e6:,.0f} MB of text, {done / 1e6 / max(seconds, 1e-9):.1f} MB/s", flush=True)
        meta = prepare(args.corpus, args.tokenizer, args.out, context=args.context, val_fraction=args.val_fraction,
                       progress=progress)
        n = meta["num_tokens"]
        print(f"wrote {args.out}: {n['train']:,} training and {n['val']:,} validation tokens ({meta['dtype']}), "
              f"{meta['text_bytes'] / 1e6:,.1f} MB of text in {meta['seconds']:.1f} s")


if __name__ == "__main__":
    main()
