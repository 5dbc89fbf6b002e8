"""Held-out loss of trained runs with the residual stream rescaled at inference (issue 14: how far a
skip-trained model at full depth is from calibrated).

    python scripts/residual_scale.py --out reports/residual_scale.json RUN [RUN ...]

For each run (a run dir or a checkpoints/step_* folder): the loss with every stage kept and at the even
half (keep 0.5), with each omissible stage's contribution to the residual stream times each --scales value
and stochastic depth's survival rule, at two grains: the whole stage's update, and each layer's attention
and MLP outputs (skippipe/experiments/residual_scale.py). The weights are never changed. Progress on
stderr. 22 figures a run (20 where the rule is 1.0); for the omission study's model, 2-4 s a figure
on one CPU core (the 12 runs of reports/residual_scale.json: 11 minutes).
"""
import json
import shlex
import sys
from pathlib import Path

from topology.errors import ArgumentParser, ConfigError, cli_errors

DEFAULT_SCALES = "1.0,0.9,0.8,0.7,0.6"


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", help="trained run dirs or checkpoints/step_* folders")
    p.add_argument("--out", required=True, help="report JSON")
    p.add_argument("--scales", default=DEFAULT_SCALES,
                   help=f"comma-separated residual scales in (0, 2], besides the survival rule's (default: {DEFAULT_SCALES})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (without it, refused)")
    return p


def parse_scales(text: str) -> list[float]:
    """"1.0,0.8" -> [1.0, 0.8]; ConfigError (one line) for anything but numbers in (0, 2]."""
    from skippipe.experiments.residual_scale import check_scale
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--scales {text!r} is not a comma-separated list of numbers; e.g. 1.0,0.8,0.6") from None
    return [check_scale(scale) for scale in scales]


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        from skippipe.experiments.residual_scale import measure_run
        from topology.outputs import claim_output_file
        claim_output_file(args.out, overwrite=args.overwrite, flag="--out")
        scales = parse_scales(args.scales)
        report = {"command": shlex.join(["python", "scripts/residual_scale.py", *sys.argv[1:]]),
                  "runs": [measure_run(run, scales=scales) for run in args.runs]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
