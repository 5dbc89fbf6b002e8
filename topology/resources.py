"""Named things shipped with skippipe (model specs, training configs, topology YAMLs), found from anywhere.

A checkout keeps them in the repository's top-level ``configs/`` folder; an installed package (``pip
install .``, not editable) ships the same files as ``skippipe/configs/`` (pyproject.toml maps the package
``skippipe.configs`` onto ``configs/``, so nothing is copied by hand). This module sits in ``topology``,
the lowest layer, because ``topology.model_spec`` needs it and ``topology`` imports neither torch nor
``skippipe``; it only reads files.

A user's argument is looked up in this order:

1. a file at that path, relative to the current directory (``--model my/model.yaml``);
2. a name (``llama-500m``, ``debug``, ``emulated-8``): ``<configs>/<kind folder>/<name>.yaml``;
3. a repository-relative path such as ``configs/models/llama-500m.yaml`` typed outside the checkout (the
   README's and the config files' own spelling): the same file under the shipped ``configs`` folder.
"""
from __future__ import annotations

from pathlib import Path

from topology.errors import ConfigError

# kind -> (folder under configs/, what the error message calls it)
KINDS = {"model": ("models", "model file"), "config": ("train", "config file"), "topology": ("topologies", "topology file")}


def configs_dir() -> Path:
    """The folder holding models/, train/ and topologies/: the installed package data, else the checkout's.

    Raises ConfigError when neither exists (a broken install).
    """
    root = Path(__file__).resolve().parent.parent  # site-packages, or the checkout's root
    for candidate in (root / "skippipe" / "configs", root / "configs"):
        if (candidate / "models").is_dir():
            return candidate
    raise ConfigError(f"skippipe's configs folder is missing (looked in {root / 'skippipe' / 'configs'} and "
                      f"{root / 'configs'}); reinstall the package with pip install .")


def names(kind: str) -> list[str]:
    """The names of the shipped files of one kind ('model', 'config' or 'topology'), sorted."""
    return sorted(p.stem for p in (configs_dir() / KINDS[kind][0]).glob("*.yaml"))


def find(kind: str, text: str | Path) -> Path | None:
    """The file `text` names (module docstring for the order), or None when there is none.

    An existing path is returned as it is, even a directory, so that the reader's own error says what
    is wrong with it.
    """
    path = Path(text).expanduser()
    if path.exists():
        return path
    shipped = configs_dir()
    named = shipped / KINDS[kind][0] / f"{text}.yaml"
    if len(path.parts) == 1 and named.is_file():  # a name may hold a dot: llama-1.5b
        return named
    if not path.is_absolute() and path.parts[:1] == ("configs",) and len(path.parts) > 1:
        candidate = shipped.joinpath(*path.parts[1:])
        if candidate.is_file():
            return candidate
    return None


def resolve(kind: str, text: str | Path) -> Path:
    """Like :func:`find`, but a missing file raises ConfigError listing the names that do exist."""
    path = find(kind, text)
    if path is None:
        raise ConfigError(f"{KINDS[kind][1]} not found: {text}; pass a path or one of: {', '.join(names(kind))}")
    return path
