"""`python -m skippipe COMMAND ...`: every skippipe command under one name (list: skippipe/commands).

Under torchrun: `torchrun --nproc-per-node 8 -m skippipe train --config debug --skip-ratio 0.25`.
"""
from __future__ import annotations

import importlib
import sys

from skippipe.commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: python -m skippipe COMMAND [--help | ARGS ...]\n\n"
            f"Partial, reordered pipelines for training LLMs (SkipPipe, arXiv 2502.19913).\n\n"
            f"commands (each also installed as skippipe-COMMAND):\n{rows}\n")


def main() -> None:
    """Dispatch to the command named by the first argument; its main() reads the remaining ones."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(usage())
        return
    name = sys.argv[1]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)}; see python -m skippipe --help",
              file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"skippipe {name}", *sys.argv[2:]]
    if name in ("topology", "scheduler"):
        module.main(sys.argv[1:])
    else:
        module.main()


if __name__ == "__main__":
    main()
