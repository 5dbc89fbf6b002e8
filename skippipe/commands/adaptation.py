"""Re-planning while training, measured: static, adaptive and oracle runs on the emulated cluster.

    sudo .venv/bin/python scripts/adaptation.py --out reports/adaptation.json    # or skippipe-adaptation

Needs root. Two events, each in three runs of --steps steps at skip ratio 0.25 (one emulated cluster,
configs/topologies/emulated-8.yaml): one link's bandwidth cut to a quarter at --event-step, and one
node's compute slowed 3x at --event-step. static: re-planning off; adaptive: on; oracle: the same
placement with paths and order solved from the start for the network after the event. The link and the
node are the ones the simulator says matter most to the static plan (skippipe/emulation/adaptation.py).
Compute is emulated as the reference model's on nodes --compute-speedup times faster than the
topology's, and every time divided by --time-scale (same module says why).
The report (JSON): per event its kind, step, target and the reason it was chosen, and per run the
iteration seconds of every step, their median from event step + 6 on, the losses, and for the adaptive
run the step after which it re-planned.
"""
import json
import shlex
import sys
from pathlib import Path

from topology.errors import ArgumentParser, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="the report (JSON)")
    p.add_argument("--topology", default="configs/topologies/emulated-8.yaml", help="topology YAML to emulate")
    p.add_argument("--config", default="configs/train/emulated.yaml", help="training YAML")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--event-step", type=int, default=6, help="the step at which the events happen")
    p.add_argument("--events", default="link,node", help="which events to run: link, node or both")
    p.add_argument("--work-dir", default="runs/adaptation", help="run dirs, plans and logs go here")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    p.add_argument("--nice", type=int, default=-19, help="scheduling priority of the emulated nodes")
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="every emulated time (hops, compute) is the reference model's divided by this")
    p.add_argument("--compute-speedup", type=float, default=4.0,
                   help="emulated nodes compute this many times faster than the topology says")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. schedule.replan.patience=2")
    return p


def main() -> None:
    args = build_parser().parse_args()
    from skippipe.emulation.emulate import Interrupted, JobFailed
    with cli_errors():
        kinds = tuple(k.strip() for k in args.events.split(",") if k.strip())
        if not kinds or set(kinds) - {"link", "node"}:
            raise ValueError(f"--events {args.events!r}: pass link, node or link,node")
        if not args.time_scale > 0 or not args.compute_speedup > 0:
            raise ValueError(f"--time-scale {args.time_scale} and --compute-speedup {args.compute_speedup} "
                             f"must be positive, e.g. 2 and 4")
        if not 1 < args.event_step < args.steps:
            raise ValueError(f"--event-step {args.event_step} must lie inside the run's {args.steps} steps")
        try:
            from skippipe.emulation.adaptation import run_adaptation
            report = run_adaptation(topology_path=args.topology, config=args.config, work_dir=args.work_dir,
                                    steps=args.steps, event_step=args.event_step, overrides=args.overrides,
                                    timeout_s=args.timeout, nice=args.nice, kinds=kinds,
                                    time_scale=args.time_scale, compute_speedup=args.compute_speedup)
        except JobFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except Interrupted as exc:
            print(f"error: interrupted by {exc}; the emulated cluster was removed", file=sys.stderr)
            sys.exit(143)
    report["command"] = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    for entry in report["events"]:
        print(f"{entry['description']}: {json.dumps(entry['targets'])}")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
