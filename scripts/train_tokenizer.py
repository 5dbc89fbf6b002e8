#!/usr/bin/env python
"""`python scripts/train_tokenizer.py ...` from a checkout, the same as the installed `skippipe-train-tokenizer`.

The command lives in skippipe/commands/train_tokenizer.py; this wrapper only makes the checkout importable first,
so that the script works without installing the package.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skippipe.commands.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    main()
