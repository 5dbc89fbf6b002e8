"""One-way layering: the runtime never imports the rooms built on it.

The runtime is skippipe/ outside three rooms: skippipe/emulation/ (the emulated cluster), skippipe/experiments/
(measurements about skippipe: overhead benchmark, omission study) and skippipe/commands/ (the command-line
programs, with skippipe/__main__.py that dispatches to them). The rooms import the runtime, never the reverse.

Two checks, since each misses what the other sees: a fresh interpreter imports every runtime module and
then no module of a room may be loaded (catches imports hidden behind helpers); and no import statement
in a runtime file names a room (catches imports inside functions, which a plain import does not execute).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("skippipe.emulation", "skippipe.experiments", "skippipe.commands")
# Entry points outside any room's folder that belong to the command layer.
COMMAND_FILES = ("skippipe.__main__",)


def in_room(module: str) -> bool:
    """Whether a dotted module name is one of the rooms, or inside one, or a command-layer file."""
    return module in COMMAND_FILES or any(module == room or module.startswith(room + ".") for room in ROOMS)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_files() -> list[Path]:
    """Every file under skippipe/ outside the rooms."""
    return [path for path in sorted((ROOT / "skippipe").rglob("*.py")) if not in_room(module_name(path))]


def runtime_modules() -> list[str]:
    """Every runtime module, by dotted name."""
    return [module_name(path) for path in runtime_files()]


def imported_names(source: str, package: str) -> list[str]:
    """The modules every import statement in `source` names; relative imports resolved from `package`."""
    tree = ast.parse(source)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_the_runtime_modules_are_found():
    modules = runtime_modules()
    assert {"skippipe.trainer", "skippipe.executors", "skippipe.comm", "skippipe.context", "skippipe.elastic",
            "skippipe.profiling", "skippipe.checkpoint", "skippipe.evaluation.omission"} <= set(modules)
    assert not any(in_room(m) for m in modules)
    # Each room exists, so that the checks below look at something.
    every = {module_name(path) for path in (ROOT / "skippipe").rglob("*.py")}
    assert {"skippipe.emulation.latency", "skippipe.experiments.overhead", "skippipe.commands.train",
            "skippipe.__main__"} <= every


def test_importing_the_runtime_loads_no_room_module():
    code = (f"import importlib, json, sys\n"
            f"for name in {runtime_modules()!r}:\n"
            f"    importlib.import_module(name)\n"
            f"rooms, files = {ROOMS!r}, {COMMAND_FILES!r}\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m in files or "
            f"any(m == r or m.startswith(r + '.') for r in rooms))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_runtime_file_imports_a_room():
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in runtime_files()
                 for name in imported_names(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1]))
                 if in_room(name)]
    assert offenders == []


def test_the_scan_sees_imports_inside_functions_and_relative_ones():
    """The static check catches what the runtime check cannot: an import run only when called."""
    late = "def late():\n    from skippipe.emulation.latency import LinkLatency\n"
    assert "skippipe.emulation.latency" in imported_names(late, "skippipe")
    assert "skippipe.emulation" in imported_names("from . import emulation\n", "skippipe")
    assert "skippipe.emulation.netns" in imported_names("from ..emulation import netns\n", "skippipe.evaluation")
    assert in_room("skippipe.experiments.overhead") and in_room("skippipe.commands") and in_room("skippipe.__main__")
    assert not in_room("skippipe.experimental") and not in_room("skippipe.trainer")


def test_the_scan_flags_a_runtime_file_importing_a_room():
    """The static check would fail on a runtime module that reaches for an experiment or a command."""
    bad = "def report():\n    from skippipe.experiments import overhead\n    from skippipe.commands.train import main\n"
    assert [n for n in imported_names(bad, "skippipe") if in_room(n)] == [
        "skippipe.experiments", "skippipe.experiments.overhead", "skippipe.commands.train", "skippipe.commands.train.main"]
