"""Import a local Hugging Face LlamaForCausalLM folder: a skippipe model spec and a step-0 checkpoint.

    python scripts/import_hf.py --model path/to/Llama-3.2-1B --out runs/llama1b-init --stages 4
    python scripts/import_hf.py --model path/to/Llama-3.2-1B --out runs/llama1b-init --config configs/train/debug.yaml
    python scripts/train.py --config C model=runs/llama1b-init/model.yaml train.init_from=runs/llama1b-init ...

Reads config.json and *.safetensors only (nothing is downloaded). GQA, rope_theta, rms_norm_eps and tied
or untied heads are honoured; rope scaling, attention/MLP biases, sliding windows and other architectures
are refused with the config.json field named. The tokenizer.json of the folder, if any, is copied.
"""
from topology.errors import ArgumentParser, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a local LlamaForCausalLM folder (config.json, *.safetensors)")
    p.add_argument("--out", required=True, help="a new run dir for model.yaml, config.yaml and checkpoints/")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--stages", type=int, help="cut the checkpoint into this many stages (default: none; give "
                     "--stages or --config)")
    how.add_argument("--config", help="a training config: its schedule.num_stages, and the base of config.yaml "
                     "(default: none; give --stages or --config)")
    p.add_argument("--name", help="the model's name in model.yaml (default: the folder's name)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        from skippipe.hf_import import import_hf
        out = import_hf(args.model, args.out, num_stages=args.stages, config=args.config, name=args.name)
        print(f"wrote {out}: model.yaml, config.yaml, checkpoints/step_000000; fine-tune with "
              f"skippipe-train ... model={out / 'model.yaml'} train.init_from={out}")


if __name__ == "__main__":
    main()
