"""Nothing lost, nothing silently wrong (issue 15): one test per case, each run as a real command.

1. a fresh run into a run dir that holds a run is refused (and every other folder a command fills);
2. --resume with a changed fixed setting is refused, naming it;
3. a checkpoint records its model spec and tokenizer; readers build from it;
4. a non-finite step stops the run, `latest` stays the last good checkpoint; non-finite weights are refused;
5. a validation loss never measured is null, never 0.0;
6. a malformed tokenizer.json is one line naming it, exit 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
GOOD = "tests/malformed/good/train.yaml"  # the corpus-tiny model on a 3-node hand plan: steps take milliseconds
SCRIPTS = {"train": "scripts/train.py", "evaluate": "scripts/evaluate.py", "export": "scripts/export.py",
           "study": "scripts/omission_study.py", "emulate": "scripts/emulate_cluster.py"}


def run(tool: str, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, SCRIPTS[tool], *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def train(run_dir: Path, *args: str) -> tuple[int, str, str]:
    return run("train", "--config", GOOD, "--run-dir", run_dir, *args)


def checksums(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(code: int, err: str, pattern: str) -> str:
    """Exit 2, exactly one `error:` line on stderr, matching `pattern`; returns the line."""
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], f"{lines[0]!r} does not say {pattern!r}"
    return lines[0]


def steps_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory) -> Path:
    """A finished run up to step 5 with checkpoints at 3 and 5 (the issue's reproduction)."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    code, _, err = train(run_dir, "--steps", "5", "train.checkpoint_every=3")
    assert code == 0, err
    return run_dir


# --- 1. a run dir that holds a run -----------------------------------------------------------------------

def test_fresh_run_into_an_occupied_run_dir_is_refused_and_overwrite_replaces_it(five_steps, tmp_path):
    run_dir = tmp_path / "run"
    import shutil
    shutil.copytree(five_steps, run_dir)
    before = checksums(run_dir)
    code, _, err = train(run_dir, "--steps", "3", "--seed", "7")
    one_error(code, err, f"--run-dir {run_dir} holds a run up to step 5; pass --resume to continue it, "
                         f"another --run-dir, or --overwrite")
    assert checksums(run_dir) == before  # byte for byte, no file added or removed
    # --overwrite is explicit: the old run's files go, the new run is the only one there.
    code, _, err = train(run_dir, "--steps", "3", "--seed", "7", "--overwrite")
    assert code == 0, err
    assert steps_of(run_dir) == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_000003"]
    code, _, err = train(run_dir, "--steps", "4", "--resume", "--overwrite")
    one_error(code, err, "--resume continues the run in the run dir and --overwrite deletes it; pass one of them")


def test_export_evaluate_and_study_refuse_filled_outputs(five_steps, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier export")
    code, _, err = run("export", "--checkpoint", five_steps, "--out", out)
    one_error(code, err, f"--out {out} is not empty (it holds model.safetensors)")
    assert (out / "model.safetensors").read_bytes() == b"an earlier export"
    code, _, err = run("export", "--checkpoint", five_steps, "--out", out, "--overwrite")
    assert code == 0 and json.loads((out / "config.json").read_text())["model_type"] == "llama", err

    report = tmp_path / "eval.json"
    report.write_text("{\"earlier\": true}\n")
    code, _, err = run("evaluate", "--checkpoint", five_steps, "--batches", "1", "--json", report)
    one_error(code, err, f"--json {report} already exists; pass another path, or --overwrite")
    assert report.read_text() == "{\"earlier\": true}\n"

    # The omission study refuses before it trains anything.
    study = tmp_path / "study"
    import shutil
    shutil.copytree(five_steps, study / "skip")
    before = checksums(study)
    code, _, err = run("study", "--out", tmp_path / "study.json", "--run-dir", study, "--config", GOOD,
                       "--stages", "3", "--skip-ratio", "0.33")
    one_error(code, err, f"--run-dir {study} holds a run up to step 5 in skip/")
    assert checksums(study) == before and not (tmp_path / "study.json").exists()


def test_emulated_cluster_refuses_a_filled_work_dir_before_building_the_cluster(five_steps, tmp_path):
    import shutil
    work = tmp_path / "emulate"
    shutil.copytree(five_steps, work / "skip0.25")
    before = checksums(work)
    code, _, err = run("emulate", "--topology", "configs/topologies/emulated-8.yaml", "--skip-ratios", "0.25,0",
                       "--work-dir", work, "--out", tmp_path / "r.json")
    one_error(code, err, f"--work-dir {work} holds a run up to step 5 in skip0.25/")
    assert checksums(work) == before


def test_an_elastic_restart_of_the_same_job_continues_but_a_new_job_is_refused(tmp_path):
    from skippipe.elastic import decide_resume
    from topology.errors import ConfigError
    run_dir = tmp_path / "run"
    assert not decide_resume(run_dir, explicit=False, run_id="job1")  # a new job in an empty run dir
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # it trained a step, then lost a node
    assert not decide_resume(run_dir, explicit=False, run_id="job1")  # restarted: its own run dir, not refused
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step_000002\n")
    assert decide_resume(run_dir, explicit=False, run_id="job1")  # restarted after a checkpoint: continues
    with pytest.raises(ConfigError, match="holds a run up to step 2; pass --resume"):
        decide_resume(run_dir, explicit=False, run_id="job2")  # another job: refused, nothing written
    assert json.loads((run_dir / "elastic.json").read_text())["run_id"] == "job1"


# --- 2. --resume with a changed fixed setting ------------------------------------------------------------

@pytest.mark.parametrize("change, pattern", [
    (["--skip-ratio", "0.5"], "schedule.skip_ratio is 0.0 in the checkpoint"),
    (["--seed", "7"], "train.seed is 0 in the checkpoint"),
    (["schedule.num_microbatches=16"], "schedule.num_microbatches is 8 in the checkpoint"),
    (["data.val_fraction=0.2"], "data.val_fraction is 0.05 in the checkpoint"),
])
def test_resume_refuses_a_changed_fixed_setting(five_steps, tmp_path, change, pattern):
    before = checksums(five_steps)
    code, _, err = train(five_steps, "--steps", "6", "--resume", *change)
    line = one_error(code, err, pattern)
    assert "now; a resumed run keeps it" in line and "another --run-dir" in line
    assert checksums(five_steps) == before


def test_resume_may_change_steps_and_cadence_and_saves_what_ran(five_steps, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(five_steps, run_dir)
    code, _, err = train(run_dir, "--steps", "6", "--resume", "train.log_every=2", "train.eval_every=3",
                         "train.comm_timeout_s=60")
    assert code == 0, err
    assert steps_of(run_dir) == [1, 2, 3, 4, 5, 6]
    from skippipe.config import load_config
    saved = load_config(run_dir / "config.yaml")
    assert (saved.train.steps, saved.train.log_every, saved.schedule.skip_ratio) == (6, 2, 0.0)


# --- 3. the checkpoint records its model and tokenizer ---------------------------------------------------

def _good_config_with(tmp_path: Path, **model_changes) -> Path:
    """The good config, with its model YAML copied beside it (so a test can edit it)."""
    import yaml
    model = yaml.safe_load((ROOT / "tests/malformed/good/model.yaml").read_text())
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**model, **model_changes}))
    cfg = yaml.safe_load((ROOT / GOOD).read_text())
    cfg["model"] = str(tmp_path / "model.yaml")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "train.yaml"


def test_readers_build_the_recorded_model_and_resume_refuses_an_edited_one(tmp_path):
    config = _good_config_with(tmp_path)
    run_dir = tmp_path / "run"
    code, _, err = run("train", "--config", config, "--run-dir", run_dir, "--steps", "2")
    assert code == 0, err
    meta = json.loads((run_dir / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["model"]["rope_theta"] == 10000.0 and meta["tokenizer"] == {"name": "byte", "vocab_size": 256,
                                                                             "sha256": None}
    code, before, err = run("evaluate", "--checkpoint", run_dir, "--keep", "1.0", "--batches", "2")
    assert code == 0, err
    # Edit the model YAML after training: the readers still build what the checkpoint holds ...
    _good_config_with(tmp_path, rope_theta=500000.0)
    code, after, err = run("evaluate", "--checkpoint", run_dir, "--keep", "1.0", "--batches", "2")
    assert code == 0, err
    def perplexity(out: str) -> list[str]:  # the ppl column of the keep-1.0 row (tok/s varies run to run)
        return [line.split("|")[3] for line in out.splitlines() if line.startswith("1.00 |")]
    assert perplexity(before) and perplexity(before) == perplexity(after)
    from skippipe.checkpoint import load_full_model
    assert load_full_model(run_dir)[0].spec.rope_theta == 10000.0  # the spec the checkpoint holds, not the YAML's
    code, _, err = run("export", "--checkpoint", run_dir, "--out", tmp_path / "hf")
    assert code == 0 and json.loads((tmp_path / "hf" / "config.json").read_text())["rope_theta"] == 10000.0, err
    # ... and a resume with the edited model is refused, naming the field and both values.
    before_files = checksums(run_dir)
    code, _, err = run("train", "--config", config, "--run-dir", run_dir, "--steps", "3", "--resume")
    one_error(code, err, "has rope_theta 500000.0 but the checkpoint")
    assert "holds a model with rope_theta 10000.0" in err and checksums(run_dir) == before_files


def test_a_changed_tokenizer_file_is_refused_and_old_checkpoints_fall_back(tmp_path):
    from skippipe.evaluation.export import byte_tokenizer
    tokenizer = tmp_path / "tokenizer.json"
    byte_tokenizer().save(str(tokenizer))
    run_dir = tmp_path / "run"
    code, _, err = train(run_dir, "--steps", "1", f"data.tokenizer={tokenizer}")
    assert code == 0, err
    folder = run_dir / "checkpoints" / "step_000001"
    recorded = json.loads((folder / "meta.json").read_text())["tokenizer"]
    assert recorded["sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    data = json.loads(tokenizer.read_text())
    data["model"]["vocab"] = {f"<0x{b:02X}>": 255 - b for b in range(256)}  # the same size, other ids
    tokenizer.write_text(json.dumps(data))
    code, _, err = run("evaluate", "--checkpoint", run_dir, "--batches", "1")
    one_error(code, err, f"tokenizer {str(tokenizer)!r} has sha256")
    # A checkpoint from before specs were recorded: built from its config's model, with one warning.
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({k: meta[k] for k in ("step", "num_stages", "num_nodes")}))
    byte_tokenizer().save(str(tokenizer))
    code, out, err = run("evaluate", "--checkpoint", run_dir, "--keep", "1.0", "--batches", "1")
    assert code == 0 and "records no model spec" in err and "1.00 | even" in out, err


# --- 4. non-finite steps and weights ---------------------------------------------------------------------

def test_a_non_finite_step_stops_the_run_and_the_last_good_checkpoint_stays_latest(tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = train(run_dir, "--steps", "4", "optim.lr=1e20", "optim.warmup_steps=0",
                           "train.checkpoint_every=1")
    line = one_error(code, err, "step 2: non-finite gradient norm nan (loss non-finite in microbatch(es) ")
    assert "gradients non-finite in stage(s) 0" in line and "step_000001 stays latest" in line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert not (run_dir / "checkpoints" / "step_000002").exists() and steps_of(run_dir) == [1]
    for path in (run_dir / "checkpoints" / "step_000001").glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_skip_policy_skips_the_update_and_logs_null(tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = train(run_dir, "--steps", "3", "optim.lr=1e20", "optim.warmup_steps=0", "train.nonfinite=skip")
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records] == [None, True, True]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None  # NaN is not JSON: null, and `skipped`
    assert "update skipped (non-finite, train.nonfinite=skip)" in out


@pytest.mark.parametrize("tool", ["evaluate", "export"])
def test_evaluate_and_export_refuse_non_finite_weights(five_steps, tmp_path, tool):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(five_steps, run_dir)
    path = run_dir / "checkpoints" / "step_000005" / "stage1.safetensors"
    weights = load_file(str(path))
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, str(path))
    args = ["--out", tmp_path / "hf"] if tool == "export" else ["--batches", "1"]
    code, _, err = run(tool, "--checkpoint", run_dir, *args)
    one_error(code, err, f"{path}: tensor {name!r} holds non-finite values")
    assert not (tmp_path / "hf").exists()


# --- 5. a validation loss never measured ------------------------------------------------------------------

@pytest.mark.parametrize("setting, hint", [
    ("train.eval_batches=0", "train.eval_batches is 0; set it to 1 or more"),
    ("data.corpus={small}", "has 1 window(s) of 16 tokens, fewer than one microbatch of 2; raise data.val_fraction"),
])
def test_an_unmeasured_validation_loss_is_null_with_a_warning(tmp_path, setting, hint):
    run_dir = tmp_path / "run"
    small = tmp_path / "small.txt"  # 300 bytes: the held-out split is one window, a microbatch needs two
    small.write_text("A small corpus of a few sentences, too short for a validation batch. " * 4 + "x" * 16)
    setting = setting.format(small=small)
    code, out, err = train(run_dir, "--steps", "2", "train.eval_every=1", setting)
    assert code == 0, err
    assert err.startswith("warning: no validation batch: ") and hint in err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records] == [None, None]
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("val n/a" in line and "val 0.0" not in line for line in lines)


def test_a_measured_validation_loss_is_logged(tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = train(run_dir, "--steps", "1")
    assert code == 0 and "warning" not in err, err
    record = json.loads((run_dir / "metrics.jsonl").read_text())
    assert record["val_loss"] > 0 and f"val {record['val_loss']:.4f}" in out


# --- 6. a malformed tokenizer.json ------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b'{"version": "1.0", "model": {"type": "BPE", "vocab": {', b'{"a": 1}'],
                         ids=["empty", "truncated", "invalid"])
def test_a_malformed_tokenizer_json_is_one_line_naming_it(tmp_path, content):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(content)
    code, _, err = train(tmp_path / "run", "--steps", "1", f"data.tokenizer={tokenizer}")
    one_error(code, err, f"{tokenizer}: not a readable tokenizer.json (")
    assert "data.tokenizer=byte" in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_every_setting_is_either_fixed_or_free_on_resume():
    """Note [fixed on resume]: a new config key must be classified, or a resume could silently ignore it."""
    import dataclasses
    from skippipe.config import Config
    from skippipe.rundir import FIXED_ON_RESUME, MAY_CHANGE_ON_RESUME
    cfg = Config()
    keys = {"model"} | {f"{section.name}.{field.name}" for section in dataclasses.fields(cfg) if section.name != "model"
                        for field in dataclasses.fields(getattr(cfg, section.name))}
    free = {k for k in MAY_CHANGE_ON_RESUME if not k.endswith(".*")}
    free_sections = {k[:-2] for k in MAY_CHANGE_ON_RESUME if k.endswith(".*")}
    unclassified = {k for k in keys if k not in FIXED_ON_RESUME and k not in free and k.split(".")[0] not in free_sections}
    assert not unclassified
    assert not set(FIXED_ON_RESUME) & free
