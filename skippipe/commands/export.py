"""Export a checkpoint as a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors, tokenizer).

    python scripts/export.py --checkpoint runs/debug --out hf/debug
    python scripts/export.py --checkpoint runs/debug --out hf/debug-half --keep 0.5   # half the stages

    from transformers import AutoModelForCausalLM, AutoTokenizer   # offline: nothing is downloaded
    model = AutoModelForCausalLM.from_pretrained("hf/debug"); tokenizer = AutoTokenizer.from_pretrained("hf/debug")
"""
from topology.errors import ArgumentParser, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir (its newest checkpoint) or a checkpoints/step_* folder")
    p.add_argument("--out", required=True, help="directory to write the Hugging Face folder to")
    p.add_argument("--keep", type=float, help="export only this fraction of the stages (stage 0 always kept; default: all stages)")
    p.add_argument("--placement", default="even", help="which stages --keep keeps: even|random|first|last")
    p.add_argument("--seed", type=int, default=0, help="the draw of --placement random")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (its files of the same "
                   "names are replaced); without it a non-empty --out is refused")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        from skippipe.checkpoint import checkpoint_folder, checkpoint_meta
        from skippipe.evaluation.export import EXPORT_FILES, export_checkpoint
        from skippipe.evaluation.omission import check_placement, kept_stages

        stages = None
        if args.keep is not None:
            check_placement(args.placement)
            num_stages = checkpoint_meta(checkpoint_folder(args.checkpoint))["num_stages"]
            stages = kept_stages(num_stages, args.keep, args.placement, args.seed)
        out = export_checkpoint(args.checkpoint, args.out, stages, overwrite=args.overwrite)
        files = ", ".join(str(out / name) for name in EXPORT_FILES)
        print(f"wrote {files}" + (f" (stages {stages})" if stages else ""))


if __name__ == "__main__":
    main()
