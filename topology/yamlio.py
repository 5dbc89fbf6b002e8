"""Reading YAML/JSON files into plain dicts with errors that name the file."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from topology.errors import ConfigError


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` and `1.0e14` as floats.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, so it loads `flops: 1.0e14` or
    `norm_eps: 1e-6` as *strings*; YAML 1.2 and JSON read them as numbers, and so do people.
    """


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml_text(text: str):
    """yaml.safe_load with YAML 1.2 floats (see Loader)."""
    return yaml.load(text, Loader=Loader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}; check the path")
    try:
        data = load_yaml_text(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where} ({getattr(exc, 'problem', exc)}); fix its syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; pass a YAML file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}; check the path")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); fix its syntax or write it again") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; pass a JSON file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def check_keys(data: dict, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    """Unknown keys are errors (typos must not pass silently); required keys must be present."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
