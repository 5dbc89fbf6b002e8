"""Is a skip-trained model as good as the full pipeline's at equal wall-clock, and does it degrade gracefully?

    python scripts/omission_study.py --setting paper --out reports/omission_paper.json --plot reports/omission_paper.png
    python scripts/omission_study.py --setting mission --out reports/omission_mission.json

From one initialisation and one data order, trains the model of configs/train/omission.yaml with the
path-faithful single-process trainer as: `skip` (the setting's skip ratio with the --remedy, by default
one iteration in ten at full depth and the others rotating over 8 plans of the same predicted time, 3 of
each step's 16 microbatches on the evenly spaced stages an even omission keeps and the others' depths
spread one either side of the plan's), `full` (full pipeline, equal tokens), `full_equal_time` (full pipeline stopped at the wall-clock
the skip run takes on the paper's network, by the simulator: the ratio is recorded; it branches off the
full run at the end of the warmup, the steps both share) and
`layerdrop` (equal tokens, the skip ratio's expected depth), plus a run per --variants remedy. Each run is
then evaluated (scripts/evaluate.py, into the run's omission.json) at keep 1.0, 0.75, 0.5 and at every
depth on the same held-out tokens; --jobs commands at once, the longest ready one first
(skippipe/experiments/tasks.py). Settings: --setting mission (8 stages x 3 layers, skip 0.25), paper
(6 x 4, 0.33), or --stages and --skip-ratio. Extra arguments are dotted overrides for every run
(optim.lr=1e-3).
Answers and targets: skippipe/experiments/omission_study.py, study_answers.
"""
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from skippipe.commands import package_env, train_command
from skippipe.experiments.tasks import Task, run_tasks
from topology.errors import ArgumentParser, ConfigError, cli_errors

KEEPS = "1.0,0.75,0.5"  # the kept fractions every run is evaluated at


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="report JSON")
    p.add_argument("--plot", help="PNG: perplexity against kept fraction, and validation loss against wall-clock (default: no plot)")
    p.add_argument("--setting", help="mission (8 stages, skip 0.25) or paper (6 stages, skip 0.33) (default: none; then --stages and --skip-ratio)")
    p.add_argument("--stages", type=int, help="stages of the model (default: the setting's)")
    p.add_argument("--skip-ratio", type=float, help="skip ratio of the skip run (default: the setting's)")
    p.add_argument("--remedy", default=None, help="remedy of the skip run: one of REMEDIES in "
                   "skippipe/experiments/omission_study.py, e.g. plain, every10, every10_rotate8_spread_sandwich0.1875 (default)")
    p.add_argument("--variants", default="", help="comma-separated remedies trained as extra skip runs, e.g. plain")
    p.add_argument("--steps", type=int, help="training steps of the equal-token runs (default: the config's)")
    p.add_argument("--config", default="omission", help="training YAML or shipped config name of every run (default: omission)")
    p.add_argument("--run-dir", help="where the runs go (default: runs/omission-<setting>)")
    p.add_argument("--seeds", type=int, default=3, help="draws of the random placement (default: 3)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, one thread each (default: 2)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="train nothing: evaluate the runs already trained in --run-dir (each must be the study's run, "
                        "at its last step) and write the report, e.g. after an interrupted evaluation; the predicted "
                        "times are those recorded in --run-dir/network.json when they were trained (default: train)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs in --run-dir and the --out/--plot "
                   "files (without it, a run dir that holds a run or an existing report is refused)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. optim.lr=1e-3")
    return p


def evaluate_command(run_dir: Path, seeds: int) -> list[str]:
    """argv that evaluates a trained run at every keep and placement of the study, on the whole held-out
    split, into `run_dir`/omission.json (the evaluator's own JSON: the table and the depth summary)."""
    from skippipe.evaluation.omission import PLACEMENTS
    return [sys.executable, "-m", "skippipe.commands.evaluate", "--checkpoint", str(run_dir), "--keep", KEEPS,
            "--placement", ",".join(PLACEMENTS), "--seeds", str(seeds), "--json", str(run_dir / "omission.json"),
            "--overwrite"]


def study_tasks(runs: dict, run_root: Path, args) -> list[Task]:
    """Each run's training (none with --evaluate-only), then its evaluation. The equal-time run branches
    off the full run's checkpoint at the end of the warmup when it has a `fork_step` (Note [equal-time
    fork] in skippipe/experiments/omission_study.py): the full run saves one there, and the branch
    starts when it is complete. Costs: steps x depth, the evaluations last. With --overwrite, main has
    already cleared the run dirs."""
    from skippipe.checkpoint import is_complete, step_folder
    from skippipe.rundir import fork_run
    train = [*train_command(), "--config", args.config, "--single-process"]
    fork_step = runs["full_equal_time"].extra.get("fork_step", 0)
    tasks = []
    for name, run in runs.items():
        folder = run_root / name
        tasks.append(Task(name, "evaluate", evaluate_command(folder, args.seeds), 0.0,
                          ready=None if args.evaluate_only else finished(name, "train")))
        if args.evaluate_only:
            continue
        command = [*train, "--run-dir", str(folder), "--steps", str(run.steps), *run.overrides, *args.overrides,
                   "train.num_threads=1"]
        if name == "full_equal_time" and fork_step:
            tasks.append(Task(name, "train", [*command, "--resume"], (run.steps - fork_step) * run.depth,
                              ready=lambda done: is_complete(step_folder(run_root / "full", fork_step)),
                              before=lambda: fork_run(run_root / "full", fork_step, run_root / "full_equal_time")))
            continue
        if name == "full" and fork_step:
            command.append(f"train.checkpoint_every={fork_step}")
        tasks.append(Task(name, "train", command, run.steps * run.depth))
    return tasks


def clear_runs(run_root: Path, names) -> None:
    """--overwrite: every old run of `names` in `run_root` goes before any task starts (the branch must
    not fork an old full run's checkpoint): the run's files (skippipe.rundir.claim_run_dir) and the study's
    own beside them, its evaluation (omission.json) and the task logs (skippipe/experiments/tasks.py), so
    that no file describes the old model beside the new run. Other files stay."""
    from skippipe.rundir import claim_run_dir
    for name in names:
        claim_run_dir(run_root / name, resume=False, overwrite=True)
        for stale in ("omission.json", "train.log", "evaluate.log"):
            (run_root / name / stale).unlink(missing_ok=True)


def finished(run: str, step: str):
    """A Task's `ready`: once `step` of `run` has finished."""
    return lambda done: (run, step) in done


def check_trained(run_dir: Path, run, overrides: list[str]) -> None:
    """--evaluate-only: `run_dir` holds the study's `run` (its overrides and `overrides` in its saved config,
    a checkpoint at its last step); ConfigError saying what differs otherwise."""
    from skippipe.checkpoint import checkpoint_root, checkpoint_step, latest_checkpoint
    from skippipe.config import load_config
    from skippipe.rundir import run_contents, setting_value
    held = run_contents(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--evaluate-only: {run_dir} holds {held or 'no run'}; train it first (drop --evaluate-only)")
    cfg = load_config(saved)
    for item in [*run.overrides, *overrides]:
        key, _, value = item.partition("=")
        expected = load_config(saved, [item])
        if setting_value(expected, key) != setting_value(cfg, key):
            raise ConfigError(f"--evaluate-only: {run_dir} was trained with {key}={setting_value(cfg, key)}, "
                              f"not {value}; train the study's run there (drop --evaluate-only)")
    try:
        step = checkpoint_step(latest_checkpoint(run_dir))
    except ConfigError:
        step = None  # no checkpoint, or a damaged pointer: either way not the trained run
    if step != run.steps:
        found = f"a checkpoint at step {step}" if step is not None else f"no readable checkpoint in {checkpoint_root(run_dir)}"
        raise ConfigError(f"--evaluate-only: {run_dir} holds {found}, not one at step {run.steps}; "
                          f"train it first (drop --evaluate-only)")


def study_result(name: str, run, run_root: Path) -> dict:
    """The report's entry for a trained and evaluated run: its tokens, predicted wall-clock, paths, omission
    table and depth summary (from `evaluate_command`'s JSON) and training curve."""
    from skippipe.config import load_config
    from skippipe.experiments.omission_study import training_curve
    from topology.model_spec import load_model_spec

    folder = run_root / name
    cfg = load_config(folder / "config.yaml")
    evaluated = json.loads((folder / "omission.json").read_text())
    plan = json.loads((Path(evaluated["checkpoint"]) / "plan.json").read_text())
    tokens_per_step = len(plan["paths"]) * plan["microbatch_size"] * (cfg.data.context or load_model_spec(cfg.model).context)
    return {"label": run.label, "run_dir": str(folder), "overrides": run.overrides, "steps": cfg.train.steps,
            "tokens": cfg.train.steps * tokens_per_step, "predicted_iteration_s": run.predicted_iteration_s,
            "predicted_wall_clock_s": cfg.train.steps * run.predicted_iteration_s, **run.extra,
            "paths": sorted({tuple(p["stages"]) for p in plan["paths"]}), "omission": evaluated["results"],
            "depth": evaluated["depth"], "curve": training_curve(folder, tokens_per_step, run.predicted_iteration_s)}


NETWORK_FILE = "network.json"  # in --run-dir: the predicted times the study's runs were trained with


def recorded_network_times(run_root: Path, *, setting: dict, remedies: tuple[str, ...], evaluate_only: bool,
                           solve: Callable[[], dict]) -> dict:
    """The study's predicted iteration times on the paper's network: `solve()` (study.network_times, about
    a minute of solves). Training records them in `run_root`/network.json; with `evaluate_only` they are
    read back from there when it holds this setting's and these remedies' times: the equal-time run's
    steps were computed from them, and re-solving would repeat the minute (or, after a change to the cost
    model, disagree with the trained runs)."""
    path = run_root / NETWORK_FILE
    key = {"setting": setting, "remedies": list(remedies)}
    if evaluate_only and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("times"), dict):
            print(f"network times: as recorded when the runs were trained ({path})", flush=True)
            return saved["times"]
    times = solve()
    if not evaluate_only:
        run_root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**key, "times": times}, indent=1) + "\n")
    return times


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        if args.steps is not None and args.steps < 1:
            raise ConfigError(f"--steps must be positive, got {args.steps}")
        if args.jobs < 1 or args.seeds < 1:
            raise ConfigError("--jobs and --seeds must be positive")
        from skippipe.experiments import omission_study as study
        from skippipe.experiments.omission_plot import plot_study
        from skippipe.config import load_config

        setting = study.setting_of(args.setting, args.stages, args.skip_ratio)
        remedy = args.remedy or study.DEFAULT_REMEDY
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        for name in (remedy, *variants):
            study.remedy_overrides(name)  # an unknown remedy fails here, before any training
        shape = [f"schedule.num_stages={setting['stages']}", f"schedule.num_nodes={setting['stages']}",
                 f"schedule.skip_ratio={setting['skip_ratio']}"]
        cfg = load_config(args.config, shape + args.overrides)  # bad input fails here, before any training
        steps = args.steps or cfg.train.steps
        run_root = Path(args.run_dir or f"runs/omission-{setting['name']}")
        from skippipe.rundir import run_contents
        from topology.outputs import claim_output_file
        if not args.evaluate_only:
            for name in study.run_names(remedy, variants):  # refuse before anything is solved or written
                held = None if args.overwrite else run_contents(run_root / name)  # (Note [run dir ownership])
                if held:
                    raise ConfigError(f"--run-dir {run_root} holds {held} in {name}/; pass another --run-dir, "
                                      f"--overwrite to replace its runs, or --evaluate-only to evaluate them")
        claim_output_file(args.out, overwrite=args.overwrite, flag="--out")
        claim_output_file(args.plot, overwrite=args.overwrite, flag="--plot")
        start, load_at_start = time.time(), os.getloadavg()
        remedies = (remedy, *variants)
        times = recorded_network_times(
            run_root, setting=setting, remedies=remedies, evaluate_only=args.evaluate_only,
            solve=lambda: study.network_times(setting["stages"], setting["skip_ratio"], remedies))
        runs = study.study_runs(setting, steps=steps, times=times, remedy=remedy, variants=variants,
                                warmup_steps=cfg.optim.warmup_steps)
        if args.evaluate_only:  # each run's steps come from the solved network (the equal-time run's)
            for name, run in runs.items():
                check_trained(run_root / name, run, args.overrides)
        elif args.overwrite:
            clear_runs(run_root, runs)
        tasks = study_tasks(runs, run_root, args)
        run_tasks(tasks, parallel=args.jobs, log_dir=run_root,
                  env={**os.environ, "OMP_NUM_THREADS": "1", **package_env()})
        results = {name: study_result(name, run, run_root) for name, run in runs.items()}
        report = {"setting": setting, "answers": study.study_answers(results), "network": times,
                  "config": args.config, "overrides": args.overrides, "model": cfg.model,
                  "trained": not args.evaluate_only, "jobs": args.jobs, "total_seconds": time.time() - start,
                  "load_average": {"start": load_at_start, "end": os.getloadavg()},  # 1, 5, 15 minutes
                  "runs": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        if args.plot:
            plot_study(report, args.plot)
        a = report["answers"]
        print(" | ".join(f"{k} {a[k]:.4f}" for k in ("q1_equal_time", "q1_equal_tokens", "q1_full_depth",
                                                       "full_over_trained_depth", "q2_skip_half_over_full",
                                                       "q3_full_half_over_full", "layerdrop_q2", "time_ratio"))
              + f" | {report['total_seconds'] / 60:.1f} min{' (evaluation only)' if args.evaluate_only else ''} | {args.out}")


if __name__ == "__main__":
    main()
