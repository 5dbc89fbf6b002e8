"""Files a command writes for the user (a plan, a report, a plot, a trace): never replaced unless asked.

Every command of the project claims its output files through `claim_output_file` before it does its work,
so a second run with the same path stops at once, with one line, instead of overwriting the first run's
file (or failing after minutes of work). It lives in `topology`, the lowest layer, so the topology and
scheduler commands and skippipe's use the same rule.
"""
from __future__ import annotations

from pathlib import Path

from topology.errors import ConfigError


def claim_output_file(path: str | Path | None, *, overwrite: bool, flag: str) -> None:
    """Refuse an output file that exists unless `overwrite` (None: the command writes no such file).

    Raises ConfigError naming `flag` (the command-line option that gave the path) and both ways out."""
    if path is None or overwrite:
        return
    if Path(path).exists():
        raise ConfigError(f"{flag} {path} already exists; pass another path, or --overwrite to replace it")
