#!/usr/bin/env python
"""`python scripts/lm_eval_check.py ...` from a checkout, the same as the installed `skippipe-lm-eval-check`.

The command lives in skippipe/commands/lm_eval_check.py; this wrapper only makes the checkout importable first,
so that the script works without installing the package.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skippipe.commands.lm_eval_check import main  # noqa: E402

if __name__ == "__main__":
    main()
