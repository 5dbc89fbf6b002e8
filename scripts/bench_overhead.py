#!/usr/bin/env python
"""skippipe's runtime overhead: skippipe at skip ratio 0 against torch.distributed.pipelining's ScheduleGPipe.

    .venv/bin/python scripts/bench_overhead.py --out reports/overhead.json

Same model, microbatches and ranks (one per stage, gloo on localhost, no shaping), both measured in one
run, step by step in alternation. overhead_ratio = skippipe iteration time / GPipe iteration time (medians
over the steps; the median over --repeat runs; see experiments/overhead.py for what an iteration holds
and why the steps alternate).
"""
import argparse
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rank_main(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist
    from experiments import overhead as bench
    from skippipe.config import load_config
    from skippipe.planning import make_plan, share_plan
    from topology.model_spec import load_model_spec
    torch.set_num_threads(1)  # world ranks share the machine's cores, as in the emulated runs
    # Ahead of other jobs on a shared machine, so that both runtimes see the machine to themselves.
    os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    # One more step than measured, logged and evaluated only there: every measured step is an ordinary
    # training step (no evaluation, no timeline gather, no checkpoint).
    last = args.steps + args.warmup + 1
    cfg = load_config(args.config, [
        f"schedule.num_nodes={world}", f"schedule.num_stages={world}", f"schedule.stage_sizes={','.join(['1'] * world)}",
        "schedule.topology=single-cluster", "schedule.skip_ratio=0", f"schedule.num_microbatches={args.microbatches}",
        # GPipe keeps every microbatch's activations; give skippipe the same memory so neither is capped.
        f"schedule.memory={args.microbatches}", f"train.steps={last}", f"train.log_every={last}", "train.eval_every=0",
        "train.checkpoint_every=0", f"train.run_dir={Path(out).parent / 'run'}", *args.overrides])
    plan = share_plan(lambda: make_plan(cfg), rank)
    spec = load_model_spec(cfg.model)
    skippipe, gpipe = bench.SkippipeRunner(cfg, plan), bench.GPipeRunner(cfg, spec, rank=rank, world=world)
    times = bench.interleaved(skippipe, gpipe, args.steps, args.warmup)
    if rank == 0:
        report = bench.summary(times)
        report["load_average"] = list(os.getloadavg())  # other jobs on the machine add noise
        report["nice"] = args.nice
        report.update({"world_size": world, "model": spec.name, "num_microbatches": cfg.schedule.num_microbatches,
                       "microbatch_size": cfg.schedule.microbatch_size, "steps": args.steps,
                       "warmup_steps": args.warmup, "skippipe_strategy": plan.strategy,
                       "skippipe_order": {str(k): [str(a) for a in v] for k, v in plan.order.items()}})
        Path(out).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train/debug.yaml", help="training YAML (model, microbatch size)")
    p.add_argument("--ranks", type=int, default=4, help="ranks = pipeline stages")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per iteration")
    p.add_argument("--steps", type=int, default=60, help="measured iterations of each method (interleaved)")
    p.add_argument("--warmup", type=int, default=4, help="iterations of each left out at the start")
    p.add_argument("--nice", type=int, default=-19 if os.geteuid() == 0 else 0,
                   help="scheduling priority of the ranks (default -19 as root: other jobs add noise)")
    p.add_argument("--out", default="reports/overhead.json", help="the report (JSON)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model=llama-tiny")
    p.add_argument("--repeat", type=int, default=3, help="independent runs; the report's ratio is their median")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for _ in range(args.repeat):
        runs.append(one_run(args))
        print(f"skippipe {runs[-1]['skippipe_iteration_s'] * 1e3:.1f} ms, GPipe {runs[-1]['gpipe_iteration_s'] * 1e3:.1f} "
              f"ms per iteration: ratio {runs[-1]['overhead_ratio']:.3f} (CPU seconds: {runs[-1]['cpu_ratio']:.3f}; "
              f"load average {runs[-1]['load_average'][0]:.1f} on {os.cpu_count()} cores)", flush=True)
    keys = ("overhead_ratio", "cpu_ratio", "skippipe_iteration_s", "gpipe_iteration_s")
    report = {key: statistics.median(r[key] for r in runs) for key in keys}
    report.update({f"{key}_runs": [r[key] for r in runs] for key in ("overhead_ratio", "cpu_ratio")})
    report["runs"] = runs
    report["command"] = shlex.join(["scripts/bench_overhead.py", *sys.argv[1:]])
    out.write_text(json.dumps(report, indent=1))
    print(f"overhead_ratio {report['overhead_ratio']:.3f} (median of {len(runs)} runs: "
          f"{', '.join(f'{x:.3f}' for x in report['overhead_ratio_runs'])})\nreport: {out}")


def one_run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=rank_main, args=(r, args.ranks, f"{tmp}/init", args, f"{tmp}/report.json"))
                 for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            sys.exit(f"error: a rank failed (exit codes {[proc.exitcode for proc in procs]})")
        return json.loads(Path(f"{tmp}/report.json").read_text())

if __name__ == "__main__":
    main()
