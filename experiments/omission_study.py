"""The omission study: does a model trained with skipping keep its quality when stages are omitted?

The report's three answers from the two models' omission tables (skippipe/evaluation/omission.py), and
its plot; scripts/omission_study.py trains the two models and calls these.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from skippipe.metrics import read_metrics


def training_curve(run_dir: str | Path, tokens_per_step: int) -> list[dict]:
    """step, tokens seen, training loss and (where evaluated) validation loss, from the run's metrics."""
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
