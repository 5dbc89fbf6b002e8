"""Train on an emulated heterogeneous cluster: one network namespace per node, links shaped in the kernel.

    sudo .venv/bin/python scripts/emulate_cluster.py --topology configs/topologies/emulated-8.yaml \
        --skip-ratios 0.25,0 --steps 6 --profile --out reports/emulate.json

Needs root (namespaces, veths, a bridge, tc). For each skip ratio, one torchrun agent per namespace runs
scripts/train.py with --nnodes N --node-rank i and c10d rendezvous on node 0's address; bandwidths are the
topology's scaled by --bandwidth-scale (default: so that the model's messages take as long as
--reference-model's on the real links), latency is added in-process. Everything made is removed at the
end, also on failure, Ctrl-C or SIGTERM. The report: per run the measured iteration time (median over
the steps after the first) and the simulator's prediction; with --profile, profiled vs shaped bandwidth.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

from topology.errors import ArgumentParser, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--topology", required=True, help="topology YAML (or scenario) to emulate")
    p.add_argument("--skip-ratios", default="0.25,0", help="comma-separated skip ratios, one run each")
    p.add_argument("--steps", type=int, default=6, help="training steps per run")
    p.add_argument("--profile", action="store_true", help="runs start with --topology measure (profile, then solve)")
    p.add_argument("--config", default="emulated", help="training YAML or shipped config name")
    p.add_argument("--bandwidth-scale", type=float, help="multiply every bandwidth by this (default: auto, so that --reference-model's messages take as long as on the real links)")
    p.add_argument("--reference-model", default="llama-500m", help="model whose message time the auto scale matches")
    p.add_argument("--latency-scale", type=float, default=1.0, help="multiply every latency by this")
    p.add_argument("--work-dir", default="runs/emulate", help="run dirs, logs and the shaped topology go here")
    p.add_argument("--out", default="reports/emulate.json", help="the report (JSON); Gantt PNGs beside it")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    p.add_argument("--nice", type=int, default=-19, help="scheduling priority of the emulated nodes (0: as others)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs in --work-dir and the --out report "
                   "(without it, a run dir that holds a run or an existing report is refused)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. schedule.num_microbatches=12")
    return p


def main() -> None:
    args = build_parser().parse_args()
    from skippipe.emulation.emulate import Interrupted, JobFailed
    with cli_errors():
        try:
            run(args)
        except JobFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except Interrupted as exc:  # Ctrl-C, SIGTERM, SIGHUP: everything made was removed on the way out
            print(f"error: interrupted by {exc}; the emulated cluster was removed", file=sys.stderr)
            sys.exit(143)


def run(args: argparse.Namespace) -> None:
    from skippipe.emulation.emulate import run_benchmark
    ratios = [float(x) for x in args.skip_ratios.split(",") if x.strip()]
    if not ratios:
        raise ValueError("--skip-ratios is empty; e.g. --skip-ratios 0.25,0")
    out = Path(args.out)
    from skippipe.rundir import run_contents
    from topology.outputs import claim_output_file
    for ratio in ratios:  # refuse before the cluster is built (Note [run dir ownership], skippipe/rundir.py)
        run_dir = Path(args.work_dir) / f"skip{ratio:g}"
        held = None if args.overwrite else run_contents(run_dir)
        if held:
            raise ValueError(f"--work-dir {args.work_dir} holds {held} in {run_dir.name}/; pass another --work-dir, "
                             f"or --overwrite to replace its runs")
    claim_output_file(out, overwrite=args.overwrite, flag="--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run_benchmark(args.topology, skip_ratios=ratios, steps=args.steps, profile=args.profile,
                           config=args.config, work_dir=args.work_dir, bandwidth_scale=args.bandwidth_scale,
                           reference_model=args.reference_model, latency_scale=args.latency_scale,
                           overrides=args.overrides, plots_dir=out.parent, timeout_s=args.timeout, nice=args.nice,
                           overwrite=args.overwrite)
    report["command"] = shlex.join(["scripts/emulate_cluster.py", *sys.argv[1:]])
    out.write_text(json.dumps(report, indent=1))
    for key, value in report.get("ratio_to_full", {}).items():
        print(f"skip {key} / full: measured {value['measured']:.3f}, predicted {value['predicted']:.3f}")
    if "profile_bandwidth_error" in report:
        print(f"profiled bandwidth: median relative error {report['profile_bandwidth_error']:.2%}")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
