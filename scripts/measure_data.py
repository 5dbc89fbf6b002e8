#!/usr/bin/env python
"""`python scripts/measure_data.py ...` from a checkout, the same as the installed `skippipe-measure-data`.

The command lives in skippipe/commands/measure_data.py; this wrapper only makes the checkout importable first,
so that the script works without installing the package.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skippipe.commands.measure_data import main  # noqa: E402

if __name__ == "__main__":
    main()
