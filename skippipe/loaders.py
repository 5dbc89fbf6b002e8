"""Third-party file loaders, wrapped where the project calls them: a bad file is one line naming it.

Libraries signal a damaged file in their own ways: `tokenizers` raises a bare Exception ("data did not
match any variant ..."), safetensors its own SafetensorError, `datasets` a dozen types. The project's
contract for bad input (topology/errors.py) is a ConfigError: one line saying which file and what to do.
YAML and JSON go through topology/yamlio.py (read_yaml, read_json); checkpoint files through
skippipe/checkpoint.py (read_weights, read_state); this module wraps the rest.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from topology.errors import ConfigError


@contextlib.contextmanager
def loading(path: str | Path, what: str, fix: str):
    """Turn any exception a loader raises inside the block into ConfigError '{path}: not a readable {what}
    ({type}: {detail}); {fix}'. A ConfigError raised inside passes through unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # the libraries' own error types differ by version; every one means a bad file
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        raise ConfigError(f"{path}: not a readable {what} ({type(exc).__name__}: {detail}); {fix}") from None
