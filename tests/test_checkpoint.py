"""Checkpoints: a resumed run reproduces the uninterrupted one; saving is atomic; loading runs no code."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from skippipe.checkpoint import latest_checkpoint, load_checkpoint
from skippipe.metrics import read_metrics
from skippipe.rundir import fork_run
from skippipe.trainer import train
from tests.handplan import hand_plan
from tests.test_runtime import SKIP, _restore_threads, make_config, run_ranks  # noqa: F401 (autouse fixture)
from topology.errors import ConfigError

# 3 nodes, 3 stages, skip ratio 1/3: paths of 2 stages, one swap-free skip each.
SMALL = dict(stages="0 1 2", paths=["0@0 1@1", "0@0 2@2", "0@0 1@1", "0@0 2@2"], skip_ratio=0.34)


def weights(run_dir, step: int, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / f"stage{stage}.safetensors"))


def test_single_process_resume_equals_uninterrupted(tmp_path):
    plan = hand_plan(**SKIP)
    whole = train(make_config(tmp_path, "whole", steps=4), plan)
    train(make_config(tmp_path, "parts", steps=2), plan)
    resumed = train(make_config(tmp_path, "parts", steps=4), plan, resume=True)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[2:]]  # bit for bit on the CPU
    for stage in range(plan.num_stages):
        a, b = weights(tmp_path / "whole", 4, stage), weights(tmp_path / "parts", 4, stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The metrics file reads as one run: steps 1-4, the interrupted run's records kept once.
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_distributed_resume_equals_uninterrupted_and_single_process_reads_its_checkpoint(tmp_path):
    plan = hand_plan(**SMALL)
    jobs = [("whole", plan.to_dict(), make_config(tmp_path, "whole", steps=4)),
            ("first", plan.to_dict(), make_config(tmp_path, "parts", steps=2)),
            ("resumed", plan.to_dict(), make_config(tmp_path, "parts", steps=4), True)]
    assert run_ranks(tmp_path, 3, jobs) == [0, 0, 0]
    whole = torch.load(tmp_path / "out" / "whole_0.pt", weights_only=False)["records"]
    resumed = torch.load(tmp_path / "out" / "resumed_0.pt", weights_only=False)["records"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[2:]]
    # Only the stage leaders write weights; one file per stage whatever the replicas.
    folder = tmp_path / "parts" / "checkpoints" / "step_000004"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [f"stage{s}.safetensors" for s in range(3)]
    # The layout does not depend on the process count: continue the distributed run in one process.
    shutil.copytree(tmp_path / "parts" / "checkpoints" / "step_000002", tmp_path / "mixed" / "checkpoints" / "step_000002")
    (tmp_path / "mixed" / "checkpoints" / "latest").write_text("step_000002\n")
    mixed = train(make_config(tmp_path, "mixed", steps=4), plan, resume=True)
    assert [r["loss"] for r in mixed] == [r["loss"] for r in whole[2:]]  # bit for bit: executors.py


def test_a_run_forked_in_the_warmup_is_the_shorter_run_trained_from_scratch(tmp_path):
    """The omission study's equal-wall-clock run: fork a longer run at the end of its warmup (whose learning
    rate does not depend on the schedule's length) and resume it with fewer steps: bit for bit the run
    trained from scratch for those steps, its cosine fitted to them, and not the longer run's."""
    plan = hand_plan(**SKIP)

    def config(name: str, steps: int):
        cfg = make_config(tmp_path, name, steps=steps, checkpoint_every=2, eval_every=1)
        cfg.optim.warmup_steps, cfg.optim.decay_steps = 2, None  # the cosine spans train.steps
        return cfg

    longer = train(config("longer", 6), plan)
    scratch = train(config("scratch", 4), plan)
    fork_run(tmp_path / "longer", 2, tmp_path / "fork")
    forked = train(config("fork", 4), plan, resume=True)
    assert [r["loss"] for r in forked] == [r["loss"] for r in scratch[2:]]
    assert [r["val_loss"] for r in forked] == [r["val_loss"] for r in scratch[2:]]
    assert forked[-1]["loss"] != longer[3]["loss"]  # the longer run's step 4 ran at a higher learning rate
    for stage in range(plan.num_stages):
        a, b = weights(tmp_path / "scratch", 4, stage), weights(tmp_path / "fork", 4, stage)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # The branch's metrics read as one run; the longer run's files are untouched.
    assert [r["step"] for r in read_metrics(tmp_path / "fork" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "longer" / "metrics.jsonl")] == list(range(1, 7))
    assert weights(tmp_path / "longer", 2, 0).keys() == weights(tmp_path / "fork", 2, 0).keys()
    with pytest.raises(ConfigError, match="holds a run up to step 4; fork into another run dir"):
        fork_run(tmp_path / "longer", 2, tmp_path / "fork")


def test_latest_moves_only_when_a_checkpoint_is_complete(tmp_path):
    plan = hand_plan(**SMALL)
    train(make_config(tmp_path, "run", steps=1), plan)
    root = tmp_path / "run" / "checkpoints"
    # A crash while writing step 2 leaves a folder without meta.json and a temporary file behind.
    (root / "step_000002").mkdir()
    (root / "step_000002" / ".stage0.safetensors.tmp123").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path / "run").name == "step_000001"
    (root / "latest").write_text("step_000002\n")  # a pointer to an incomplete checkpoint is refused
    with pytest.raises(ConfigError, match="incomplete"):
        latest_checkpoint(tmp_path / "run")


def test_resume_without_a_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        latest_checkpoint(tmp_path / "nothing")


class Payload:
    """A pickled object that would run code on unpickling."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_refuses_pickled_code(tmp_path):
    plan = hand_plan(**SMALL)
    train(make_config(tmp_path, "run", steps=1), plan)
    folder = latest_checkpoint(tmp_path / "run")
    torch.save({"state": {}, "param_groups": [], "evil": Payload()}, folder / "stage1.optim.pt")
    from skippipe.model import FullModel
    from skippipe.optim import build_optimizer
    from topology.model_spec import load_model_spec
    cfg = make_config(tmp_path, "run")
    model = FullModel(load_model_spec(cfg.model), 3, 0)
    stages = dict(enumerate(model.stages))
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(folder, stages=stages, optimizers={s: build_optimizer(m, cfg.optim) for s, m in stages.items()},
                        streams={}, rank=0, device=torch.device("cpu"))
