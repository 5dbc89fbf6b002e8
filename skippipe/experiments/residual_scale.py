"""Does recalibrating the residual stream at inference close the skip-trained model's gap at full depth?
(issue 14, q1_equal_tokens; the command: skippipe/commands/residual_scale.py)

A skip-trained model's paths visit each stage but the first in only part of its microbatches, so with
every stage kept its residual stream receives more stage updates than training ever gave it. Deep
Networks with Stochastic Depth (Huang et al., ECCV 2016, section 3, "test time") recalibrate a network
trained with randomly dropped residual blocks by multiplying each block's residual branch f(h) (not
h + f(h)) by the block's survival probability. This measures that rule on trained runs, without
retraining: each omissible stage's (1..S-1) contribution to the residual stream is multiplied by
`scale`, at two grains:
- "stage": a stage's whole update, hidden + scale * (stage(hidden) - hidden), the unit paths skip;
- "layer": every attention and MLP output of its layers (o_proj and down_proj), which an exported
  Llama checkpoint could carry in its weights.
Stage 0 (the embedding, the first layers, the head) is on every path and is never scaled. The survival
rule's scale is (trained depth - 1) / (S - 1): the share of the omissible stages a training path visits
(evaluation.omission.trained_depth).

Every figure is the mean token loss on the run's whole held-out split (Note [same held-out tokens]),
with every stage kept and at the even half (keep 0.5, evaluation.omission.kept_stages).
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from skippipe.model import FullModel
from topology.errors import ConfigError

GRAINS = ("stage", "layer")
KEEPS = (1.0, 0.5)


def check_scale(scale: float) -> float:
    """`scale` if it is a finite number in (0, 2]; ConfigError (one line) otherwise."""
    if not (math.isfinite(scale) and 0.0 < scale <= 2.0):
        raise ConfigError(f"residual scale {scale} is out of range; use a number in (0, 2] (1 = as trained)")
    return scale


@contextmanager
def scaled_residuals(model: FullModel, *, scale: float, grain: str) -> Iterator[None]:
    """Within the block, stages 1..S-1 of `model` add `scale` times their usual contribution to the
    residual stream (hidden states of shape (batch, seq_len, dim)), at `grain` "stage" or "layer" (module
    docstring). Forward hooks (none at 1.0), removed on exit; the weights are never changed. ConfigError
    for a scale out of (0, 2] or an unknown grain."""
    check_scale(scale)
    if grain not in GRAINS:
        raise ConfigError(f"unknown residual grain {grain!r}; use one of {', '.join(GRAINS)}")

    def whole_stage(module, inputs, output):
        return inputs[0] + scale * (output - inputs[0])

    def branch(module, inputs, output):
        return scale * output

    handles = []
    # At 1.0 no hook at all: h + 1 * (f(h) - h) need not be f(h) in floating point.
    for stage in list(model.stages)[1:] if scale != 1.0 else []:
        if grain == "stage":
            handles.append(stage.register_forward_hook(whole_stage))
        else:
            for layer in stage.layers.values():
                handles.append(layer.self_attn.o_proj.register_forward_hook(branch))
                handles.append(layer.mlp.down_proj.register_forward_hook(branch))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def survival_scale(num_stages: int, trained: int) -> float:
    """(trained - 1) / (num_stages - 1): the share of the omissible stages a training path of `trained`
    stages (stage 0 included) visits; 1.0 for a full-depth run or a single stage."""
    return 1.0 if num_stages <= 1 else (trained - 1) / (num_stages - 1)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_run(run: str | Path, *, scales: Sequence[float], grains: Sequence[str] = GRAINS,
                keeps: Sequence[float] = KEEPS, log=_progress) -> dict:
    """Held-out loss of one trained run (a run dir or checkpoint folder) at every (grain, keep, scale).

    Returns {"run", "num_stages", "trained_depth", "survival_scale", "losses": [{"grain", "keep",
    "stages", "scale", "loss", "ppl"}], "best": {(grain, keep) as "grain@keep": the row of least loss}}.
    The survival rule's scale is measured too. ConfigError (one line) for a missing or damaged checkpoint
    or a bad scale.
    """
    from skippipe.checkpoint import load_full_model
    from skippipe.evaluation.omission import evaluate_stages, held_out_batches, kept_stages, trained_depth
    model, cfg, folder = load_full_model(run)
    batches = held_out_batches(cfg, model.spec)
    num_stages = model.num_stages
    trained = trained_depth(cfg, num_stages)
    rule = survival_scale(num_stages, trained)
    all_scales = sorted({check_scale(float(s)) for s in scales} | {rule}, reverse=True)
    rows = []
    for grain in grains:
        for keep in keeps:
            stages = kept_stages(num_stages, keep, "even")
            for scale in all_scales:
                with scaled_residuals(model, scale=scale, grain=grain):
                    loss = evaluate_stages(model, batches, stages)["loss"]
                rows.append({"grain": grain, "keep": keep, "stages": stages, "scale": scale,
                             "loss": loss, "ppl": math.exp(loss)})
                log(f"{folder} | {grain} | keep {keep} {stages} | scale {scale:.3f} | loss {loss:.4f}")
    best = {}
    for row in rows:
        key = f"{row['grain']}@{row['keep']}"
        if key not in best or row["loss"] < best[key]["loss"]:
            best[key] = row
    return {"run": str(run), "num_stages": num_stages, "trained_depth": trained, "survival_scale": rule,
            "losses": rows, "best": best}
