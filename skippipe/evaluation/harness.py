"""lm-evaluation-harness on skippipe exports, beside the evaluator's perplexity of the same checkpoint.

    lm_eval_report(checkpoint, work, keep=0.5, docs=100, batch_size=8, device="cpu", seed=0) -> dict

exports the checkpoint twice into WORK (full depth, and `keep` of the stages, even placement, the
evaluate command's default), writes the three held-out tasks (harness_tasks.py) into WORK/tasks, and runs
lm-eval's Python API on each export exactly as a user would: `model="hf"`,
`model_args="pretrained=EXPORT"` and nothing else (no prefix token, no tokenizer, no dtype). The report
holds every task's metrics for both exports and the evaluator's figures for the same kept stages:

    evaluator.ppl               exp(mean token cross entropy) over the held-out windows (evaluate command)
    evaluator.byte_perplexity   exp(total cross entropy / UTF-8 bytes of those target tokens): the unit of
                                lm-eval's byte_perplexity (identical to ppl with the byte tokenizer)

Note [comparable perplexity]: the rolling task's documents are the held-out split cut at every
ROLLING_WINDOWS * context tokens, and lm-eval scores each in disjoint windows of the export's
model_max_length (= the training context), the first conditioned on BOS. The evaluator scores the same
split in disjoint windows of `context` tokens. The two differ only in the first token of each window (BOS
vs. nothing before the window) and at document edges, so byte perplexities agree closely (measured:
within 0.4% on the 300-step debug model, README).
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch

from topology.errors import ConfigError

INSTALL_HINT = "lm-evaluation-harness with its Hugging Face model is not installed; pip install 'skippipe[lmeval]'"
ROLLING_WINDOWS = 16  # rolling documents of 16 training windows: ~1 KB each with the byte tokenizer
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def require_lm_eval() -> None:
    """Raises ConfigError (INSTALL_HINT, naming what is missing) unless lm_eval and what its "hf" model
    imports (lm-eval's own [hf] extra: transformers, accelerate) are installed: skippipe's [lmeval] extra."""
    missing = [name for name in ("lm_eval", "accelerate", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")


def go_offline() -> None:
    """Nothing downloads: `datasets`, `huggingface_hub` and `transformers` read these when imported."""
    os.environ.update(OFFLINE)


def lm_eval_metrics(results: dict, task: str) -> dict[str, float | None]:
    """lm-eval's {'acc,none': x, 'acc_stderr,none': s, 'alias': ...} for one task -> {'acc': x,
    'acc_stderr': s}; a value lm-eval could not compute ('N/A') is None."""
    out = {}
    for key, value in results["results"][task].items():
        name, _, filter_name = key.partition(",")
        if not filter_name:
            continue  # 'alias' and other labels
        out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


def run_lm_eval(export: Path, task_dir: Path, tasks: list[str], *, batch_size: int, device: str) -> dict:
    """lm_eval.simple_evaluate on one export with the local tasks; returns {task: metrics}."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export}", tasks=tasks,
                                      batch_size=batch_size, device=device, log_samples=False,
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return {task: lm_eval_metrics(results, task) for task in tasks}


def target_bytes(tokenizer, batches) -> int:
    """UTF-8 bytes of every target token of the held-out batches (one byte each with the byte tokenizer)."""
    from skippipe.data import ByteTokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return sum(t.numel() for _, t in batches)
    return sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for _, t in batches for row in t)


def evaluator_figures(model, batches, stages: list[int], num_bytes: int) -> dict:
    """The evaluator's perplexity of `stages` on the held-out batches (omission.evaluate_stages)."""
    from skippipe.evaluation.omission import evaluate_stages
    row = evaluate_stages(model, batches, stages)
    total = row["loss"] * row["tokens"]
    return {"stages": stages, "loss": row["loss"], "ppl": math.exp(row["loss"]), "tokens": row["tokens"],
            "bytes": num_bytes, "byte_perplexity": math.exp(total / num_bytes)}


def lm_eval_report(checkpoint: str | Path, work: str | Path, *, keep: float, docs: int, batch_size: int,
                   device: str, seed: int, overwrite: bool = False) -> dict:
    """Export full and `keep`-depth folders into `work`, run lm-eval on both, and return the report
    ({'exports': {'full'|'keep_<keep>': {'path', 'stages', 'lm_eval': {task: metrics}, 'evaluator': {...}}}, ...}).

    Raises ConfigError for a bad checkpoint, a non-empty `work` (without `overwrite`), too little
    held-out text, or a missing lm-eval.
    """
    require_lm_eval()
    go_offline()
    from skippipe.checkpoint import load_full_model
    from skippipe.data import load_corpus
    from skippipe.evaluation.export import export_hf
    from skippipe.evaluation.harness_tasks import TASK_NAMES, write_tasks
    from skippipe.evaluation.omission import checkpoint_summary, kept_stages, num_kept
    from skippipe.rundir import claim_output_dir

    model, cfg, folder = load_full_model(checkpoint)
    claim_output_dir(work, overwrite=overwrite, flag="--work")
    work = Path(work)
    # The datasets cache of the task files lives with them, not in the user's ~/.cache.
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "datasets_cache"))
    context = cfg.data.context or model.spec.context
    corpus = load_corpus(cfg.data.corpus, context=context, tokenizer=cfg.data.tokenizer,
                         val_fraction=cfg.data.val_fraction, vocab_size=model.spec.vocab_size)
    tokenizer, val = corpus.tokenizer, corpus.val
    batches = list(corpus.val_batches(8))
    chunk = ROLLING_WINDOWS * context
    rolling = [tokenizer.decode(val[i:i + chunk].tolist()) for i in range(0, len(val), chunk)]
    counts = write_tasks(rolling, tokenizer.decode(val.tolist()), work / "tasks", docs=docs, seed=seed,
                         max_gen_toks=min(32, context // 2))
    num_bytes = target_bytes(tokenizer, batches)
    provenance = checkpoint_summary(folder)
    exports = {}
    for label, stages in (("full", list(range(model.num_stages))),
                          (f"keep_{keep:g}", kept_stages(model.num_stages, keep, "even"))):
        path = export_hf(model, work / label, tokenizer=cfg.data.tokenizer, context=context, stages=stages,
                         provenance=provenance)
        print(f"{label}: stages {stages} -> {path}; running lm-eval", flush=True)
        exports[label] = {"path": str(path), "stages": stages,
                          "lm_eval": run_lm_eval(path, work / "tasks", list(TASK_NAMES), batch_size=batch_size,
                                                 device=device),
                          "evaluator": evaluator_figures(model, batches, stages, num_bytes)}
    import lm_eval
    import transformers
    return {**provenance, "model": cfg.model, "num_stages": model.num_stages, "keep": keep,
            "kept": num_kept(model.num_stages, keep), "tokenizer": cfg.data.tokenizer, "context": context,
            "lm_eval_version": lm_eval.__version__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "task_dir": str(work / "tasks"), "documents": counts,
            "lm_eval_command": f"lm_eval --model hf --model_args pretrained=EXPORT --tasks {','.join(TASK_NAMES)} "
                               f"--include_path {work / 'tasks'} --batch_size {batch_size} --device {device}",
            "exports": exports}
