#!/usr/bin/env python
"""`python scripts/residual_scale.py ...` from a checkout, the same as the installed `skippipe-residual-scale`.

The command lives in skippipe/commands/residual_scale.py; this wrapper only makes the checkout importable first,
so that the script works without installing the package.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skippipe.commands.residual_scale import main  # noqa: E402

if __name__ == "__main__":
    main()
