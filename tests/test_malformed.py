"""Bad input everywhere: every malformed file of tests/malformed/, run through the command that would meet it.

tests/malformed/cases.yaml lists the cases: a command line, the file it feeds, and what the one error line
must say. Every case must end with exit status 2, exactly one line on stderr and that line starting with
`error:` (stdout may hold other output), no traceback, and nothing overwritten: the corpus, the run dir
and the output folders a command is pointed at are byte-identical before and after, with no file added
or removed.

Most cases run in-process through the command's main() (an escaping exception is a traceback); the
cases marked `subprocess: true` run as real processes, so that the whole path to the terminal is checked
once per command: interpreter start, imports, warnings, exit status. SKIPPIPE_MALFORMED_SUBPROCESS=1 runs
every case as a process (slow: a few seconds each).

Placeholders in a command: {m} the corpus folder; {run} a fresh copy of a 1-step run (its checkpoint
step 1 made once per session by scripts/train.py), altered first by the case's `checkpoint` edits;
{export} a folder that already holds an export; {out} an empty scratch folder.
"""
from __future__ import annotations

import hashlib
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "malformed"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())["cases"]
SCRIPTS = {"train": "scripts/train.py", "evaluate": "scripts/evaluate.py", "export": "scripts/export.py",
           "prepare_data": "scripts/prepare_data.py", "train_tokenizer": "scripts/train_tokenizer.py",
           "import_hf": "scripts/import_hf.py"}


def checksums(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A 1-step single-process run of the corpus's good config: checkpoint step 1."""
    run_dir = tmp_path_factory.mktemp("malformed") / "run"
    threads = torch.get_num_threads()
    try:
        code, out, err = run_in_process("train", ["--config", "tests/malformed/good/train.yaml", "--run-dir",
                                                  str(run_dir)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and (run_dir / "checkpoints" / "latest").is_file(), err
    return run_dir


# --- checkpoint edits ----------------------------------------------------------------------------------

def _folder(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def _other_model_weights(stage: int) -> dict[str, torch.Tensor]:
    """The same stage of another model (llama-tiny: other widths, other layer count)."""
    from skippipe.model import FullModel
    from topology.model_spec import load_model_spec
    model = FullModel(load_model_spec("llama-tiny"), 3, 0)
    return {k: v.detach().clone().contiguous() for k, v in model.stages[stage].state_dict().items()}


class Payload:
    """Unpickling this would create a file: loading must never get that far."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def edit_checkpoint(run_dir: Path, edits: list[dict]) -> None:
    from safetensors.torch import load, save_file

    def load_file(path: str) -> dict[str, torch.Tensor]:  # into memory: the file is about to be replaced
        return load(Path(path).read_bytes())
    folder = _folder(run_dir)
    for edit in edits:
        (kind, arg), = edit.items()
        if kind == "truncate":  # keep the first half of the file
            path = folder / arg
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
        elif kind == "delete":
            (folder / arg).unlink()
        elif kind == "write":  # {name: text}; `latest` is beside the step folders
            for name, text in arg.items():
                (run_dir / "checkpoints" / name if name == "latest" else folder / name).write_text(text)
        elif kind == "reshape":  # every tensor one row longer: the right names, the wrong shapes
            weights = load_file(str(folder / arg))
            save_file({k: torch.cat([v, v[:1]]) for k, v in weights.items()}, str(folder / arg))
        elif kind == "other_model":  # {file: stage} from llama-tiny
            for name, stage in arg.items():
                save_file(_other_model_weights(stage), str(folder / name))
        elif kind == "pickle":  # the stage's weights, pickled by torch.save under the safetensors name
            torch.save(load_file(str(folder / arg)), folder / arg)
        elif kind == "payload":  # a pickle that would run code, under this name
            torch.save({"state": {}, "param_groups": [], "x": Payload(str(run_dir / "PWNED"))}, folder / arg)
        elif kind == "reshape_optim":  # AdamW moments one row longer: the right counts, the wrong shapes
            state = torch.load(folder / arg, weights_only=True)
            for moments in state["state"].values():
                for key in ("exp_avg", "exp_avg_sq"):
                    moments[key] = torch.cat([moments[key], moments[key][:1]])
            torch.save(state, folder / arg)
        elif kind == "nan":  # the file's first tensor gets a NaN: what a diverged run would have saved
            weights = load_file(str(folder / arg))
            weights[sorted(weights)[0]].view(-1)[0] = float("nan")
            save_file(weights, str(folder / arg))
        elif kind == "tensor":  # {file: a torch.save'd tensor in place of the expected dict}
            for name in arg:
                torch.save(torch.zeros(3), folder / name)
        else:
            raise AssertionError(f"unknown checkpoint edit {kind!r}")


# --- running a command ----------------------------------------------------------------------------------

_SCRIPT_MAINS: dict = {}


def _main(tool: str):
    if tool == "scheduler":
        from scheduler.cli import main
        return main
    if tool == "topology":
        from topology.cli import main
        return main
    if tool not in _SCRIPT_MAINS:
        _SCRIPT_MAINS[tool] = runpy.run_path(str(ROOT / SCRIPTS[tool]), run_name="malformed_case")["main"]
    return _SCRIPT_MAINS[tool]


def run_in_process(tool: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `tool argv` run through its main() in this process."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    code = 0
    try:
        os.chdir(ROOT)
        sys.argv = [SCRIPTS.get(tool, tool)] + argv
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main = _main(tool)
                main(argv) if tool in ("scheduler", "topology") else main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, out.getvalue(), err.getvalue()


def run_subprocess(tool: str, argv: list[str], env: dict) -> tuple[int, str, str]:
    command = [sys.executable, SCRIPTS[tool]] if tool in SCRIPTS else [sys.executable, "-m", tool]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(command + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


# --- the table ----------------------------------------------------------------------------------------

def test_the_corpus_is_complete():
    """At least 30 malformed inputs, every corpus file used by some case, ids unique, every kind covered."""
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    used = {c["file"] for c in CASES if "file" in c}
    files = {p.name for p in CORPUS.iterdir() if p.is_file() and p.name != "cases.yaml"}
    assert files == used, f"unused: {sorted(files - used)}; missing: {sorted(used - files)}"
    kinds = {c["id"].split("-")[0] for c in CASES}
    assert {"config", "topo", "plan", "model", "ckpt", "tok", "data", "hf"} <= kinds
    assert {c["command"].split()[0] for c in CASES} == {"train", "evaluate", "export", "scheduler", "topology",
                                                        "prepare_data", "train_tokenizer", "import_hf"}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_malformed_input(case, base_run, tmp_path, monkeypatch):
    run_dir, export_dir, out_dir = tmp_path / "run", tmp_path / "export", tmp_path / "out"
    shutil.copytree(base_run, run_dir)
    edit_checkpoint(run_dir, case.get("checkpoint", []))
    export_dir.mkdir()
    (export_dir / "model.safetensors").write_bytes(b"an earlier export")
    (export_dir / "config.json").write_text("{}\n")
    out_dir.mkdir()
    places = {"m": "tests/malformed", "run": str(run_dir), "export": str(export_dir), "out": str(out_dir),
              "file": f"tests/malformed/{case.get('file', '')}"}
    tool, *argv = [part.format(**places) for part in case["command"].split()]
    watched = (CORPUS, run_dir, export_dir, out_dir)
    before = checksums(*watched)

    env = {k: str(v) for k, v in case.get("env", {}).items()}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    if case.get("subprocess") or os.environ.get("SKIPPIPE_MALFORMED_SUBPROCESS") == "1":
        code, out, err = run_subprocess(tool, argv, env)
    else:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        threads = torch.get_num_threads()
        try:
            code, out, err = run_in_process(tool, argv)
        finally:
            torch.set_num_threads(threads)

    assert "Traceback" not in out + err, err
    assert code == 2, f"exit status {code}; stderr: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr must be one error line, got: {err!r}"
    assert re.search(case["error"], lines[0]), f"{lines[0]!r} does not say {case['error']!r}"
    assert checksums(*watched) == before, "a malformed input changed, added or removed files"
    assert not (run_dir / "PWNED").exists(), "a pickle in the checkpoint ran code"
