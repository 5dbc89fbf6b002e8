"""Three local lm-evaluation-harness tasks made from a run's held-out text: no download, no hub.

    write_tasks(held_out_text_chunks, held_out_lines, TASK_DIR, docs=100, seed=0)
    lm_eval.simple_evaluate(model="hf", model_args="pretrained=EXPORT", tasks=TASK_NAMES,
                            task_manager=TaskManager(include_path=TASK_DIR))

Each task is a YAML file (lm-eval 0.4 task format) whose `dataset_path: json` points at a JSON-lines file
beside it, so `datasets` reads it from disk:

    skippipe_rolling   loglikelihood_rolling over the held-out split cut into documents: lm-eval's
                       word_perplexity, byte_perplexity and bits_per_byte (its default metrics for the
                       output type). The evaluator's perplexity is over the same held-out tokens.
    skippipe_choice    multiple_choice: the first half of a held-out line, and four continuations: its
                       own second half and the second halves of three other held-out lines (a seeded
                       draw). acc and acc_norm; chance is 0.25.
    skippipe_continue  generate_until: the first words of a held-out line; the target is the rest of the
                       line (at most CONTINUE_MAX_WORDS words), generation stops at "\\n". exact_match
                       (surrounding whitespace ignored) and chrF (sacrebleu, an lm-eval dependency).

Note [held-out only]: every document comes from the run's validation split (data.split_ranges), text
the model never trained on, so the tasks measure the same thing as the evaluator's perplexity.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from topology.errors import ConfigError

ROLLING, CHOICE, CONTINUE = "skippipe_rolling", "skippipe_choice", "skippipe_continue"
TASK_NAMES = (ROLLING, CHOICE, CONTINUE)
NUM_CHOICES = 4
LINE_MIN_WORDS = 6        # a line shorter than this leaves too little prompt or continuation
CONTINUE_MAX_WORDS = 3    # a short target, so a small model's greedy continuation can match it exactly


def usable_lines(text: str) -> list[str]:
    """Held-out lines with at least LINE_MIN_WORDS words, whitespace-normalised, each once, in order."""
    seen, out = set(), []
    for line in text.splitlines():
        words = line.split()
        normalised = " ".join(words)
        if len(words) >= LINE_MIN_WORDS and normalised not in seen:
            seen.add(normalised)
            out.append(normalised)
    return out


def choice_docs(lines: Sequence[str], *, docs: int, seed: int) -> list[dict]:
    """Multiple-choice documents: {'context', 'choices' (4 continuations, each starting with a space),
    'label' (index of the true one)}; distractors are the second halves of other lines (seeded draw)."""
    halves = []
    for line in lines:
        words = line.split()
        cut = len(words) // 2
        halves.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    rng = random.Random(seed)
    out = []
    for index in rng.sample(range(len(halves)), min(docs, len(halves))):
        context, truth = halves[index]
        others = [halves[j][1] for j in range(len(halves)) if halves[j][1] != truth]
        if len(others) < NUM_CHOICES - 1:
            break
        choices = rng.sample(others, NUM_CHOICES - 1)
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, truth)
        out.append({"context": context, "choices": choices, "label": label})
    return out


def continue_docs(lines: Sequence[str], *, docs: int, seed: int) -> list[dict]:
    """Generation documents: {'prompt' (all but the last words of a line), 'target' (those last, at most
    CONTINUE_MAX_WORDS, words, with a leading space)}."""
    rng = random.Random(seed + 1)
    out = []
    for index in rng.sample(range(len(lines)), min(docs, len(lines))):
        words = lines[index].split()
        cut = len(words) - min(CONTINUE_MAX_WORDS, len(words) // 2)
        out.append({"prompt": " ".join(words[:cut]), "target": " " + " ".join(words[cut:])})
    return out


def _task_yaml(name: str, data_file: Path, body: dict) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", **body, "metadata": {"version": 1.0}}


def task_specs(data_dir: Path, *, max_gen_toks: int) -> dict[str, dict]:
    """The three task configs (lm-eval 0.4 YAML keys) for documents in data_dir/<task>.jsonl."""
    return {
        ROLLING: _task_yaml(ROLLING, data_dir / f"{ROLLING}.jsonl", {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}),
        CHOICE: _task_yaml(CHOICE, data_dir / f"{CHOICE}.jsonl", {
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": "",  # each choice carries its own leading space
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}),
        CONTINUE: _task_yaml(CONTINUE, data_dir / f"{CONTINUE}.jsonl", {
            "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "target",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": [r"^\s+", r"\s+$"]},
                            {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}]}),
    }


def write_tasks(rolling_texts: Sequence[str], held_out_text: str, task_dir: str | Path, *, docs: int, seed: int,
                max_gen_toks: int) -> dict[str, int]:
    """Write the three tasks' .jsonl documents and .yaml configs into task_dir; returns {task: documents}.

    `rolling_texts`: the held-out split as documents; `held_out_text`: the same split as one text, whose
    lines make the multiple-choice and generation documents (Note [held-out only]). Raises ConfigError
    when the split has too few usable lines for a task.
    """
    import yaml
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    lines = usable_lines(held_out_text)
    if len(lines) < NUM_CHOICES:
        raise ConfigError(f"the held-out split has {len(lines)} lines of {LINE_MIN_WORDS}+ words, too few for "
                          f"the multiple-choice task; use a larger corpus or data.val_fraction")
    documents = {ROLLING: [{"text": t} for t in rolling_texts if t.strip()],
                 CHOICE: choice_docs(lines, docs=docs, seed=seed),
                 CONTINUE: continue_docs(lines, docs=docs, seed=seed)}
    for name, spec in task_specs(task_dir, max_gen_toks=max_gen_toks).items():
        (task_dir / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents[name]))
        (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return {name: len(d) for name, d in documents.items()}
