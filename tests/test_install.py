"""`pip install .` (not editable) into a fresh venv, then every command from a directory outside the checkout.

The venv reuses this interpreter's torch and other dependencies through a .pth line (nothing
downloads) and installs a copy of the repository's package files with --no-deps --no-build-isolation,
so the installed package has only what pyproject.toml ships: a model, config or scenario found by name
here proves that it is package data, not a file beside the source. About 45-60 s on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FILES = ("pyproject.toml", "README.md", "configs", "skippipe", "topology", "scheduler")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A venv with skippipe installed from a copy of the checkout; returns its bin dir, env and a scratch dir."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    for name in PACKAGE_FILES:  # a copy: the build writes build/ and *.egg-info beside the sources
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, source / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # This interpreter's libraries (torch, pip, setuptools, ...) after the venv's own, which come first.
    shared = {str(Path(torch.__file__).resolve().parent.parent), *(p for p in sys.path if p.endswith("site-packages"))}
    (site / "_shared_libraries.pth").write_text("\n".join(sorted(shared)) + "\n")
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, cwd=base, timeout=120)
    shutil.rmtree(source)  # nothing of the checkout is left to find
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    scratch = base / "scratch"
    scratch.mkdir()
    return {"bin": venv / "bin", "env": env, "scratch": scratch, "site": site}


def run(installed: dict, *argv: str, timeout: float = 120) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=installed["scratch"], env=installed["env"],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_installed_package_runs_from_anywhere(installed):
    bin_dir, scratch = installed["bin"], installed["scratch"]
    located = run(installed, bin_dir / "python", "-c", "import skippipe, topology, scheduler; "
                  "print(skippipe.__file__, topology.__file__, scheduler.__file__)")
    assert all(path.startswith(str(installed["site"])) for path in located.split()), located
    assert (installed["site"] / "skippipe" / "configs" / "models" / "llama-500m.yaml").is_file()

    # Every module of the checkout's packages is installed (the commands import the emulation and the
    # experiments only when they run, so --help alone would not notice a package left out).
    checkout = {p.relative_to(ROOT).as_posix() for name in ("skippipe", "topology", "scheduler")
                for p in (ROOT / name).rglob("*.py")}
    shipped = {p.relative_to(installed["site"]).as_posix() for name in ("skippipe", "topology", "scheduler")
               for p in (installed["site"] / name).rglob("*.py")}
    assert checkout - shipped == set()
    run(installed, bin_dir / "python", "-c", "import skippipe.experiments.overhead, skippipe.experiments.omission_study, "
        "skippipe.emulation.chaos, skippipe.emulation.emulate, skippipe.evaluation.export")

    listing = run(installed, bin_dir / "python", "-m", "skippipe", "--help")
    for command in ("train", "evaluate", "export", "omission-study", "emulate-cluster", "bench-overhead", "chaos",
                    "topology", "scheduler"):
        assert f"\n  {command} " in listing
        assert "usage:" in run(installed, bin_dir / f"skippipe-{command}", "--help")

    # The README's plan, by model name, from a directory that is not the checkout: the baseline plan.
    out = run(installed, bin_dir / "skippipe-scheduler", "solve", "--topology", "gcp-12-regions", "--nodes", "20",
              "--stage-sizes", "5,3,3,3,3,3", "--model", "llama-500m", "--microbatch-size", "8", "--microbatches", "30",
              "--memory", "3", "--skip-ratio", "0.33", "--out", "plan.json")
    assert "predicted iteration 78.228 s" in out
    assert hashlib.md5((scratch / "plan.json").read_bytes()).hexdigest() == "e1fb0a81e867c79f8854258e73a6a530"
    out = run(installed, bin_dir / "skippipe-topology", "simulate", "--topology", "gcp-12-regions", "--nodes", "20",
              "--plan", "plan.json", "--json", "report.json", "--plot", "gantt.png")
    assert json.loads((scratch / "report.json").read_text())["iteration_s"] == pytest.approx(78.228, abs=1e-3)
    assert (scratch / "gantt.png").stat().st_size > 10_000

    # Training under torchrun with three ranks (three stages, skip ratio 0.33: paths of two stages), the
    # shipped config by name, the installed console command as the worker (--no-python).
    run(installed, bin_dir / "python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
        "--no-python", "skippipe-train", "--config", "debug", "--skip-ratio", "0.33", "--steps", "3", "--run-dir",
        "runs/a", "schedule.num_nodes=3", "schedule.num_stages=3", "schedule.stage_sizes=1,1,1",
        "schedule.topology=single-cluster", "train.eval_batches=1", timeout=240)
    steps = [json.loads(line) for line in (scratch / "runs/a/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
    assert {len(p["stages"]) for p in json.loads((scratch / "runs/a/plan.json").read_text())["paths"]} == {2}

    out = run(installed, bin_dir / "skippipe-evaluate", "--checkpoint", "runs/a", "--keep", "1.0,0.67",
              "--batches", "2", "--json", "eval/e.json")
    assert "eval/e.json" in out
    rows = json.loads((scratch / "eval/e.json").read_text())["results"]
    assert [r["num_kept"] for r in rows] == [3, 2]
    out = run(installed, bin_dir / "skippipe-export", "--checkpoint", "runs/a", "--out", "hf")
    weights = scratch / "hf" / "model.safetensors"
    assert str(weights.relative_to(scratch)) in out
    assert stat.S_IMODE(weights.stat().st_mode) & 0o044 == 0o044  # readable by others (umask 022: 0644)
