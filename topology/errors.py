"""User-facing errors and the one-line CLI error contract.

Every command-line entry point wraps its body in :func:`cli_errors`: a bad input raises
:class:`ConfigError` (or another ``ValueError``/``OSError``) deep inside, and the user sees one line
``error: <what is wrong and how to fix it>`` on stderr with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import yaml

EXIT_USAGE = 2


class ConfigError(ValueError):
    """Bad user input: a message that says what is wrong and how to fix it."""


def one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename}; check the path"
    if isinstance(exc, IsADirectoryError):
        return f"expected a file but got a directory: {exc.filename}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"malformed YAML{where}: {getattr(exc, 'problem', None) or exc}; fix the file's syntax"
    text = str(exc) if str(exc) else type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def cli_errors():
    """Turn user-input errors into one line on stderr and exit status 2."""
    try:
        yield
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, KeyError, yaml.YAMLError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default after its help, unless the help already says it or there is none to show.

    A flag whose default is None says in its own help what happens without it.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or any(action.default is x for x in (None, False, argparse.SUPPRESS)) \
                or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def program_name(module: str, console_script: str) -> str:
    """The name a command's usage line should show: `console_script` (pyproject.toml) when the user ran that,
    else `python -m <module>`."""
    return console_script if os.path.basename(sys.argv[0]) == console_script else f"python -m {module}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error contract (one line, exit status 2) and defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_USAGE)
