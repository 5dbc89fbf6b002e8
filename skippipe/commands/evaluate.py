"""Perplexity of a trained model with a fraction of its stages omitted at inference.

    python scripts/evaluate.py --checkpoint runs/debug --keep 1.0,0.75,0.5
    python scripts/evaluate.py --checkpoint runs/debug --keep 1.0,0.75,0.5 --placement even,random --seeds 5 \
        --json omission.json --csv omission.csv --plot omission.png

Stage 0 (embedding, final norm, LM head) is always kept and the kept stages run in natural order.
Placements: even (spread over the depth), first, last, random (averaged over --seeds draws, with the
spread). Also per model: perplexity with every stage and at its trained depth (the run's path length),
and the best kept set among the even set of every depth and the sets the table tried. Every row is measured on the same held-out windows of the run's corpus (skippipe/evaluation/omission.py).
"""
from topology.errors import ArgumentParser, ConfigError, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir (its newest checkpoint) or a checkpoints/step_* folder")
    p.add_argument("--keep", default="1.0,0.75,0.5", help="kept fractions of the stages, in (0, 1]")
    p.add_argument("--placement", default="even", help="even|random|first|last, or several comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="random draws averaged by the random placement")
    p.add_argument("--batches", type=int, help="held-out batches to use (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per held-out batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", help="write {\"results\": [...]} here (default: no JSON)")
    p.add_argument("--csv", help="write one row per (keep, placement) here (default: no CSV)")
    p.add_argument("--plot", help="write a PNG of perplexity against kept fraction here (default: no plot)")
    p.add_argument("--overwrite", action="store_true", help="replace --json/--csv/--plot files that exist "
                   "(without it an existing one is refused)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        from skippipe.checkpoint import load_full_model
        from skippipe.context import pick_device
        from skippipe.evaluation import omission

        keeps = omission.parse_keeps(args.keep)
        placements = [omission.check_placement(p.strip()) for p in args.placement.split(",") if p.strip()]
        if args.seeds < 1 or args.batch_size < 1 or (args.batches is not None and args.batches < 1):
            raise ConfigError("--seeds, --batches and --batch-size must be positive")
        from topology.outputs import claim_output_file
        for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
            claim_output_file(path, overwrite=args.overwrite, flag=flag)
        model, cfg, folder = load_full_model(args.checkpoint, pick_device(args.device))
        batches = omission.held_out_batches(cfg, model.spec, args.batch_size, args.batches)
        print(f"{folder} | {cfg.model} | {model.num_stages} stages | "
              f"{sum(t.numel() for _, t in batches):,} held-out tokens", flush=True)
        cache = {}  # each kept set is evaluated once, for the table and the depth summary alike
        rows = omission.omission_table(model, batches, keeps=keeps, placements=placements, seeds=args.seeds,
                                       cache=cache)
        print("keep | placement | kept | ppl | x full | tok/s")
        for r in rows:
            spread = f" ± {r['ppl_std']:.3f}" if r["seeds"] > 1 else ""
            print(f"{r['keep']:.2f} | {r['placement']} | {r['num_kept']}/{r['num_stages']} | {r['ppl']:.3f}{spread} | "
                  f"{r['ratio_to_full']:.3f} | {r['tokens_per_s']:,.0f}")
        depth = omission.depth_summary(model, batches, trained=omission.trained_depth(cfg, model.num_stages), rows=rows,
                                       cache=cache)
        best, at = depth["best"], depth["at_trained_depth"]
        print(f"all {model.num_stages} stages: ppl {depth['full']['ppl']:.3f} | trained depth {depth['trained_depth']} "
              f"{at['stages']}: ppl {at['ppl']:.3f} (all / trained {depth['full_over_trained_depth']:.3f}) | "
              f"best kept set {best['stages']} (depth {best['depth']}): ppl {best['ppl']:.3f}")
        meta = {**omission.checkpoint_summary(folder), "depth": depth, "model": cfg.model, "num_stages": model.num_stages,
                "skip_ratio": cfg.schedule.skip_ratio, "held_out_tokens": rows[0]["tokens"] // rows[0]["seeds"]}
        if args.json:
            omission.write_json(rows, args.json, **meta)
            print(f"wrote {args.json}")
        if args.csv:
            omission.write_csv(rows, args.csv)
            print(f"wrote {args.csv}")
        if args.plot:
            omission.plot_curves({"": rows}, args.plot, f"{cfg.model}, trained with skip ratio {cfg.schedule.skip_ratio}")
            print(f"wrote {args.plot}")
        if not (args.json or args.csv or args.plot):
            print("wrote no file (pass --json, --csv or --plot to keep the table)")


if __name__ == "__main__":
    main()
