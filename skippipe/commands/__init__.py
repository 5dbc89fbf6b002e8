"""skippipe's command-line programs, one module each, installed as console commands.

Each module has a ``main()`` that reads ``sys.argv``; ``scripts/<name>.py`` in a checkout and the
``skippipe-<name>`` console command (pyproject.toml, [project.scripts]) both call it, and
``python -m skippipe <name>`` dispatches to it (skippipe/__main__.py). ``COMMANDS`` is that one list.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# subcommand -> (module with main(), one line of what it does). topology and scheduler live in their
# own packages; the rest here.
COMMANDS = {
    "train": ("skippipe.commands.train", "train with partial, reordered pipelines (under torchrun, or --single-process)"),
    "evaluate": ("skippipe.commands.evaluate", "perplexity with a fraction of the stages omitted"),
    "export": ("skippipe.commands.export", "a checkpoint as a Hugging Face LlamaForCausalLM folder"),
    "omission-study": ("skippipe.commands.omission_study", "skip-trained vs full-trained, evaluated with stages omitted"),
    "residual-scale": ("skippipe.commands.residual_scale", "trained runs' held-out loss with the residual stream rescaled at inference"),
    "emulate-cluster": ("skippipe.commands.emulate_cluster", "real multi-node torchrun over shaped network namespaces (root)"),
    "bench-overhead": ("skippipe.commands.bench_overhead", "skippipe at skip 0 against torch.distributed.pipelining's GPipe"),
    "chaos": ("skippipe.commands.chaos", "kill a node mid-training; the job re-plans and carries on"),
    "adaptation": ("skippipe.commands.adaptation", "static vs adaptive vs oracle runs with a link or node event mid-run (root)"),
    "memory-check": ("skippipe.commands.memory_check", "one stage's activation memory with and without activation checkpointing"),
    "train-tokenizer": ("skippipe.commands.train_tokenizer", "an offline byte-level BPE tokenizer with BOS/EOS/pad declared"),
    "prepare-data": ("skippipe.commands.prepare_data", "tokenize a corpus once into memory-mapped token files"),
    "import-hf": ("skippipe.commands.import_hf", "a local Hugging Face LlamaForCausalLM folder as a model spec and a step-0 checkpoint"),
    "measure-data": ("skippipe.commands.measure_data", "prepare and train from a large vs a small prepared corpus: MB/s, memory, first step"),
    "lm-eval-check": ("skippipe.commands.lm_eval_check", "lm-evaluation-harness, unmodified and offline, on a full and a half-depth export"),
    "gpu-check": ("skippipe.commands.gpu_check", "stage throughput, MFU and memory at real shapes on a GPU; training on it against the CPU"),
    "topology": ("topology.cli", "show a network, or simulate a plan on it (also python -m topology)"),
    "scheduler": ("scheduler.cli", "solve, validate and compare plans (also python -m scheduler)"),
}


def train_command() -> list[str]:
    """argv that runs the training command in a child process, installed or from a checkout."""
    return [sys.executable, "-m", "skippipe.commands.train"]


def package_env() -> dict[str, str]:
    """PYTHONPATH for a child process, so that it imports this very copy of skippipe (a checkout too)."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
