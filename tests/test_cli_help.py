"""Every flag of every command has help with its default, and the README's command reference lists exactly
the flags the parsers have; `python -m skippipe` lists every command; the torchrun launch notice."""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from skippipe.commands import COMMANDS
from skippipe.launch_notice import notice

ROOT = Path(__file__).resolve().parent.parent


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """'train', 'topology show', 'scheduler solve', ... -> its parser."""
    out = {}
    for name, (module, _) in COMMANDS.items():
        parser = importlib.import_module(module).build_parser()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            out.update({f"{name} {sub}": p for sub, p in subs[0].choices.items()})
        else:
            out[name] = parser
    return out


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings
            if s.startswith("--")}


def readme_reference() -> dict[str, set[str]]:
    """The README's "## Command reference" table: command (without skippipe-) -> the flags its row names."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `skippipe-"):
            continue
        cell = line.split(" | ")[0].strip("| ").replace("\\|", "|")
        words = cell.strip("`").split()
        name = words[0].removeprefix("skippipe-")
        if name in ("topology", "scheduler"):
            name = f"{name} {words[1]}"
        assert name not in rows, f"the command reference has two rows for {name}"
        rows[name] = set(re.findall(r"--[a-z][a-z0-9-]*", cell))
    return rows


def test_readme_command_reference_matches_the_parsers():
    parsers, rows = command_parsers(), readme_reference()
    assert set(rows) == set(parsers), f"rows without a command: {set(rows) - set(parsers)}; " \
                                      f"commands without a row: {set(parsers) - set(rows)}"
    for name, parser in parsers.items():
        assert flags(parser) - rows[name] == set(), f"{name}: flags missing from the README's row"
        assert rows[name] - flags(parser) == set(), f"{name}: the README's row names flags the command lacks"


def test_every_flag_has_help_with_its_default():
    for name, parser in command_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            shown = formatter._get_help_string(action) % {"default": action.default}
            if action.option_strings and action.default is not None and action.default is not False:
                assert str(action.default) in shown or "default" in shown, f"{name} {action.option_strings}: {shown}"
            elif action.option_strings and action.default is None and not action.required:
                # Nothing to show: the help says what happens without the flag.
                assert "default" in shown, f"{name} {action.option_strings}: help does not say the default: {shown}"


def test_stages_and_stage_sizes_say_how_they_combine():
    for name in ("scheduler solve", "scheduler compare"):
        text = " ".join(command_parsers()[name].format_help().split())
        assert "with --stage-sizes as well, the two must agree" in text
        assert "use it or --stages, or both if they agree" in text


def test_python_m_skippipe_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "skippipe", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for name in COMMANDS:
        assert f"\n  {name} " in result.stdout
    bad = subprocess.run([sys.executable, "-m", "skippipe", "trian"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown command 'trian'")


def test_launch_notice_names_the_nodes_and_the_endpoint():
    # The mission's command as typed: the static rendezvous on localhost, which needs the hint.
    lines = notice(["--nnodes", "8", str(ROOT / "scripts" / "train.py"), "--skip-ratio", "0.25"])
    assert lines[0].startswith("skippipe: waiting for 8 nodes to join the rendezvous at 127.0.0.1:29500")
    assert "--rdzv-endpoint HOST:PORT" in lines[1]
    lines = notice(["--nnodes", "8", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    "10.0.0.1:29400", "--rdzv-id", "job7", "--no-python", "skippipe-train", "--skip-ratio", "0.25"])
    assert lines == [lines[0]] and "at 10.0.0.1:29400 (backend c10d, job id 'job7')" in lines[0]
    assert notice(["--nnodes", "2", "-m", "skippipe", "train"])  # python -m skippipe train
    # One machine, or another program: nothing.
    assert notice(["--standalone", "--nproc-per-node", "8", str(ROOT / "scripts" / "train.py")]) == []
    assert notice(["--nnodes", "8", "somebody_elses_train.py"]) == []
    assert notice(["--nnodes", "not-a-number", "skippipe-train"]) == []
