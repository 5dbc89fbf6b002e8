"""Inference with omitted stages: which stages are kept, the table, and the evaluator CLI."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skippipe.checkpoint import load_full_model
from skippipe.config import load_config
from skippipe.evaluation import omission
from skippipe.model import FullModel
from skippipe.planning import make_plan
from skippipe.trainer import train
from topology.errors import ConfigError
from topology.model_spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ModelSpec(name="omit", dim=32, num_layers=8, num_heads=4, num_kv_heads=2, ffn_dim=64, context=16, vocab_size=256)


@pytest.mark.parametrize("num_stages, keep, placement, expected", [
    (8, 1.0, "even", [0, 1, 2, 3, 4, 5, 6, 7]),
    (8, 0.5, "even", [0, 2, 4, 6]),
    (8, 0.75, "even", [0, 1, 2, 4, 5, 6]),
    (8, 0.25, "even", [0, 4]),
    (4, 0.5, "even", [0, 2]),
    (8, 0.5, "first", [0, 1, 2, 3]),
    (8, 0.5, "last", [0, 5, 6, 7]),
    (4, 0.75, "last", [0, 2, 3]),
    (8, 0.01, "even", [0]),  # at least stage 0
    (6, 0.25, "even", [0, 3]),  # 1.5 stages: halves round up, as a path's length does
    (4, 1.0, "random", [0, 1, 2, 3]),
])
def test_kept_stages(num_stages, keep, placement, expected):
    assert omission.kept_stages(num_stages, keep, placement) == expected


def test_random_placement_is_seeded_sorted_and_keeps_stage_0():
    draws = [omission.kept_stages(8, 0.5, "random", seed) for seed in range(20)]
    assert all(d[0] == 0 and len(d) == 4 and d == sorted(set(d)) for d in draws)
    assert draws == [omission.kept_stages(8, 0.5, "random", seed) for seed in range(20)]
    assert len({tuple(d) for d in draws}) > 3


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.01, float("nan")])
def test_keep_outside_the_unit_interval_is_refused(keep):
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        omission.kept_stages(8, keep, "even")


def test_bad_inputs_name_the_fix():
    with pytest.raises(ConfigError, match="even, random, first, last"):
        omission.kept_stages(8, 0.5, "middle")
    with pytest.raises(ConfigError, match="comma-separated"):
        omission.parse_keeps("1.0,half")
    assert omission.parse_keeps("1.0, 0.75,0.5") == [1.0, 0.75, 0.5]


def test_table_rows_share_one_held_out_set_and_match_a_direct_computation():
    torch.manual_seed(0)
    model = FullModel(SPEC, 4, seed=1).eval()
    tokens = torch.randint(0, 256, (3, 4, SPEC.context + 1))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    rows = omission.omission_table(model, batches, keeps=[1.0, 0.5], placements=["even", "first", "random"], seeds=3)
    assert [(r["keep"], r["placement"]) for r in rows] == [
        (1.0, "even"), (1.0, "first"), (1.0, "random"), (0.5, "even"), (0.5, "first"), (0.5, "random")]
    full = rows[0]
    assert full["ratio_to_full"] == pytest.approx(1.0) and full["stages"] == [0, 1, 2, 3]
    assert {r["ppl"] for r in rows[:3]} == {full["ppl"]}  # every placement keeps everything at 1.0
    # Every row is on the same tokens: a direct computation of one row agrees.
    half = rows[3]
    with torch.no_grad():
        loss = torch.stack([FullModel.loss(model.forward_path(x, [0, 2]), y) for x, y in batches]).mean()
    assert half["stages"] == [0, 2] and half["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert half["tokens"] == 3 * 4 * SPEC.context and half["tokens_per_s"] > 0
    rand = rows[5]
    assert rand["seeds"] == 3 and len(rand["stages"]) == 3
    assert rand["ppl_min"] <= rand["ppl"] <= rand["ppl_max"] and rand["ppl_std"] >= 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real checkpoint from the runtime: 2 single-process steps of the debug config's tiny model."""
    run = tmp_path_factory.mktemp("omission") / "run"
    cfg = load_config(ROOT / "configs/train/debug.yaml", [
        "schedule.strategy=full", "schedule.skip_ratio=0.0", "train.steps=2", "train.eval_batches=1",
        "train.eval_every=0", f"train.run_dir={run}", "train.single_process=true", "train.log_every=100"])
    train(cfg, make_plan(cfg))
    return run


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def script_main(name: str):
    """A script's main(), imported in-process (a subprocess costs seconds of torch imports)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_main(name: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a script run in-process."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    code = 0
    try:
        script_main(name)()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_evaluator_writes_json_csv_and_png_for_a_runtime_checkpoint(run_dir, tmp_path):
    out = evaluate_cli("--checkpoint", str(run_dir), "--keep", "1.0,0.75,0.5", "--placement", "even,random",
                       "--seeds", "2", "--batches", "2", "--json", str(tmp_path / "r.json"),
                       "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png"))
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["keep"], r["placement"]) for r in results] == [
        (k, p) for k in (1.0, 0.75, 0.5) for p in ("even", "random")]
    assert all(r["ppl"] > 1 and r["tokens_per_s"] > 0 for r in results)
    assert results[0]["ppl"] == pytest.approx(results[1]["ppl"])  # keep 1.0: the same model whatever the placement
    depth = json.loads((tmp_path / "r.json").read_text())["depth"]
    # Per model: the trained depth (debug config: 4 stages at skip 0 -> 4), the best kept set, all sets tried.
    assert depth["trained_depth"] == 4 and depth["at_trained_depth"]["stages"] == [0, 1, 2, 3]
    assert depth["best"]["loss"] == min(r["loss"] for r in depth["by_set"])
    assert {r["depth"] for r in depth["by_set"]} == {1, 2, 3, 4}
    assert depth["full"]["ppl"] == pytest.approx(results[0]["ppl"], rel=1e-6)
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_depth_summary_finds_the_best_set_and_the_trained_depth():
    torch.manual_seed(0)
    model = FullModel(SPEC, 4, seed=1).eval()
    tokens = torch.randint(0, 256, (2, 4, SPEC.context + 1))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    summary = omission.depth_summary(model, batches, trained=3)
    sets = [r["stages"] for r in summary["by_set"]]
    assert sets == [[0], [0, 2], [0, 1, 2], [0, 1, 2, 3]]  # the even set of every depth
    direct = {tuple(s): omission.evaluate_stages(model, batches, s)["loss"] for s in sets}
    assert summary["at_trained_depth"]["stages"] == [0, 1, 2] and summary["trained_depth"] == 3
    assert summary["full_over_trained_depth"] == pytest.approx(math.exp(direct[(0, 1, 2, 3)] - direct[(0, 1, 2)]))
    assert summary["best"]["stages"] == list(min(direct, key=direct.get))
    rows = [{"stages": [[0, 3], [0, 1]]}]  # a random row's draws join the candidates
    assert [0, 3] in [r["stages"] for r in omission.depth_summary(model, batches, trained=3, rows=rows)["by_set"]]


def test_a_shared_cache_evaluates_each_kept_set_once(monkeypatch):
    torch.manual_seed(0)
    model = FullModel(SPEC, 4, seed=1).eval()
    tokens = torch.randint(0, 256, (2, 4, SPEC.context + 1))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    alone = omission.depth_summary(model, batches, trained=3)
    runs, evaluate = [], omission.evaluate_stages
    monkeypatch.setattr(omission, "evaluate_stages", lambda m, b, stages: runs.append(tuple(stages)) or evaluate(m, b, stages))
    cache = {}
    rows = omission.omission_table(model, batches, keeps=[1.0, 0.5], placements=["even", "first", "last"], cache=cache)
    shared = omission.depth_summary(model, batches, trained=3, rows=rows, cache=cache)
    assert len(runs) == len(set(runs)) == len(cache)  # no kept set ran twice
    assert (0, 1, 2, 3) in runs and (0, 2) in runs and (0, 1, 2) in runs  # the table's sets and the summary's own
    assert [r["loss"] for r in shared["by_set"] if len(r["stages"]) != 2 or r["stages"] == [0, 2]] == \
        [r["loss"] for r in alone["by_set"]]  # the same figures as computed alone


def test_loaded_model_is_the_trained_one(run_dir):
    model, cfg, folder = load_full_model(run_dir)
    assert folder.name == "step_000002" and model.num_stages == cfg.schedule.num_stages
    fresh = FullModel(model.spec, model.num_stages, cfg.train.seed)
    assert not torch.equal(model.stages[0].embed_tokens.weight, fresh.stages[0].embed_tokens.weight)


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "no/such/run"], "checkpoint not found"),
    (["--keep", "1.5"], "outside (0, 1]"),
    (["--keep", "0"], "outside (0, 1]"),
    (["--placement", "middle"], "unknown placement"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, args, message, monkeypatch, capsys):
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(run_dir), *args]
    code, err = run_main("evaluate", args, monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_a_run_dir_without_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    code, err = run_main("evaluate", ["--checkpoint", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "holds no checkpoint" in err


def test_the_study_records_its_network_times_and_evaluate_only_reads_back_only_its_own(tmp_path):
    from skippipe.commands.omission_study import NETWORK_FILE, recorded_network_times
    calls = []

    def times(setting, remedies, evaluate_only):
        def solve():
            calls.append(remedies)
            return {"solved": len(calls)}
        return recorded_network_times(tmp_path, setting=setting, remedies=remedies, evaluate_only=evaluate_only,
                                      solve=solve)

    paper = {"name": "paper", "stages": 6, "skip_ratio": 0.33}
    trained = times(paper, ("a",), evaluate_only=False)
    assert trained == {"solved": 1} and (tmp_path / NETWORK_FILE).is_file()
    assert times(paper, ("a",), evaluate_only=True) == trained
    assert len(calls) == 1  # read back, not solved
    # Other remedies or another setting are solved afresh, and evaluating never rewrites the record.
    assert times(paper, ("a", "b"), evaluate_only=True) == {"solved": 2}
    mission = {"name": "mission", "stages": 8, "skip_ratio": 0.25}
    assert times(mission, ("a",), evaluate_only=True) == {"solved": 3}
    assert json.loads((tmp_path / NETWORK_FILE).read_text())["times"] == trained
    (tmp_path / NETWORK_FILE).write_text("{not json")
    assert times(paper, ("a",), evaluate_only=True) == {"solved": 4}


def test_omission_study_trains_its_runs_and_reports_each_answer_from_its_own_tables(tmp_path):
    """The study script end to end on a tiny model at the paper's setting: the skip, full, equal-time and
    LayerDrop runs with their tokens, paths and predicted times; every answer recomputed from the
    report's own tables; the plot written."""
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("name: tiny\ndim: 32\nnum_layers: 12\nnum_heads: 4\nnum_kv_heads: 2\nffn_dim: 64\n"
                    "context: 32\nvocab_size: 256\n")
    report_path = tmp_path / "study.json"
    out = subprocess.run([sys.executable, str(ROOT / "scripts/omission_study.py"), "--setting", "paper",
                          "--out", str(report_path), "--plot", str(tmp_path / "study.png"), "--steps", "4", "--seeds", "1",
                          "--run-dir", str(tmp_path / "runs"), f"model={tiny}", "train.eval_every=2",
                          "train.eval_batches=1", "optim.warmup_steps=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    report = json.loads(report_path.read_text())
    runs, a, net = report["runs"], report["answers"], report["network"]
    assert report["setting"] == {"name": "paper", "stages": 6, "skip_ratio": 0.33}
    assert set(runs) == {"skip", "full", "full_equal_time", "layerdrop"}
    skip, full, equal, drop = runs["skip"], runs["full"], runs["full_equal_time"], runs["layerdrop"]
    assert skip["tokens"] == full["tokens"] == drop["tokens"] == 4 * 16 * 2 * 32
    assert full["paths"] == drop["paths"] == [list(range(6))]
    assert all(len(p) == 4 and p[0] == 0 for p in skip["paths"])  # the plan's paths (step 10 would be full depth)
    # Equal wall-clock: the full run's steps are the skip run's predicted time over the full pipeline's.
    # The default: one in 10 full, the rest a rotation of plans with 3 of 16 microbatches on the even half
    # and the others' depths spread (priced as the mean of the first 8 such steps' draws).
    default = net["remedies"]["every10_rotate8_spread_sandwich0.1875"]
    assert default["spread_even"] == 0.1875 and "shallow_every" not in default
    assert default["depth_spread"] == 1.0 and default["spread_draws_priced"] == 8
    ratio = default["iteration_s"] / net["full_iteration_s"]
    assert a["time_ratio"] == pytest.approx(ratio) and 0 < ratio < 1 and equal["steps"] == max(1, round(4 * ratio))
    assert default["rotated_plans"] > 1 and default["distinct_stage_sets"] > default["distinct_stage_sets_first_plan"]
    assert default["rotation_iteration_s"] <= net["skip_iteration_s"] * 1.02  # scheduler.rotation.TOLERANCE
    assert default["iteration_s"] == pytest.approx((9 * default["spread_iteration_s"]
                                                    + net["skip_placement_full_depth_iteration_s"]) / 10)
    assert all(r["cost_over_plain"] > 0 for r in net["remedies"].values())
    # The equal-time run shares the full run's warmup (one step here), so it branches off its checkpoint there.
    assert equal["fork_step"] == 1 and [r["step"] for r in equal["curve"]] == [1, 2]
    assert "resumed from" in (tmp_path / "runs/full_equal_time/train.log").read_text()

    def ppl(rows, keep):
        return next(r["ppl"] for r in rows if r["keep"] == keep and r["placement"] == "even")

    def full_loss(run):
        return next(r["loss"] for r in run["depth"]["by_set"] if r["stages"] == list(range(6)))

    best = min(r["loss"] for r in skip["depth"]["by_set"])
    assert a["q1_equal_time"] == pytest.approx(best / full_loss(equal))
    assert a["q1_equal_tokens"] == pytest.approx(best / full_loss(full))
    assert a["q1_full_depth"] == pytest.approx(full_loss(skip) / full_loss(full))
    at_trained = next(r["ppl"] for r in skip["depth"]["by_set"] if r["stages"] == [0, 1, 3, 4])  # 4 of 6, even
    assert skip["depth"]["trained_depth"] == drop["depth"]["trained_depth"] == 4
    assert a["full_over_trained_depth"] == pytest.approx(math.exp(full_loss(skip)) / at_trained)
    assert a["q2_skip_half_over_full"] == pytest.approx(ppl(skip["omission"], 0.5) / ppl(skip["omission"], 1.0))
    assert a["q3_full_half_over_full"] == pytest.approx(ppl(full["omission"], 0.5) / ppl(full["omission"], 1.0))
    assert a["layerdrop_q2"] == pytest.approx(ppl(drop["omission"], 0.5) / ppl(drop["omission"], 1.0))
    assert a["targets_met"]["q2_no_worse_than_layerdrop"] == (a["q2_skip_half_over_full"] <= a["layerdrop_q2"])
    assert skip["curve"][-1]["network_s"] == pytest.approx(4 * skip["predicted_iteration_s"])
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["trained"] is True and report["total_seconds"] > 0
    assert json.loads((tmp_path / "runs/skip/omission.json").read_text())["results"] == skip["omission"]

    # --evaluate-only: the same runs evaluated again give the same answers, and nothing is trained.
    again = tmp_path / "again.json"
    base = [sys.executable, str(ROOT / "scripts/omission_study.py"), "--setting", "paper", "--steps", "4", "--seeds",
            "1", "--run-dir", str(tmp_path / "runs"), "--evaluate-only", f"model={tiny}", "train.eval_every=2",
            "train.eval_batches=1", "optim.warmup_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*base, "--out", str(again)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    second = json.loads(again.read_text())
    assert second["answers"] == a and second["trained"] is False
    # The predicted times the runs were trained with are read back, not solved again.
    assert "as recorded when the runs were trained" in out.stdout and second["network"] == net
    assert json.loads((tmp_path / "runs/network.json").read_text())["times"] == net
    assert [r["step"] for r in second["runs"]["skip"]["curve"]] == [r["step"] for r in skip["curve"]]
    # A variant that was never trained is refused in one line, before anything is written.
    def refusal(out) -> str:
        """The one error line (a slow solve may print its progress lines, "skippipe: ...", before it)."""
        lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("skippipe: ")]
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --evaluate-only:"), out.stderr
        return lines[0]

    out = subprocess.run([*base, "--variants", "plain", "--out", str(tmp_path / "third.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert "skip_plain" in refusal(out) and not (tmp_path / "third.json").exists()
    # Runs trained for fewer steps than asked are not the study's: the checkpoint's own step says so.
    longer = [("5" if arg == "4" else arg) for arg in base]
    out = subprocess.run([*longer, "--out", str(tmp_path / "fourth.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert "holds a checkpoint at step 4, not one at step 5" in refusal(out) and not (tmp_path / "fourth.json").exists()


def test_omission_study_refuses_an_unknown_setting_before_training(tmp_path, monkeypatch, capsys):
    code, err = run_main("omission_study", ["--setting", "huge", "--out", str(tmp_path / "r.json"),
                                            "--run-dir", str(tmp_path / "runs")], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: unknown --setting 'huge'") and not (tmp_path / "runs").exists()


def test_omission_study_refuses_a_filled_run_dir_before_solving_the_network(tmp_path, monkeypatch, capsys):
    """A run dir that holds a run (here a variant's) is refused at once: the solves take seconds."""
    from skippipe.experiments import omission_study

    def solve(*args, **kwargs):
        raise AssertionError("the network was solved before the refusal")

    monkeypatch.setattr(omission_study, "network_times", solve)
    held = tmp_path / "runs" / "skip_plain"
    held.mkdir(parents=True)
    (held / "metrics.jsonl").write_text("")
    code, err = run_main("omission_study", ["--setting", "paper", "--variants", "plain", "--out", str(tmp_path / "r.json"),
                                            "--run-dir", str(tmp_path / "runs")], monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: --run-dir {tmp_path / 'runs'} holds ") and "in skip_plain/" in err
    assert not (tmp_path / "r.json").exists()


def test_overwrite_clears_the_old_runs_and_their_evaluations_but_no_other_file(tmp_path):
    from skippipe.commands.omission_study import clear_runs
    old = tmp_path / "skip"
    (old / "checkpoints").mkdir(parents=True)
    for name in ("metrics.jsonl", "config.yaml", "omission.json", "train.log", "evaluate.log", "notes.txt"):
        (old / name).write_text("old\n")
    clear_runs(tmp_path, ["skip", "full"])  # full/ holds nothing: nothing to clear
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


def test_each_remedy_is_priced_with_its_own_plans():
    """A remedy that forbids reordering is priced with the in-order plan; drawn shallow iterations with the
    mean of their draws; every remedy's time is its schedule's mean over one period."""
    from scheduler.depth import average_iteration_s
    from skippipe.experiments.omission_study import network_times
    times = network_times(6, 0.33, ("every10", "every10_inorder", "every10_drawn4", "every10_drawn4_tail10"))
    priced = times["remedies"]
    assert set(priced) == {"every10", "every10_inorder", "every10_drawn4", "every10_drawn4_tail10"}
    assert "skip_iteration_s" not in priced["every10"]  # the plan with CC3's default reordering
    inorder, drawn = priced["every10_inorder"], priced["every10_drawn4"]
    assert inorder["skip_iteration_s"] > 0 and drawn["shallow_draws_priced"] == 8
    assert "skip_iteration_s" not in drawn  # in-order draws on the reordering plan's steps
    full_depth = times["skip_placement_full_depth_iteration_s"]  # one in ten at full depth
    assert drawn["iteration_s"] == pytest.approx(average_iteration_s(
        {"base": times["skip_iteration_s"], "full": full_depth, "shallow": drawn["shallow_iteration_s"]},
        full_every=10, shallow_every=4))
    tail = priced["every10_drawn4_tail10"]  # the last tenth of the steps at full depth
    assert tail["iteration_s"] == pytest.approx(0.9 * drawn["iteration_s"] + 0.1 * full_depth)
