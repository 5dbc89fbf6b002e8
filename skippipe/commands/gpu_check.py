"""Check the runtime on a GPU: bf16 stage throughput, MFU and peak memory at the llama-500m, llama-1.5b
and llama-8b shapes, and path-faithful training on the GPU against the CPU (skippipe/gpu_check.py).

    python scripts/gpu_check.py --out reports/gpu_check.json
    python scripts/gpu_check.py --device cpu --tiny --out /tmp/self_test.json   # the same code, in seconds

Without a CUDA device (and without --device cpu) it says so in one line and exits 2. Exit 1 when the
device's training losses disagree with the CPU's.
"""
import sys
import tempfile
from pathlib import Path

from topology.errors import ArgumentParser, ConfigError, cli_errors


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="write the report (JSON) here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default), or cpu for the self-test")
    p.add_argument("--tiny", action="store_true", help="llama-tiny and 3 steps: a quick self-test of the code path")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        import torch
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("no CUDA device is visible, so there is nothing to check; run this on a GPU machine "
                              "(or --device cpu --tiny for the self-test)")
        from skippipe.gpu_check import run_check, write_report
        device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        with tempfile.TemporaryDirectory() as tmp:
            report = run_check(device=device, out_dir=Path(tmp), tiny=args.tiny)
        print(f"wrote {write_report(report, args.out)} ({report['seconds']:.0f} s)")
        if not report["training"]["agree"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
