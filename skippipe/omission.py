"""Inference with omitted stages: perplexity on the held-out split with only a fraction of stages kept.

    model, cfg, folder = load_full_model("runs/debug")
    batches = held_out_batches(cfg, model.spec)
    rows = omission_table(model, batches, keeps=[1.0, 0.75, 0.5], placements=["even", "random"])

A kept fraction ``keep`` of S stages keeps ``round(S * keep)`` of them (halves up, at least one). Stage 0 is always
kept: it holds the embedding, the final norm and the LM head. The kept stages run in their natural order
(0, 1, 2, ...), whatever order training paths used. Which stages are kept is the *placement*:

    even    spread evenly over the depth: S=8, 4 kept -> 0, 2, 4, 6
    first   the lowest stages (an early exit): 0, 1, 2, 3
    last    stage 0 and the highest stages: 0, 5, 6, 7
    random  stage 0 and a seeded random draw of the others; one row averages several seeds

Note [same held-out tokens]: every row of a table is computed on the very same validation windows (the
batches are materialised once and reused), so the ratios between rows measure the omitted stages and
nothing else. Perplexity is exp of the mean token cross entropy over all those windows.
"""
from __future__ import annotations

import csv
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from skippipe.checkpoint import checkpoint_meta, checkpoint_root, checkpoint_step, latest_checkpoint, load_weights
from skippipe.config import Config, load_config
from skippipe.data import load_corpus, load_tokenizer
from skippipe.identity import check_tokenizer, recorded_spec
from skippipe.model import FullModel
from topology.errors import ConfigError
from topology.model_spec import ModelSpec

PLACEMENTS = ("even", "random", "first", "last")
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def check_keep(keep: float) -> float:
    keep = float(keep)
    if not 0.0 < keep <= 1.0 or math.isnan(keep):
        raise ConfigError(f"kept fraction {keep} is outside (0, 1]; pass fractions such as --keep 1.0,0.75,0.5")
    return keep


def parse_keeps(text: str) -> list[float]:
    """'1.0,0.75,0.5' -> [1.0, 0.75, 0.5], each checked."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"bad --keep {text!r}; pass comma-separated fractions such as 1.0,0.75,0.5") from None
    if not values:
        raise ConfigError("--keep is empty; pass comma-separated fractions such as 1.0,0.75,0.5")
    return [check_keep(v) for v in values]


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
    return placement


def num_kept(num_stages: int, keep: float) -> int:
    """round(S * keep), halves up, at least 1: the rule of a path's length (scheduler path_length)."""
    return max(1, min(num_stages, math.floor(num_stages * check_keep(keep) + 0.5)))


def kept_stages(num_stages: int, keep: float, placement: str, seed: int = 0) -> list[int]:
    """The stages kept, in natural order; always including stage 0."""
    k = num_kept(num_stages, keep)
    check_placement(placement)
    if placement == "even":
        # floor(i * S / k) for i < k: distinct, starts at 0, gaps differ by at most one.
        return [i * num_stages // k for i in range(k)]
    if placement == "first":
        return list(range(k))
    if placement == "last":
        return [0] + list(range(num_stages - k + 1, num_stages))
    others = random.Random(seed).sample(range(1, num_stages), k - 1)
    return [0] + sorted(others)


# --- loading a run ---------------------------------------------------------------------------------

def checkpoint_folder(path: str | Path) -> Path:
    """A run dir (its newest checkpoint) or one checkpoints/step_* folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}; pass the --run-dir of a training run "
                          "(or one of its checkpoints/step_* folders)")
    if (path / "meta.json").is_file():
        return path
    if not (checkpoint_root(path) / "latest").is_file():
        raise ConfigError(f"{path} holds no checkpoint (no {checkpoint_root(path) / 'latest'}); train with "
                          "--run-dir there first, or pass a checkpoints/step_* folder")
    return latest_checkpoint(path)


def load_full_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[FullModel, Config, Path]:
    """(model with every stage's trained weights, the run's resolved config, the checkpoint folder).

    Reads only the weight files of the checkpoint layout (skippipe/checkpoint.py), never the optimizer
    state: the evaluator and the exporter need neither the optimizer nor the data position. The model is
    built from the spec the checkpoint records (Note [self-describing checkpoints] in identity.py), and
    the run's tokenizer must still be the one it recorded. Raises ConfigError (one line) for a missing,
    damaged, foreign or non-finite checkpoint, or a changed tokenizer file.
    """
    folder = checkpoint_folder(path)
    cfg = load_config(folder / "config.yaml")
    meta = checkpoint_meta(folder)
    spec, fallback = recorded_spec(meta, folder, cfg.model)
    check_tokenizer(meta, load_tokenizer(cfg.data.tokenizer), folder)
    model = FullModel(spec, meta["num_stages"], cfg.train.seed)
    for stage_index, stage in enumerate(model.stages):
        # A missing, damaged or foreign weights file is a one-line ConfigError naming it.
        load_weights(stage, folder / f"stage{stage_index}.safetensors")
    if fallback:
        print(fallback, file=sys.stderr, flush=True)
    return model.to(device).eval(), cfg, folder


def held_out_batches(cfg: Config, spec: ModelSpec, batch_size: int = 8, max_batches: int | None = None) -> Batches:
    """The run's validation windows, materialised once (Note [same held-out tokens])."""
    context = cfg.data.context or spec.context
    corpus = load_corpus(cfg.data.corpus, context, cfg.data.tokenizer, cfg.data.val_fraction, spec.vocab_size)
    return list(corpus.val_batches(batch_size, max_batches))


# --- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_stages(model: FullModel, batches: Batches, stages: Sequence[int]) -> dict:
    """Mean token loss with only `stages` run (in the given order), with the tokens/s of the forward."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for inputs, targets in batches:
        logits = model.forward_path(inputs.to(device), stages)
        loss = FullModel.loss(logits, targets.to(device))
        total += float(loss) * targets.numel()
        count += targets.numel()
    seconds = time.perf_counter() - start
    if count == 0:
        raise ConfigError("no held-out tokens to evaluate; use a larger validation split (data.val_fraction)")
    return {"loss": total / count, "tokens": count, "seconds": seconds, "tokens_per_s": count / max(seconds, 1e-9)}


def omission_table(model: FullModel, batches: Batches, keeps: Sequence[float],
                   placements: Sequence[str] = ("even",), seeds: int = 3, log=None) -> list[dict]:
    """One row per (keep, placement): perplexity, loss, its ratio to the full model, tokens/s.

    `random` draws `seeds` kept sets (seeds 0..seeds-1) and reports the mean perplexity with the spread
    (standard deviation, min, max); every other placement is one kept set. A kept set is evaluated once
    however many rows name it, and the full model is always evaluated as the reference.
    """
    num_stages = model.num_stages
    cache: dict[tuple[int, ...], dict] = {}

    def run(stages: list[int]) -> dict:
        key = tuple(stages)
        if key not in cache:
            cache[key] = evaluate_stages(model, batches, stages)
            if log is not None:
                log(f"stages {list(key)} | loss {cache[key]['loss']:.4f} | ppl {math.exp(cache[key]['loss']):.3f} | "
                    f"{cache[key]['tokens_per_s']:,.0f} tok/s")
        return cache[key]

    if batches:  # warm-up: the first forward pays for lazy initialisation, which is no row's speed
        with torch.no_grad():
            model.forward_path(batches[0][0][:1].to(next(model.parameters()).device), range(num_stages))
    full_ppl = math.exp(run(list(range(num_stages)))["loss"])
    rows = []
    for keep in keeps:
        for placement in placements:
            draws = range(seeds if placement == "random" else 1)
            sets = [kept_stages(num_stages, keep, placement, seed) for seed in draws]
            results = [run(s) for s in sets]
            ppls = [math.exp(r["loss"]) for r in results]
            ppl = statistics.fmean(ppls)
            tokens = sum(r["tokens"] for r in results)
            seconds = sum(r["seconds"] for r in results)
            rows.append({
                "keep": keep, "placement": placement, "num_stages": num_stages, "num_kept": len(sets[0]),
                "stages": sets[0] if len(sets) == 1 else sets,
                "ppl": ppl, "loss": statistics.fmean(r["loss"] for r in results),
                "ppl_std": statistics.pstdev(ppls), "ppl_min": min(ppls), "ppl_max": max(ppls),
                "seeds": len(sets), "ratio_to_full": ppl / full_ppl,
                "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
            })
    return rows


# --- output ----------------------------------------------------------------------------------------

CSV_FIELDS = ["keep", "placement", "num_kept", "num_stages", "ppl", "ppl_std", "ppl_min", "ppl_max", "ratio_to_full",
              "loss", "seeds", "tokens", "tokens_per_s", "stages"]


def write_json(rows: list[dict], path: str | Path, **extra) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**extra, "results": rows}, indent=2) + "\n")


def write_csv(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "stages": json.dumps(row["stages"]).replace(" ", "")})


def plot_curves(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Perplexity against kept fraction: one line per (curve, placement); random with its min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, rows in curves.items():
        for placement in dict.fromkeys(r["placement"] for r in rows):
            mine = sorted((r for r in rows if r["placement"] == placement), key=lambda r: r["keep"])
            x = [r["keep"] for r in mine]
            name = f"{label} ({placement})" if label else placement
            line, = ax.plot(x, [r["ppl"] for r in mine], marker="o", label=name)
            if placement == "random":
                ax.fill_between(x, [r["ppl_min"] for r in mine], [r["ppl_max"] for r in mine],
                                color=line.get_color(), alpha=0.15)
    ax.set_xlabel("fraction of stages kept")
    ax.set_ylabel("held-out perplexity")
    ax.invert_xaxis()  # left to right: more and more of the model omitted
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checkpoint_summary(folder: Path) -> dict:
    return {"checkpoint": str(folder), "step": checkpoint_step(folder)}


# --- the omission study (scripts/omission_study.py) --------------------------------------------------

def training_curve(run_dir: str | Path, tokens_per_step: int) -> list[dict]:
    """step, tokens seen, training loss and (where evaluated) validation loss, from the run's metrics."""
    from skippipe.metrics import read_metrics
    return [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["loss"], "val_loss": r.get("val_loss")}
            for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def row_at(rows: list[dict], keep: float, placement: str) -> dict:
    return next(r for r in rows if r["placement"] == placement and math.isclose(r["keep"], keep))


def study_report(skip: list[dict], full: list[dict], headline: str = "even") -> dict:
    """The three answers from the two models' omission tables (computed on the same held-out tokens).

    q1: validation loss of the skip-trained model over the full-trained one, both with every stage;
    q2, q3: perplexity at keep 0.5 over keep 1.0 for the skip- and the full-trained model, with the
    `headline` placement; the same ratios for every placement measured are under "by_placement".
    """
    def half_over_full(rows: list[dict], placement: str) -> float:
        return row_at(rows, 0.5, placement)["ppl"] / row_at(rows, 1.0, placement)["ppl"]

    placements = list(dict.fromkeys(r["placement"] for r in skip))
    return {
        "q1_val_loss_ratio": row_at(skip, 1.0, headline)["loss"] / row_at(full, 1.0, headline)["loss"],
        "q2_skip_half_over_full": half_over_full(skip, headline),
        "q3_full_half_over_full": half_over_full(full, headline),
        "headline_placement": headline,
        "by_placement": {p: {"q2_skip_half_over_full": half_over_full(skip, p),
                             "q3_full_half_over_full": half_over_full(full, p)} for p in placements},
    }


def plot_study(report: dict, path: str | Path, placements: Sequence[str] = ("even", "random")) -> None:
    """Left: perplexity against kept fraction for both models (the `placements`; every placement is in
    the report); right: their training curves by tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {"skip": "tab:blue", "full": "tab:red"}
    styles = {"even": "-", "random": "--", "first": ":", "last": "-."}
    for name, run in report["runs"].items():
        rows = run["omission"]
        for placement in [p for p in dict.fromkeys(r["placement"] for r in rows) if p in placements]:
            mine = sorted((r for r in rows if r["placement"] == placement), key=lambda r: r["keep"])
            x = [r["keep"] for r in mine]
            left.plot(x, [r["ppl"] for r in mine], styles.get(placement, "-"), marker="o", color=colours[name],
                      label=f"{run['label']}, {placement}", alpha=1.0 if placement == "even" else 0.6)
            if placement == "random":
                left.fill_between(x, [r["ppl_min"] for r in mine], [r["ppl_max"] for r in mine],
                                  color=colours[name], alpha=0.1)
        curve = [c for c in run["curve"] if c["loss"] is not None]  # null: a step skipped as non-finite
        right.plot([c["tokens"] for c in curve], [c["loss"] for c in curve], color=colours[name], lw=0.8, alpha=0.5,
                   label=f"{run['label']}, train")
        val = [(c["tokens"], c["val_loss"]) for c in curve if c["val_loss"] is not None]
        if val:
            right.plot(*zip(*val), "o-", color=colours[name], label=f"{run['label']}, validation (all stages)")
    left.set_xlabel("fraction of stages kept at inference")
    left.set_ylabel("held-out perplexity (log scale)")
    left.set_yscale("log")
    left.invert_xaxis()
    left.set_title(f"q2 = {report['q2_skip_half_over_full']:.3f} (skip), q3 = {report['q3_full_half_over_full']:.3f} (full)")
    right.set_xlabel("training tokens")
    right.set_ylabel("mean token cross entropy")
    right.set_title(f"q1 = {report['q1_val_loss_ratio']:.4f} (validation loss, skip / full)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
