"""A process killed while it writes a checkpoint leaves the previous checkpoint intact and loadable.

A 1-step single-process run leaves checkpoint step 1. A child process restores it, changes every weight,
the optimizer state and the data position (so that any mix of old and new files would show), and saves
step 2, SIGKILLing itself at a chosen moment of the save: with a weights file half written, with a
temporary file complete but not renamed, after some stage files are in place, at the barrier, before
and after meta.json, with the `latest` pointer written but not renamed. The kill points are injected
from outside: the child wraps `Path.replace` (every file of a checkpoint lands by a rename), the
checkpoint module's `save_file`, and the `barrier` argument of save_checkpoint. Production code has
no test hooks.

After every kill: `latest` still names step 1, every file of step 1 is byte-identical, and
load_checkpoint restores exactly step 1's weights, optimizer state, data position and RNG state. A
control save without a kill does move `latest` to the changed step 2, so the comparisons can fail.

The children are forked from a forkserver; by hand: python tests/test_checkpoint_kill.py RUN_DIR KILL_POINT
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from skippipe import checkpoint  # noqa: E402
from skippipe.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from skippipe.config import Config, load_config  # noqa: E402
from skippipe.data import load_corpus  # noqa: E402
from skippipe.model import FullModel  # noqa: E402
from skippipe.optim import build_optimizer  # noqa: E402
from skippipe.trainer import data_streams, train  # noqa: E402
from topology.errors import ConfigError  # noqa: E402
from topology.model_spec import load_model_spec  # noqa: E402
from topology.plan import Plan  # noqa: E402

TINY = "name: kill-tiny\ndim: 32\nnum_layers: 4\nnum_heads: 2\nnum_kv_heads: 1\nffn_dim: 64\ncontext: 16\nvocab_size: 256\n"
# 3 nodes, 3 stages, skip ratio 1/3: node i serves stage i; every path visits stage 0 and one other.
PLAN = dict(stages="0 1 2", paths=["0@0 1@1", "0@0 2@2", "0@0 1@1", "0@0 2@2"], skip_ratio=0.34)

# (id, where the child dies, a file the kill must have left behind under checkpoints/: evidence it died there)
KILL_POINTS = [
    ("mid-weights-write", "write:stage1.safetensors", "step_000002/.stage1.safetensors.tmp*"),
    ("weights-tmp-not-renamed", "before:stage0.safetensors", "step_000002/.stage0.safetensors.tmp*"),
    ("after-first-stage-renamed", "after:stage0.optim.pt", "step_000002/stage0.optim.pt"),
    ("after-some-stage-files", "after:stage1.safetensors", "step_000002/stage1.safetensors"),
    ("data-position-tmp", "before:data0.pt", "step_000002/.data0.pt.tmp*"),
    ("at-the-barrier", "barrier", "step_000002/rng0.pt"),
    ("plan-tmp-not-renamed", "before:plan.json", "step_000002/plan.json.tmp"),
    ("meta-tmp-not-renamed", "before:meta.json", "step_000002/.meta.json.tmp*"),
    ("complete-but-latest-not-moved", "after:meta.json", "step_000002/meta.json"),
    ("latest-tmp-not-renamed", "before:latest", ".latest.tmp*"),
]
RESAVE = "resave+after:stage1.safetensors"  # save step 1 again, in place, and die after its stage 1 weights


def make_run(run_dir: Path) -> None:
    """A 1-step single-process run: checkpoint step 1."""
    from tests.handplan import hand_plan
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / "kill-tiny.yaml").write_text(TINY)
    cfg = Config(model=str(run_dir.parent / "kill-tiny.yaml"))
    cfg.data.context = 16
    cfg.train.steps, cfg.train.eval_batches, cfg.train.run_dir, cfg.train.num_threads = 1, 1, str(run_dir), 1
    cfg.train.single_process = True
    train(cfg, hand_plan(**PLAN))


def fresh_state(run_dir: Path):
    """What a resuming process builds before it loads a checkpoint: (cfg, plan, stages, optimizers, streams)."""
    folder = latest_checkpoint(run_dir)
    cfg = load_config(folder / "config.yaml")
    plan = Plan.load(folder / "plan.json")
    spec = load_model_spec(cfg.model)
    model = FullModel(spec, plan.num_stages, cfg.train.seed + 1)  # another init: loading must overwrite it
    stages = dict(enumerate(model.stages))
    optimizers = {s: build_optimizer(m, cfg.optim) for s, m in stages.items()}
    corpus = load_corpus(cfg.data.corpus, context=cfg.data.context or spec.context, tokenizer=cfg.data.tokenizer,
                         val_fraction=cfg.data.val_fraction, vocab_size=spec.vocab_size)
    streams = data_streams(plan, corpus, [n.id for n in plan.nodes], cfg.train.seed)
    return cfg, plan, stages, optimizers, streams


def snapshot(run_dir: Path) -> dict:
    """Everything load_checkpoint restores, as plain tensors and values."""
    cfg, plan, stages, optimizers, streams = fresh_state(run_dir)
    step = load_checkpoint(latest_checkpoint(run_dir), stages=stages, optimizers=optimizers, streams=streams, rank=0,
                           device=torch.device("cpu"))
    return {"step": step,
            "weights": {f"{s}.{k}": v.clone() for s, m in stages.items() for k, v in m.state_dict().items()},
            "optim": {s: o.state_dict() for s, o in optimizers.items()},
            "data": {n: s.state_dict() for n, s in streams.items()},
            "next_tokens": {n: s.next_batch()[0].clone() for n, s in streams.items()},
            "rng": torch.get_rng_state().clone()}


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same(a, b, where: str = "") -> None:
    """Deep equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def start_children(jobs: list[tuple[Path, str]]) -> list:
    """One child process per (run dir, kill point), all at once, forked from a forkserver that has imported
    torch and this module once (a fresh interpreter per child would spend seconds importing torch).
    The forkserver never ran torch, so forking it is safe."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tests.test_checkpoint_kill"])
    children = [ctx.Process(target=child, args=(run_dir, point)) for run_dir, point in jobs]
    for proc in children:
        proc.start()
    return children


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Checkpoint step 1, its files' checksums, and what loading it restores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("kill") / "run"
        make_run(run_dir)
        return run_dir, checksums(run_dir / "checkpoints"), snapshot(run_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def killed(base_run, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Every kill point (and the control, "none") on its own copy of the run: (run dir, exit code, note)."""
    import shutil
    base, _, _ = base_run
    root = tmp_path_factory.mktemp("killed")
    jobs = []
    for point in [k[1] for k in KILL_POINTS] + ["none", RESAVE]:
        run_dir = root / point.replace(":", "-")
        shutil.copytree(base, run_dir)
        jobs.append((run_dir, point))
    out = {}
    for (run_dir, point), proc in zip(jobs, start_children(jobs)):
        proc.join(timeout=300)
        out[point] = (run_dir, proc.exitcode, "(the child's output is in the captured stderr)")
    return out


@pytest.mark.parametrize("point, evidence", [k[1:] for k in KILL_POINTS], ids=[k[0] for k in KILL_POINTS])
def test_kill_during_save_leaves_the_previous_checkpoint(base_run, killed, point, evidence):
    _, sums, reference = base_run
    run_dir, returncode, stderr = killed[point]
    assert returncode == -signal.SIGKILL, stderr[-2000:]
    root = run_dir / "checkpoints"
    assert list(root.glob(evidence)), f"the child did not die where intended: {sorted(checksums(root))}"
    # The previous checkpoint: still the latest, byte for byte the same, restored exactly.
    assert latest_checkpoint(run_dir).name == "step_000001"
    after = checksums(root)
    assert {k: after.get(k) for k in sums} == sums
    # Nothing else changed but the new step's folder and temporary files (dot-names) beside `latest`.
    assert all(k.startswith(("step_000002/", ".latest.tmp")) for k in set(after) - set(sums)), sorted(after)
    assert_same(reference, snapshot(run_dir))
    # The evaluator and the exporter find it too.
    from skippipe.checkpoint import checkpoint_folder
    assert checkpoint_folder(run_dir).name == "step_000001"


def test_a_save_that_is_not_killed_moves_latest(base_run, killed):
    """The control: the same child without a kill completes step 2, which differs from step 1 everywhere."""
    _, _, reference = base_run
    run_dir, returncode, stderr = killed["none"]
    assert returncode == 0, stderr[-2000:]
    assert latest_checkpoint(run_dir).name == "step_000002"
    now = snapshot(run_dir)
    assert now["step"] == 2
    assert all(not torch.equal(now["weights"][k], v) for k, v in reference["weights"].items())
    assert all(not torch.equal(now["next_tokens"][n], t) for n, t in reference["next_tokens"].items())
    assert now["optim"][0]["state"][0]["step"] != reference["optim"][0]["state"][0]["step"]
    assert not torch.equal(now["rng"], reference["rng"])


def test_a_killed_rewrite_of_the_latest_step_is_refused_not_mixed(base_run, killed):
    """Saving step 1 again over the latest checkpoint (a fresh run in an old run dir), killed half way: the
    folder holds old and new files, so loading it must fail as incomplete rather than mix them silently."""
    run_dir, returncode, _ = killed[RESAVE]
    assert returncode == -signal.SIGKILL
    folder = run_dir / "checkpoints" / "step_000001"
    assert checksums(folder)["stage0.safetensors"] != base_run[1]["step_000001/stage0.safetensors"]  # rewritten
    assert checksums(folder)["stage2.safetensors"] == base_run[1]["step_000001/stage2.safetensors"]  # not yet
    with pytest.raises(ConfigError, match="incomplete"):
        latest_checkpoint(run_dir)


def test_training_resumes_after_a_killed_save(killed, tmp_path):
    """Leftovers of a killed save (a half-written step 2) do not stop the run from resuming and saving step 2."""
    import shutil
    killed_dir, returncode, _ = killed["write:stage1.safetensors"]
    assert returncode == -signal.SIGKILL
    run_dir = tmp_path / "run"
    shutil.copytree(killed_dir, run_dir)
    cfg = load_config(run_dir / "config.yaml", ["train.steps=2", f"train.run_dir={run_dir}"])
    threads = torch.get_num_threads()
    try:
        records = train(cfg, Plan.load(run_dir / "plan.json"), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in records] == [2]
    assert latest_checkpoint(run_dir).name == "step_000002"
    assert snapshot(run_dir)["step"] == 2


# --- the child ---------------------------------------------------------------------------------------

def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(point: str) -> None:
    """Arrange for this process to SIGKILL itself at `point` of the next save_checkpoint."""
    kind, _, name = point.partition(":")
    if kind in ("before", "after"):
        original = Path.replace

        def replace(self, target):
            if kind == "before" and Path(target).name == name:
                _die()
            moved = original(self, target)
            if kind == "after" and Path(target).name == name:
                _die()
            return moved
        Path.replace = replace
    elif kind == "write":
        from safetensors.torch import save as to_bytes
        original_save = checkpoint.save_file

        def save_file(tensors, filename, metadata=None):
            if not str(filename).startswith(str(Path(filename).parent / f".{name}.tmp")):
                return original_save(tensors, filename, metadata=metadata)
            data = to_bytes(tensors, metadata=metadata)
            with open(filename, "wb") as f:  # die half way through the tensors' bytes
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()
        checkpoint.save_file = save_file
    else:
        assert kind in ("barrier", "none"), point


def child(run_dir: Path, point: str) -> None:
    torch.set_num_threads(1)
    cfg, plan, stages, optimizers, streams = fresh_state(run_dir)
    step = load_checkpoint(latest_checkpoint(run_dir), stages=stages, optimizers=optimizers, streams=streams, rank=0,
                           device=torch.device("cpu"))
    # Change everything a checkpoint holds: weights, optimizer moments and step, data position, RNG.
    for module, optimizer in zip(stages.values(), optimizers.values()):
        for p in module.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    for stream in streams.values():
        stream.next_batch()
    torch.rand(7)
    resave = point.startswith("resave+")
    point = point.removeprefix("resave+")
    _inject(point)
    barrier = _die if point == "barrier" else (lambda: None)
    save_checkpoint(run_dir, step=step if resave else step + 1, stages=stages, optimizers=optimizers, streams=streams,
                    plan=plan, cfg=cfg, rank=0, write_stages=None, barrier=barrier)


if __name__ == "__main__":
    child(Path(sys.argv[1]), sys.argv[2])
