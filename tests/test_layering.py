"""One-way layering: the runtime (skippipe/ outside skippipe/emulation/) never imports the emulation.

Two checks, since each misses what the other sees: a fresh interpreter imports every runtime module and
then no skippipe.emulation module may be loaded (catches imports hidden behind helpers); and no import
statement in a runtime file names the emulation package (catches imports inside functions, which a plain
import does not execute).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATION = "skippipe.emulation"


def runtime_modules() -> list[str]:
    """Every module under skippipe/ except the emulation subpackage, by dotted name."""
    out = []
    for path in sorted((ROOT / "skippipe").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[:2] == ("skippipe", "emulation"):
            continue
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


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
    assert not any(m.startswith(EMULATION) for m in modules)


def test_importing_the_runtime_loads_no_emulation_module():
    code = (f"import importlib, json, sys\n"
            f"for name in {runtime_modules()!r}:\n"
            f"    importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m == {EMULATION!r} or m.startswith({EMULATION + '.'!r}))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_runtime_file_imports_the_emulation():
    offenders = [f"{path.relative_to(ROOT)}: {name}"
                 for path in sorted((ROOT / "skippipe").rglob("*.py")) if "emulation" not in path.parts
                 for name in imported_names(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1]))
                 if name == EMULATION or name.startswith(EMULATION + ".")]
    assert offenders == []


def test_the_scan_sees_imports_inside_functions_and_relative_ones():
    """The static check catches what the runtime check cannot: an import run only when called."""
    late = "def late():\n    from skippipe.emulation.latency import LinkLatency\n"
    assert "skippipe.emulation.latency" in imported_names(late, "skippipe")
    assert "skippipe.emulation" in imported_names("from . import emulation\n", "skippipe")
    assert "skippipe.emulation.netns" in imported_names("from ..emulation import netns\n", "skippipe.evaluation")
