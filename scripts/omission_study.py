#!/usr/bin/env python
"""Does a model trained with skipping keep its quality when stages are omitted at inference?

    python scripts/omission_study.py --out reports/omission.json --plot reports/omission.png

From one initialisation and one data order (the same seed and data node), trains the model of
configs/train/omission.yaml twice for the same tokens with the path-faithful single-process trainer:
with skip ratio 0.25 (the SkipPipe solver's paths) and with the full pipeline (0). Both runs go in
parallel, one thread each: on a 2-core CPU that is faster than one after the other. Then both are
evaluated at keep 1.0, 0.75 and 0.5 on the same held-out tokens. Report: q1_val_loss_ratio,
q2_skip_half_over_full, q3_full_half_over_full (experiments/omission_study.py, study_report), the omission
tables and the training curves. Extra arguments are dotted overrides for both runs (optim.lr=1e-3).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from topology.errors import ArgumentParser, ConfigError, cli_errors  # noqa: E402

RUNS = {"skip": ("skip ratio 0.25", 0.25), "full": ("full pipeline", 0.0)}


def parse_args():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="report JSON")
    p.add_argument("--plot", help="PNG: perplexity against kept fraction, and the training curves")
    p.add_argument("--steps", type=int, help="training steps of each run (default: the config's)")
    p.add_argument("--config", default=str(ROOT / "configs/train/omission.yaml"), help="training YAML of both runs")
    p.add_argument("--run-dir", help="where the two runs go (default: runs/omission-study)")
    p.add_argument("--seeds", type=int, default=3, help="draws of the random placement")
    p.add_argument("--sequential", action="store_true", help="train one run after the other, all threads each")
    p.add_argument("--overwrite", action="store_true", help="replace the runs in --run-dir and the --out/--plot "
                   "files (without it, a run dir that holds a run or an existing report is refused)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for both runs, e.g. optim.lr=1e-3")
    return p.parse_args()


def train_both(args, run_root: Path) -> None:
    threads = max(1, (os.cpu_count() or 2) // (1 if args.sequential else len(RUNS)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = {}
    for name, (_, skip_ratio) in RUNS.items():
        cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", args.config, "--single-process",
               "--skip-ratio", str(skip_ratio), "--run-dir", str(run_root / name), *args.overrides]
        cmd += ["--steps", str(args.steps)] if args.steps else []
        cmd += ["--overwrite"] if args.overwrite else []
        (run_root / name).mkdir(parents=True, exist_ok=True)
        log = open(run_root / name / "train.log", "w")
        print(f"training {name}: {' '.join(cmd[1:])} (log: {log.name})", flush=True)
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if args.sequential:
            procs[name].wait()
    for name, proc in procs.items():
        if proc.wait() != 0:
            tail = (run_root / name / "train.log").read_text().strip().splitlines()[-1:]
            raise ConfigError(f"the {name} run failed: {tail[0] if tail else 'no output'}")


def main() -> None:
    args = parse_args()
    with cli_errors():
        if args.steps is not None and args.steps < 1:
            raise ConfigError(f"--steps must be positive, got {args.steps}")
        from experiments import omission_study as study
        from skippipe.evaluation import omission
        from skippipe.checkpoint import load_full_model
        from skippipe.config import load_config

        cfg = load_config(args.config, args.overrides)  # bad input fails here, before any training
        run_root = Path(args.run_dir or ROOT / "runs/omission-study")
        from skippipe.rundir import claim_output_file, run_contents
        for name in RUNS:  # refuse before anything is written (Note [run dir ownership], skippipe/rundir.py)
            held = None if args.overwrite else run_contents(run_root / name)
            if held:
                raise ConfigError(f"--run-dir {run_root} holds {held} in {name}/; pass another --run-dir, or "
                                  f"--overwrite to replace both runs")
        claim_output_file(args.out, overwrite=args.overwrite, flag="--out")
        claim_output_file(args.plot, overwrite=args.overwrite, flag="--plot")
        start = time.time()
        train_both(args, run_root)
        trained = time.time() - start
        report = {"config": args.config, "overrides": args.overrides, "runs": {}}
        for name, (label, skip_ratio) in RUNS.items():
            model, run_cfg, folder = load_full_model(run_root / name)
            batches = omission.held_out_batches(run_cfg, model.spec)  # the same tokens for every row
            rows = omission.omission_table(model, batches, keeps=[1.0, 0.75, 0.5], placements=omission.PLACEMENTS,
                                           seeds=args.seeds)
            plan = json.loads((folder / "plan.json").read_text())
            tokens_per_step = len(plan["paths"]) * plan["microbatch_size"] * (run_cfg.data.context or model.spec.context)
            report["runs"][name] = {"label": label, "skip_ratio": skip_ratio, "run_dir": str(run_root / name),
                                    "steps": run_cfg.train.steps, "tokens": run_cfg.train.steps * tokens_per_step,
                                    "paths": sorted({tuple(p["stages"]) for p in plan["paths"]}),
                                    "omission": rows, "curve": study.training_curve(run_root / name, tokens_per_step)}
        report = {**study.study_report(report["runs"]["skip"]["omission"], report["runs"]["full"]["omission"]),
                  "model": cfg.model, "train_seconds": trained, "total_seconds": time.time() - start, **report}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        if args.plot:
            study.plot_study(report, args.plot)
        print(f"q1_val_loss_ratio {report['q1_val_loss_ratio']:.4f} | q2_skip_half_over_full "
              f"{report['q2_skip_half_over_full']:.4f} | q3_full_half_over_full {report['q3_full_half_over_full']:.4f} "
              f"| {report['total_seconds'] / 60:.1f} min | {args.out}")


if __name__ == "__main__":
    main()
