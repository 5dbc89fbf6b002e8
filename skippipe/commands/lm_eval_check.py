"""lm-evaluation-harness, unmodified, on a full and a half-depth export of a checkpoint, offline.

    python scripts/lm_eval_check.py --checkpoint runs/debug --work /tmp/lmeval --out lm_eval.json

Exports the checkpoint at full depth and with --keep of its stages (even placement) into --work, writes
three local tasks made from the run's held-out text (a loglikelihood_rolling, a multiple_choice and a
generate_until task; skippipe/evaluation/harness_tasks.py), runs lm-eval's Python API on each export with
model="hf", model_args="pretrained=EXPORT" and nothing else, and writes every task's metrics for both
exports next to the evaluator's perplexity of the same stages. Nothing is downloaded. lm-eval is an
optional extra: pip install 'skippipe[lmeval]'.
"""
import json
from pathlib import Path

from topology.errors import ArgumentParser, ConfigError, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir (its newest checkpoint) or a checkpoints/step_* folder")
    p.add_argument("--work", required=True, help="folder for the two exports and the task files (must be new or "
                   "empty unless --overwrite)")
    p.add_argument("--out", required=True, help="the JSON report to write (refused if it exists, unless --overwrite)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of the stages in the second export")
    p.add_argument("--docs", type=int, default=100, help="documents of the multiple-choice and generation tasks "
                   "(the rolling task always covers the whole held-out split)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (lm-eval's --device)")
    p.add_argument("--seed", type=int, default=0, help="the draw of the task documents and distractors")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --work and replace --out")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        from skippipe.context import pick_device
        from skippipe.evaluation.harness import lm_eval_report, require_lm_eval
        from skippipe.evaluation.omission import check_keep
        from topology.outputs import claim_output_file

        require_lm_eval()
        check_keep(args.keep)
        if args.docs < 1 or args.batch_size < 1:
            raise ConfigError("--docs and --batch-size must be positive")
        claim_output_file(args.out, overwrite=args.overwrite, flag="--out")
        report = lm_eval_report(args.checkpoint, args.work, keep=args.keep, docs=args.docs,
                                batch_size=args.batch_size, device=str(pick_device(args.device)), seed=args.seed,
                                overwrite=args.overwrite)
        print("export | stages | task | metric | lm-eval | evaluator")
        for label, row in report["exports"].items():
            ev = row["evaluator"]
            for task, metrics in row["lm_eval"].items():
                for metric, value in metrics.items():
                    if metric.endswith("_stderr"):
                        continue
                    mine = {"byte_perplexity": ev["byte_perplexity"]}.get(metric)
                    print(f"{label} | {row['stages']} | {task} | {metric} | "
                          f"{'n/a' if value is None else f'{value:.4f}'} | {'' if mine is None else f'{mine:.4f}'}")
            print(f"{label} | evaluator ppl {ev['ppl']:.4f} over {ev['tokens']:,} held-out tokens")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
