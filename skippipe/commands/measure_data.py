"""Measure prepared data at scale: prepare a ~1 GB generated corpus, then train from it and from a 10 MB one.

    python scripts/measure_data.py --tokenizer tokenizer.json --work /tmp/skippipe-measure --out R.json

The corpus (the built-in text's paragraphs, shuffled into numbered documents) is written under --work,
outside the repository, and deleted at the end unless --keep-files. Reported: for each corpus, the
prepare's peak resident memory and text MB/s (each prepare is its own process, measured by wait4);
then 20 single-process steps of llama-tiny-4k from each prepared folder: seconds from process start to
the end of step 1, and resident memory after step 20 (VmRSS). A report, not a test: timings depend on
the machine and its load.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from skippipe.commands import package_env
from topology.errors import ArgumentParser, cli_errors

TRAIN_CHILD = """
import json, os, sys, time
from skippipe.config import load_config
from skippipe.planning import make_plan
from skippipe.trainer import train
marks = {}
def hook(step, stages):
    if step == 1:
        marks["first_step_s"] = time.time() - float(os.environ["MEASURE_START"])
cfg = load_config("debug", ["model=llama-tiny-4k", "schedule.skip_ratio=0.25", "train.steps=20",
    "train.eval_batches=1", "train.eval_every=0", "train.single_process=true", "data.context=64",
    f"data.corpus={sys.argv[1]}", f"train.run_dir={sys.argv[2]}"])
train(cfg, make_plan(cfg), on_gradients=hook)
status = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM"))}
print(json.dumps({**marks, "rss_after_20_steps_mb": status["VmRSS"], "anonymous_rss_after_20_steps_mb": status["RssAnon"],
                  "file_rss_after_20_steps_mb": status["RssFile"], "peak_rss_own_mb": status["VmHWM"]}))
"""


def generate(folder: Path, total_bytes: int, seed: int = 0) -> int:
    """Numbered documents of shuffled built-in paragraphs in 100 MB .txt files; returns bytes written."""
    from skippipe.data import builtin_text
    paragraphs = [p for p in builtin_text().split("\n\n") if p.strip()]
    rng, written, index = random.Random(seed), 0, 0
    folder.mkdir(parents=True)
    while written < total_bytes:
        with (folder / f"part{index:03d}.txt").open("w", encoding="utf-8") as f:
            part = 0
            while part < 100_000_000 and written + part < total_bytes:
                doc = f"Document {rng.randrange(10**9)}\n\n" + "\n\n".join(rng.sample(paragraphs, 40)) + "\n\n"
                part += f.write(doc)
        written += part
        index += 1
    return sum(p.stat().st_size for p in folder.iterdir())


def run_measured(command: list[str], env: dict) -> tuple[str, float, float]:
    """(stdout, seconds, peak RSS in MB) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {child.returncode}")
    return out, time.perf_counter() - started, usage.ru_maxrss / 1024


def build_parser() -> ArgumentParser:
    """The command's flags (README, Command reference)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--tokenizer", required=True, help="the BPE tokenizer.json to prepare with")
    p.add_argument("--work", default="/tmp/skippipe-measure", help="scratch folder, new, outside the repository "
                   "(default: /tmp/skippipe-measure)")
    p.add_argument("--big-mb", type=int, default=1000, help="size of the large corpus in MB (default: 1000)")
    p.add_argument("--small-mb", type=int, default=10, help="size of the small corpus in MB (default: 10)")
    p.add_argument("--out", required=True, help="the JSON report")
    p.add_argument("--keep-files", action="store_true", help="keep the generated corpora and prepared folders "
                   "(default: deleted at the end)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with cli_errors():
        work = Path(args.work)
        if work.exists():
            raise ValueError(f"--work {work} exists; pass a new scratch folder")
        env = {**os.environ, **package_env(), "OMP_NUM_THREADS": "1"}
        report = {"tokenizer": args.tokenizer, "corpora": {}}
        try:
            for label, mb in (("small", args.small_mb), ("big", args.big_mb)):
                size = generate(work / f"{label}-text", mb * 1_000_000)
                _, seconds, peak = run_measured([sys.executable, "-m", "skippipe.commands.prepare_data", "--corpus",
                                                 str(work / f"{label}-text"), "--tokenizer", args.tokenizer,
                                                 "--out", str(work / f"{label}-data"), "--context", "64"], env)
                meta = json.loads((work / f"{label}-data" / "meta.json").read_text())
                shutil.rmtree(work / f"{label}-text")  # the text is not needed for training
                report["corpora"][label] = {"text_mb": size / 1e6, "prepare_s": seconds, "prepare_mb_per_s": size / 1e6 / seconds,
                                            "prepare_peak_rss_mb": peak, "tokens": meta["num_tokens"]}
                print(label, report["corpora"][label], flush=True)
            for label in ("small", "big"):
                env["MEASURE_START"] = repr(time.time())
                out, _, peak = run_measured([sys.executable, "-c", TRAIN_CHILD, str(work / f"{label}-data"),
                                             str(work / f"{label}-run")], env)
                report["corpora"][label]["train"] = {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": peak}
                print(label, report["corpora"][label]["train"], flush=True)
            small, big = (report["corpora"][k]["train"] for k in ("small", "big"))
            report["first_step_ratio"] = big["first_step_s"] / small["first_step_s"]
            report["rss_difference_mb"] = big["rss_after_20_steps_mb"] - small["rss_after_20_steps_mb"]
        finally:
            if not args.keep_files:
                shutil.rmtree(work, ignore_errors=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"first step: {report['first_step_ratio']:.2f}x, RSS difference {report['rss_difference_mb']:.1f} MB; "
              f"wrote {args.out}")


if __name__ == "__main__":
    main()
