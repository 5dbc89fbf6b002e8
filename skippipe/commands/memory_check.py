"""Activation memory of one stage with and without activation checkpointing, each in a fresh process.

    python scripts/memory_check.py --out reports/memory_check.json
    python scripts/memory_check.py --model llama-tiny --stages 2 --batch 2 --seq-len 64 --out /tmp/m.json

Defaults: one llama-500m stage of 4 layers (stage 1 of 6: no embedding or head), three microbatches of
2 x 512 tokens in flight (three forwards, then three backwards), fp32. How memory is measured: Note
[measuring activation memory] in skippipe/memory_probe.py (CUDA allocator statistics, or the process's
resident-set high-water mark on a CPU).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from skippipe.commands import package_env
from topology.errors import ArgumentParser, ConfigError, cli_errors

CHILD_ENV = "SKIPPIPE_MEMORY_CHECK_MODE"  # set in the two child processes: none | layer


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="write the report (JSON) here")
    p.add_argument("--model", default="llama-500m", help="model YAML or a name in configs/models")
    p.add_argument("--stages", type=int, default=6, help="the model is cut into this many stages (default 6)")
    p.add_argument("--stage", type=int, default=1, help="the stage measured (default 1: layers only)")
    p.add_argument("--batch", type=int, default=2, help="sequences per microbatch (default 2)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--in-flight", type=int, default=3, help="microbatches held at once (default 3)")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (default fp32)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the stage runs")
    return p


def probe(args, *, checkpointing: bool) -> dict:
    """One measurement in this process (skippipe/memory_probe.py): the child's whole job."""
    import torch

    from skippipe.context import pick_device
    from skippipe.memory_probe import probe_stage
    from skippipe.precision import resolve_precision
    from topology.model_spec import load_model_spec
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    device = pick_device(args.device)
    spec = load_model_spec(args.model)
    return probe_stage(spec, stage_index=args.stage, num_stages=args.stages, batch=args.batch, seq_len=args.seq_len,
                       in_flight=args.in_flight, checkpointing=checkpointing,
                       precision=resolve_precision(args.precision, device), device=device)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with cli_errors():
        mode = os.environ.get(CHILD_ENV)
        if mode:  # the child: one measurement, as JSON on stdout
            print(json.dumps(probe(args, checkpointing=mode == "layer")))
            return
        if args.precision not in ("fp32", "bf16"):
            raise ConfigError(f"--precision must be fp32 or bf16, got {args.precision!r}")
        from skippipe.memory_probe import MMAP_THRESHOLD_ENV
        results = {}
        for mode in ("none", "layer"):
            command = [sys.executable, "-m", "skippipe.commands.memory_check", *(argv if argv is not None else sys.argv[1:])]
            env = {**os.environ, **package_env(), **MMAP_THRESHOLD_ENV, CHILD_ENV: mode}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise ConfigError(f"the {mode} probe failed: {done.stderr.strip().splitlines()[-1:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = results["layer"]["activation_bytes"] / results["none"]["activation_bytes"]
        report = {"model": args.model, "stage": args.stage, "stages": args.stages, "batch": args.batch,
                  "seq_len": args.seq_len, "in_flight": args.in_flight, "precision": args.precision,
                  "parameters": results["none"]["parameters"], "method": results["none"]["method"],
                  "activation_bytes_without_checkpointing": results["none"]["activation_bytes"],
                  "activation_bytes_with_checkpointing": results["layer"]["activation_bytes"],
                  "ratio": ratio, "seconds_per_microbatch": {m: r["seconds_per_microbatch"] for m, r in results.items()},
                  "command": "skippipe-memory-check " + " ".join(argv if argv is not None else sys.argv[1:])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        mib = 2 ** 20
        print(f"activation memory: {report['activation_bytes_without_checkpointing'] / mib:,.1f} MiB without, "
              f"{report['activation_bytes_with_checkpointing'] / mib:,.1f} MiB with activation checkpointing "
              f"(ratio {ratio:.3f}) | {report['method']} | wrote {args.out}")


if __name__ == "__main__":
    main()
