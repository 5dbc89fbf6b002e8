"""Inference with omitted stages: perplexity on the held-out split with only a fraction of stages kept.

    model, cfg, folder = load_full_model("runs/debug")   # skippipe.checkpoint
    batches = held_out_batches(cfg, model.spec)
    cache = {}  # kept set -> its loss: a set the table and the depth summary both name runs once
    rows = omission_table(model, batches, keeps=[1.0, 0.75, 0.5], placements=["even", "random"], cache=cache)
    depth = depth_summary(model, batches, trained=6, rows=rows, cache=cache)

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
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from scheduler.depth import even_stages
from skippipe.checkpoint import checkpoint_step
from skippipe.config import Config
from skippipe.data import load_corpus
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
        return even_stages(num_stages, k)
    if placement == "first":
        return list(range(k))
    if placement == "last":
        return [0] + list(range(num_stages - k + 1, num_stages))
    others = random.Random(seed).sample(range(1, num_stages), k - 1)
    return [0] + sorted(others)


# --- loading a run ---------------------------------------------------------------------------------

def held_out_batches(cfg: Config, spec: ModelSpec, batch_size: int = 8, max_batches: int | None = None) -> Batches:
    """The run's validation windows, materialised once (Note [same held-out tokens])."""
    context = cfg.data.context or spec.context
    corpus = load_corpus(cfg.data.corpus, context=context, tokenizer=cfg.data.tokenizer,
                         val_fraction=cfg.data.val_fraction, vocab_size=spec.vocab_size)
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


Cache = dict[tuple[int, ...], dict]  # kept set -> its evaluate_stages result


def cached_evaluation(model: FullModel, batches: Batches, stages: Sequence[int], cache: Cache, log=None) -> dict:
    """evaluate_stages of `stages`, run once per `cache`: a table and a depth summary that share one cache
    evaluate a kept set both name once (the loss is deterministic, so the second run would repeat it)."""
    key = tuple(stages)
    if key not in cache:
        cache[key] = evaluate_stages(model, batches, key)
        if log is not None:
            log(f"stages {list(key)} | loss {cache[key]['loss']:.4f} | ppl {math.exp(cache[key]['loss']):.3f} | "
                f"{cache[key]['tokens_per_s']:,.0f} tok/s")
    return cache[key]


def omission_table(model: FullModel, batches: Batches, *, keeps: Sequence[float],
                   placements: Sequence[str] = ("even",), seeds: int = 3, log=None,
                   cache: Cache | None = None) -> list[dict]:
    """One row per (keep, placement): perplexity, loss, its ratio to the full model, tokens/s.

    `random` draws `seeds` kept sets (seeds 0..seeds-1) and reports the mean perplexity with the spread
    (standard deviation, min, max); every other placement is one kept set. A kept set is evaluated once
    however many rows name it (`cache`, shared with depth_summary when given), and the full model is always
    evaluated as the reference.
    """
    num_stages = model.num_stages
    cache = {} if cache is None else cache

    def run(stages: list[int]) -> dict:
        return cached_evaluation(model, batches, stages, cache, log)

    if batches:
        # Warm-up on a whole batch of the measured shape: the first forwards pay for lazy initialisation
        # and for the allocator and kernels of that shape (one sequence was not enough: the first row
        # then read 702 tok/s against 44,940 for the next), which is no row's speed.
        with torch.no_grad():
            for _ in range(2):
                model.forward_path(batches[0][0].to(next(model.parameters()).device), range(num_stages))
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


def trained_depth(cfg: Config, num_stages: int) -> int:
    """Stages a training path visited (stage 0 included): the path length of the run's skip ratio, or of
    its LayerDrop ratio (the expected depth); full-depth microbatches mixed in do not change it."""
    from scheduler.constraints import path_length
    return path_length(num_stages, cfg.schedule.layerdrop or cfg.schedule.skip_ratio)


def depth_summary(model: FullModel, batches: Batches, *, trained: int, rows: Sequence[dict] = (),
                  cache: Cache | None = None) -> dict:
    """Per model: perplexity with every stage, at its trained depth (`trained` stages, even placement),
    and the best kept set among the even set of every depth 1..S and every set `rows` evaluated (`cache`:
    the results omission_table already has, so they are not computed again).

    Returns {"full": {...}, "trained_depth", "at_trained_depth": {...}, "full_over_trained_depth" (perplexity
    ratio), "best": {...}, "by_set": [...]}, each {...} = {"stages", "depth", "loss", "ppl"}; `by_set` lists
    every set evaluated, shallowest first. All on the same `batches` (Note [same held-out tokens]).
    """
    num_stages = model.num_stages
    cache = {} if cache is None else cache
    sets = {tuple(kept_stages(num_stages, k / num_stages, "even")) for k in range(1, num_stages + 1)}
    for row in rows:
        stages = row["stages"]
        sets |= {tuple(x) for x in stages} if stages and isinstance(stages[0], list) else {tuple(stages)}
    by_set = []
    for stages in sorted(sets, key=lambda x: (len(x), x)):
        loss = cached_evaluation(model, batches, stages, cache)["loss"]
        by_set.append({"stages": list(stages), "depth": len(stages), "loss": loss, "ppl": math.exp(loss)})
    find = {tuple(r["stages"]): r for r in by_set}
    full = find[tuple(range(num_stages))]
    at_trained = find[tuple(kept_stages(num_stages, trained / num_stages, "even"))]
    return {"full": full, "trained_depth": trained, "at_trained_depth": at_trained,
            "full_over_trained_depth": full["ppl"] / at_trained["ppl"],
            "best": min(by_set, key=lambda r: r["loss"]), "by_set": by_set}


# --- output ----------------------------------------------------------------------------------------

CSV_FIELDS = ("keep", "placement", "num_kept", "num_stages", "ppl", "ppl_std", "ppl_min", "ppl_max", "ratio_to_full",
              "loss", "seeds", "tokens", "tokens_per_s", "stages")


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


# How each placement chooses the kept stages, for legends (kept_stages has the rule).
PLACEMENT_LEGEND = {"even": "even (kept stages spread evenly over the depth)", "random": "random (mean, min-max band)",
                    "first": "first (the shallowest stages)", "last": "last (stage 0 and the deepest)"}
X_LABEL = "fraction of stages kept at inference (stage 0 always kept); to the right: more of the model left out"


def plot_curves(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Perplexity against kept fraction: one line per (curve, placement); random with its min-max band.

    The y axis starts at 1, the least perplexity there is, so that a small change looks small; each
    point is labelled with its ratio to the same model with every stage.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, rows in curves.items():
        for placement in dict.fromkeys(r["placement"] for r in rows):
            mine = sorted((r for r in rows if r["placement"] == placement), key=lambda r: r["keep"])
            x = [r["keep"] for r in mine]
            name = PLACEMENT_LEGEND.get(placement, placement)
            line, = ax.plot(x, [r["ppl"] for r in mine], marker="o", label=f"{label}, {name}" if label else name)
            for r in mine:
                ax.annotate(f"x{r['ratio_to_full']:.3f}", (r["keep"], r["ppl"]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7, color=line.get_color())
            if placement == "random":
                ax.fill_between(x, [r["ppl_min"] for r in mine], [r["ppl_max"] for r in mine],
                                color=line.get_color(), alpha=0.15)
    ax.set_xlabel(X_LABEL, fontsize=8)
    ax.set_ylabel("held-out perplexity (x: ratio to all stages)")
    ax.set_ylim(bottom=1.0, top=ax.get_ylim()[1] * 1.05)
    ax.invert_xaxis()  # left to right: more and more of the model omitted
    ax.grid(alpha=0.3)
    ax.legend(title="kept stages chosen", fontsize=8, title_fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checkpoint_summary(folder: Path) -> dict:
    return {"checkpoint": str(folder), "step": checkpoint_step(folder)}
