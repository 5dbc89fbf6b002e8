#!/usr/bin/env python
"""Chaos run: train on the emulated cluster, kill one node mid-iteration, and check that the job carries on.

    .venv/bin/python scripts/chaos.py --out reports/chaos.json            # as root: network namespaces

Eight torchrun agents (one per node of configs/topologies/emulated-8.yaml, each in its own namespace with
shaped links), elastic (--nnodes 7:8 --max-restarts 3), train with a checkpoint every --checkpoint-every
steps. After step --kill-after is logged and half an iteration more, every process of one node gets
SIGKILL (by default the sole replica of a stage, so that stage must be taken over). The survivors re-plan
and resume from the last checkpoint (Note [node loss] in skippipe/elastic.py). Without root the nodes are
plain localhost agents told apart by SKIPPIPE_NODE, and the report says so. A few minutes on 2 cores.

The report (JSON): completed, steps_requested, steps_completed, nodes_before, nodes_after, steps_redone,
checkpoint_interval, loss per step across the failure, the plans before and after, recovery time; and a
PNG of the loss across the failure beside it (--plot). Exit 1 when a claim fails: a step missing, no
fewer nodes after, more than one checkpoint interval redone, or a loss jump at the resume larger than
twice the largest step-to-step change in the ten steps before the checkpoint.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from topology.errors import cli_errors  # noqa: E402


def main() -> None:
    from skippipe.emulation.chaos import ChaosSettings
    d = ChaosSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/chaos.json", help="the report (JSON)")
    p.add_argument("--plot", help="loss plot PNG (default: chaos.png beside --out)")
    p.add_argument("--topology", default=d.topology, help="topology YAML to emulate")
    p.add_argument("--config", default=d.config, help="training YAML")
    p.add_argument("--skip-ratio", type=float, default=d.skip_ratio)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--kill-after", type=int, default=d.kill_after_step, help="kill a node during the step after this one")
    p.add_argument("--bandwidth-scale", type=float, default=d.bandwidth_scale, help="multiply every bandwidth by this")
    p.add_argument("--work-dir", default="runs/chaos", help="run dir, logs and the shaped topology go here")
    p.add_argument("--localhost", action="store_true", help="plain localhost agents even where namespaces work")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds allowed for the job")
    p.add_argument("overrides", nargs="*", help=f"dotted config overrides (default: {' '.join(d.overrides)})")
    args = p.parse_args()
    with cli_errors():
        if not 0 < args.kill_after < args.steps:
            raise ValueError(f"--kill-after {args.kill_after} must be between 1 and --steps - 1 ({args.steps - 1})")
        if args.checkpoint_every <= 0:
            raise ValueError("--checkpoint-every must be positive: without checkpoints there is nothing to resume")
        settings = ChaosSettings(topology=args.topology, config=args.config, skip_ratio=args.skip_ratio,
                                 steps=args.steps, checkpoint_every=args.checkpoint_every,
                                 kill_after_step=args.kill_after, bandwidth_scale=args.bandwidth_scale,
                                 overrides=args.overrides or d.overrides, timeout_s=args.timeout)
        try:
            sys.exit(run(args, settings))
        except RuntimeError as exc:  # the job failed: the message names the node and where its log is
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)


def run(args: argparse.Namespace, settings) -> int:
    from skippipe.emulation.chaos import plot, run_chaos
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run_chaos(settings, args.work_dir, namespaces=not args.localhost)
    report["command"] = shlex.join(["scripts/chaos.py", *sys.argv[1:]])
    report["plot"] = str(plot(report, args.plot or out.with_name("chaos.png")))
    claims = {"every requested step completed": report["completed"],
              "fewer nodes after than before": report["nodes_after"] < report["nodes_before"],
              "at most one checkpoint interval redone": report["steps_redone"] <= report["checkpoint_interval"],
              "loss continuous across the failure": report["loss_continuity"]["continuous"]}
    report["claims"] = claims
    out.write_text(json.dumps(report, indent=1))
    print(f"{report['emulation']}: killed {report['killed_node']} (stage {report['stage_of_killed_node']}, "
          f"{report['replicas_of_that_stage_before']} replica(s)) during step {report['killed_during_step']}; "
          f"resumed after step {report['resumed_after_step']} on {report['nodes_after']} of {report['nodes_before']} "
          f"nodes, {report['recovery_s'] or float('nan'):.1f} s later; {report['steps_completed']}/{report['steps_requested']} steps")
    for claim, ok in claims.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {claim}")
    print(f"report: {out}, plot: {report['plot']}")
    return 0 if all(claims.values()) else 1


if __name__ == "__main__":
    main()
