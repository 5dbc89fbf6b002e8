"""The omission study's figure (scripts/omission_study.py --plot): every run's perplexity against the
kept fraction (left) and its validation loss against predicted wall-clock on the paper's network (right).
Both panels are drawn from the report's own tables (skippipe/experiments/omission_study.py)."""
from __future__ import annotations

import math
from pathlib import Path

COLOURS = {"skip": "tab:blue", "full": "tab:red", "full_equal_time": "tab:orange", "layerdrop": "tab:green"}
VARIANT_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "black", "gold")


def plot_study(report: dict, path: str | Path) -> None:
    """Left: held-out perplexity of each run at each kept fraction (even placement solid, random dashed);
    right: validation loss (all stages) against the run's predicted time on the paper's network."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    variants = [name for name in report["runs"] if name not in COLOURS]
    for name, run in report["runs"].items():
        colour = COLOURS.get(name) or VARIANT_COLOURS[variants.index(name) % len(VARIANT_COLOURS)]
        for placement, style in (("even", "-"), ("random", "--")):
            mine = sorted((r for r in run["omission"] if r["placement"] == placement), key=lambda r: r["keep"])
            if mine:
                left.plot([r["keep"] for r in mine], [r["ppl"] for r in mine], style, marker="o", color=colour,
                          alpha=1.0 if placement == "even" else 0.5, label=f"{run['label']}, {placement}")
        # null: not measured at that step; a step skipped as non-finite (train.nonfinite=skip) has a null
        # training loss, and a non-finite validation loss is no point on a curve either
        val = [(c["network_s"] / 3600, c["val_loss"]) for c in run["curve"]
               if c["val_loss"] is not None and math.isfinite(c["val_loss"])]
        if val:
            right.plot(*zip(*val), "o-", color=colour, label=run["label"])
    a = report["answers"]
    left.set_xlabel("fraction of stages kept at inference")
    left.set_ylabel("held-out perplexity (log scale)")
    left.set_yscale("log")
    left.invert_xaxis()
    left.set_title(f"{report['setting']['name']}: q2 {a['q2_skip_half_over_full']:.3f}, q3 "
                   f"{a['q3_full_half_over_full']:.3f}, LayerDrop q2 {a['layerdrop_q2']:.3f}", fontsize=9)
    right.set_xlabel("predicted wall-clock on gcp-12-regions, 20 nodes, llama-500m (hours)")
    right.set_ylabel("validation loss, all stages")
    right.set_title(f"q1 equal time {a['q1_equal_time']:.3f}, equal tokens {a['q1_equal_tokens']:.3f}", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
