"""The omission study: is a skip-trained model as good as the full pipeline's at the same wall-clock, and
does it degrade gracefully when stages are omitted? (issue 14; README, "Inference with stages omitted")

Settings, the runs the study trains, the wall-clock each run is worth on the paper's network (the
simulator's prediction), and the report's answers from the runs' omission tables and depth summaries
(skippipe/evaluation/omission.py). skippipe/commands/omission_study.py trains and evaluates; the plot is in
skippipe/experiments/omission_plot.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from skippipe.metrics import read_metrics
from topology.errors import ConfigError

# The study's settings: stages of llama-omission-deep's 24 layers and the skip ratio (issue 14).
SETTINGS = {"mission": {"stages": 8, "skip_ratio": 0.25},   # 8 stages x 3 layers
            "paper": {"stages": 6, "skip_ratio": 0.33}}     # 6 x 4, the paper's 0.33
# The paper's network for the wall-clock comparison: the simulator's predicted iteration time of each
# run's plan on gcp-12-regions with 20 nodes and llama-500m (the README's solver baseline: microbatches
# of 8, 30 per iteration, memory 3; 6 stages as 5,3,3,3,3,3 there, other stage counts even).
NETWORK = {"topology": "gcp-12-regions", "nodes": 20, "model": "llama-500m",
           "microbatch_size": 8, "microbatches": 30, "memory": 3, "stage_sizes": {6: [5, 3, 3, 3, 3, 3]}}
# Remedies of the skip run: full-depth work mixed in, shallow (half-depth) iterations, their stage sets
# drawn afresh each time or the solver's (scheduler/depth.py), plans rotated across iterations
# (scheduler/rotation.py), reordering forbidden (max_swaps 0), the last tenth of the steps at full depth
# (full_tail). The default: one iteration in ten at full depth (the schedule of the paper authors' later
# training code; whole iterations cost least on the paper's network: mixing microbatches into every
# iteration re-routes slow links), the others rotating over 8 plans of the same predicted time, for more
# stage sets, each with its depths spread one either side of the plan's (depth_spread 1.0: every
# microbatch gives or takes one stage visit, as LayerDrop's depths vary) after 3 of its 16 microbatches
# have given away every stage off the evenly spaced half an even omission serves (spread_even 0.1875: the
# half-depth model trained inside every step, beside the deeper paths, rather than in whole half-depth
# iterations, which cost full-depth quality; README, measured; a full-depth tail trades q2 for q1).
REMEDIES = {"plain": {}, "every10": {"full_every": 10}, "every5": {"full_every": 5}, "mix0.125": {"full_fraction": 0.125},
            "rotate8": {"rotate": 8}, "every10_rotate8": {"full_every": 10, "rotate": 8},
            "every10_shallow4": {"full_every": 10, "shallow_every": 4, "shallow_ratio": 0.5},
            "every10_inorder": {"full_every": 10, "max_swaps": 0},
            "every10_drawn4": {"full_every": 10, "shallow_every": 4, "shallow_ratio": 0.5, "shallow_sets": "drawn"},
            "every5_drawn4": {"full_every": 5, "shallow_every": 4, "shallow_ratio": 0.5, "shallow_sets": "drawn"},
            "every10_drawn4_tail10": {"full_every": 10, "shallow_every": 4, "shallow_ratio": 0.5, "shallow_sets": "drawn",
                                      "full_tail": 0.1},
            "every10_rotate8_drawn4": {"full_every": 10, "rotate": 8, "shallow_every": 4, "shallow_ratio": 0.5,
                                       "shallow_sets": "drawn"},
            "every10_rotate8_even4": {"full_every": 10, "rotate": 8, "shallow_every": 4, "shallow_ratio": 0.5,
                                      "shallow_sets": "even"},
            "every10_rotate8_inorder_even4": {"full_every": 10, "rotate": 8, "max_swaps": 0, "shallow_every": 4,
                                              "shallow_ratio": 0.5, "shallow_sets": "even"},
            "every10_rotate8_evendrawn4": {"full_every": 10, "rotate": 8, "shallow_every": 4, "shallow_ratio": 0.5,
                                           "shallow_sets": "even_drawn"},
            "every10_rotate8_evendrawn4_spread": {"full_every": 10, "rotate": 8, "shallow_every": 4, "shallow_ratio": 0.5,
                                                  "shallow_sets": "even_drawn", "depth_spread": 1.0},
            "every10_rotate8_evendrawn8_spread": {"full_every": 10, "rotate": 8, "shallow_every": 8, "shallow_ratio": 0.5,
                                                  "shallow_sets": "even_drawn", "depth_spread": 1.0},
            "every10_rotate8_spread_sandwich0.125": {"full_every": 10, "rotate": 8, "depth_spread": 1.0, "spread_even": 0.125},
            "every10_rotate8_spread_sandwich0.1875": {"full_every": 10, "rotate": 8, "depth_spread": 1.0,
                                                      "spread_even": 0.1875},
            "every10_rotate8_drawn8_spread_sandwich0.125": {"full_every": 10, "rotate": 8, "shallow_every": 8,
                                                            "shallow_ratio": 0.5, "shallow_sets": "drawn",
                                                            "depth_spread": 1.0, "spread_even": 0.125}}
SHALLOW_DRAWS_PRICED = 8  # a drawn shallow iteration's time: the mean over the first 8 shallow steps' draws
SPREAD_DRAWS_PRICED = 8  # a spread iteration's time: the mean over the first 8 plan steps' draws (spread_plans)
DEFAULT_REMEDY = "every10_rotate8_spread_sandwich0.1875"


@dataclass
class Run:
    """One training run of the study: its label, dotted overrides on top of the study's, and its steps."""
    label: str
    overrides: list[str]
    steps: int
    predicted_iteration_s: float  # on the paper's network (NETWORK), one iteration of this run's schedule
    extra: dict = field(default_factory=dict)
    depth: float = 1.0  # about the fraction of the stages a microbatch visits: the run's cost per step


def setting_of(name: str | None, stages: int | None, skip_ratio: float | None) -> dict:
    """{"name", "stages", "skip_ratio"}: a named setting, or explicit stages and skip ratio (both needed
    without a name; either overrides the named one). ConfigError for an unknown name or a missing value."""
    if name is not None and name not in SETTINGS:
        raise ConfigError(f"unknown --setting {name!r}; choose one of: {', '.join(SETTINGS)}")
    base = dict(SETTINGS[name]) if name else {}
    base.update({k: v for k, v in (("stages", stages), ("skip_ratio", skip_ratio)) if v is not None})
    if "stages" not in base or "skip_ratio" not in base:
        raise ConfigError("pass --setting mission|paper, or both --stages and --skip-ratio")
    return {"name": name or f"{base['stages']}x{base['skip_ratio']}", **base}


def network_problem(stages: int, skip_ratio: float):
    """The scheduler.problem.Problem of NETWORK with `stages` stages at `skip_ratio` (CC3 and the solver
    seed: the Problem's defaults). Loads the topology and model spec: seconds."""
    from scheduler.problem import Problem
    from topology.load import load_topology
    from topology.model_spec import load_model_spec
    return Problem(topology=load_topology(NETWORK["topology"], NETWORK["nodes"], 0),
                   model=load_model_spec(NETWORK["model"]), num_stages=stages,
                   stage_sizes=NETWORK["stage_sizes"].get(stages), microbatch_size=NETWORK["microbatch_size"],
                   num_microbatches=NETWORK["microbatches"], memory=NETWORK["memory"], skip_ratio=skip_ratio)


def network_times(stages: int, skip_ratio: float, remedies: tuple[str, ...] | None = None) -> dict:
    """Predicted iteration seconds on NETWORK: the full pipeline, the skip plan, its placement at full
    depth, and each of `remedies` (None: all of REMEDIES; a rotation's time is the mean of its plans'); plus
    each remedy's cost over the plain skip plan. Deterministic (solver seed 0); seconds, about a minute
    with a rotation (its solves)."""
    from scheduler.depth import all_full_depth, average_iteration_s, mix_full_depth, step_kind
    from scheduler.rotation import distinct_stage_sets, rotation
    from scheduler.solve import solve
    from skippipe.path_schedule import shallow_schedule

    base_problem = network_problem(stages, skip_ratio)  # loads the topology once

    def problem(ratio: float, max_swaps: int | None = None):
        swaps = {} if max_swaps is None else {"max_swaps": max_swaps}  # None: the Problem's default CC3
        return dataclasses.replace(base_problem, skip_ratio=ratio, **swaps)

    solved = {}  # CC3 max_swaps -> the skip plan and its placement's full-depth iteration seconds, solved once

    def skip_plan(max_swaps: int | None) -> tuple:
        if max_swaps not in solved:
            plan = solve(problem(skip_ratio, max_swaps), "skippipe")
            solved[max_swaps] = plan, all_full_depth(problem(skip_ratio, max_swaps), plan).predicted["iteration_s"]
        return solved[max_swaps]

    full = solve(problem(0.0), "full").predicted["iteration_s"]
    first_plan, skip_full_depth = skip_plan(None)
    skip = first_plan.predicted["iteration_s"]
    rotations = {}  # plans per rotation length: the mean of their predicted times is the rotation's
    priced = {}
    for name in remedies or REMEDIES:
        remedy, extra = REMEDIES[name], {}
        swaps = remedy.get("max_swaps")
        if "full_fraction" in remedy:
            seconds = mix_full_depth(problem(skip_ratio, swaps), "skippipe", remedy["full_fraction"]).predicted["iteration_s"]
        else:
            base, full_depth = skip_plan(swaps)
            skipping = base.predicted["iteration_s"]
            if swaps is not None:
                extra = {"skip_iteration_s": float(skipping)}  # the plain plan's time under this remedy's CC3
            if remedy.get("rotate", 1) > 1:
                count = remedy["rotate"]
                if (count, swaps) not in rotations:
                    rotations[count, swaps] = rotation(problem(skip_ratio, swaps), base, count)
                plans = rotations[count, swaps]
                skipping = sum(p.predicted["iteration_s"] for p in plans) / len(plans)
                extra = {**extra, "rotated_plans": len(plans), "rotation_iteration_s": float(skipping),
                         "distinct_stage_sets": distinct_stage_sets(plans),
                         "distinct_stage_sets_first_plan": distinct_stage_sets([base])}
            if remedy.get("depth_spread") or remedy.get("spread_even"):
                plans = rotations.get((remedy.get("rotate", 1), swaps), [base])
                spread = spread_plans(problem(skip_ratio, swaps), plans, remedy)
                skipping = sum(p.predicted["iteration_s"] for p in spread) / len(spread)
                extra = {**extra, "spread_iteration_s": float(skipping), "spread_draws_priced": len(spread)}
            if remedy.get("shallow_every"):
                shallow = shallow_schedule(problem(skip_ratio, swaps), base, sets=remedy.get("shallow_sets", "solver"),
                                           ratio=remedy["shallow_ratio"], every=remedy["shallow_every"], seed=0)
                if callable(shallow):  # drawn, even_drawn: priced as the mean of its first SHALLOW_DRAWS_PRICED shallow steps
                    steps = [k for k in range(1, 10 * remedy["shallow_every"] * SHALLOW_DRAWS_PRICED)
                             if step_kind(k, full_every=remedy.get("full_every", 0), shallow_every=remedy["shallow_every"]) == "shallow"]
                    draws = [shallow(k).predicted["iteration_s"] for k in steps[:SHALLOW_DRAWS_PRICED]]
                    extra = {**extra, "shallow_iteration_s": float(sum(draws) / len(draws)), "shallow_draws_priced": len(draws)}
                else:
                    extra = {**extra, "shallow_iteration_s": float(shallow.predicted["iteration_s"])}
            seconds = average_iteration_s({"base": skipping, "full": full_depth,
                                           "shallow": extra.get("shallow_iteration_s")},
                                          full_every=remedy.get("full_every", 0),
                                          shallow_every=remedy.get("shallow_every", 0),
                                          full_tail=remedy.get("full_tail", 0.0))
        priced[name] = {"iteration_s": float(seconds), "cost_over_plain": float(seconds / skip), **remedy, **extra}
    return {**{k: v for k, v in NETWORK.items() if k != "stage_sizes"},
            "stage_sizes": NETWORK["stage_sizes"].get(stages), "full_iteration_s": float(full),
            "skip_iteration_s": float(skip), "skip_placement_full_depth_iteration_s": float(skip_full_depth),
            "remedies": priced}


def spread_plans(problem, plans: list, remedy: dict) -> list:
    """The first SPREAD_DRAWS_PRICED plan steps of `remedy`'s schedule (scheduler.depth.step_kind "base"),
    each `plans`' plan of that step (a rotation's in turn) with its depths spread as training draws them
    (run seed 0) and re-timed by the solver's search on `problem` (scheduler.skippipe.retime: each
    microbatch's depth kept; re-timing the unspread plan that way costs 1-2% more than the solver's own)."""
    from scheduler.depth import spread_depth, step_rng, step_kind
    from scheduler.skippipe import retime
    from skippipe.path_schedule import spread_even_plan, spread_transfers
    steps = [k for k in range(1, 10 * SPREAD_DRAWS_PRICED) if step_kind(
        k, full_every=remedy.get("full_every", 0), shallow_every=remedy.get("shallow_every", 0)) == "base"]
    out = []
    for k in steps[:SPREAD_DRAWS_PRICED]:
        plan = plans[(k - 1) % len(plans)]
        transfers = spread_transfers(remedy.get("depth_spread", 0.0), len(plan.paths))
        even = spread_even_plan(plan.num_stages, remedy.get("shallow_ratio", 0.5), remedy.get("spread_even", 0.0),
                                len(plan.paths))
        out.append(retime(problem, spread_depth(plan, transfers, step_rng("spread", 0, k), **even)))
    return out


def remedy_overrides(name: str) -> list[str]:
    if name not in REMEDIES:
        raise ConfigError(f"unknown remedy {name!r}; choose one of: {', '.join(REMEDIES)}")
    return [f"schedule.{k}={v}" for k, v in REMEDIES[name].items()]


def run_names(remedy: str, variants: tuple[str, ...] = ()) -> list[str]:
    """The study's run dirs, in study_runs' order: known before the network is solved, so that a run dir
    that holds a run is refused at once."""
    return ["skip", "full", "full_equal_time", "layerdrop", *(f"skip_{v}" for v in variants if v != remedy)]


def study_runs(setting: dict, *, steps: int, times: dict, remedy: str = DEFAULT_REMEDY,
               variants: tuple[str, ...] = (), warmup_steps: int = 0) -> dict[str, Run]:
    """The runs: `skip` (the setting's skip ratio with `remedy`), `full` (equal tokens), `full_equal_time`
    (full pipeline stopped at the skip run's predicted wall-clock: steps x skip / full iteration time,
    its learning-rate schedule fitted to that length as a user with that budget would), `layerdrop`
    (same tokens, the skip ratio's expected depth), and a `skip_<variant>` per extra remedy.

    Note [equal-time fork]: the full and equal-time runs share their config but for the steps, and the
    learning rate of a warmup step does not depend on the schedule's length (skippipe/optim.py, lr_at),
    so their first `warmup_steps` steps are the same, bit for bit (tests/test_checkpoint.py). The
    equal-time run records `fork_step`, the warmup's last step, when it trains past it: the study then
    branches it off the full run's checkpoint there instead of training those steps twice."""
    shape = [f"schedule.num_stages={setting['stages']}", f"schedule.num_nodes={setting['stages']}"]
    skip_s = times["remedies"][remedy]["iteration_s"]
    ratio = skip_s / times["full_iteration_s"]
    r = setting["skip_ratio"]
    equal_steps = max(1, round(steps * ratio))
    fork = {"fork_step": warmup_steps} if 0 < warmup_steps < equal_steps else {}
    runs = {
        "skip": Run(f"skip ratio {r}, {remedy}", shape + [f"schedule.skip_ratio={r}"] + remedy_overrides(remedy),
                    steps, skip_s, {"remedy": remedy}, 1 - r),
        "full": Run("full pipeline, equal tokens", shape + ["schedule.skip_ratio=0"], steps, times["full_iteration_s"]),
        "full_equal_time": Run("full pipeline, equal wall-clock", shape + ["schedule.skip_ratio=0"],
                               equal_steps, times["full_iteration_s"], {"time_ratio": ratio, **fork}),
        "layerdrop": Run(f"LayerDrop at depth of skip {r}", shape + ["schedule.skip_ratio=0", f"schedule.layerdrop={r}"],
                         steps, times["full_iteration_s"], depth=1 - r),
    }
    for name in variants:
        if name != remedy:
            runs[f"skip_{name}"] = Run(f"skip ratio {r}, {name}", shape + [f"schedule.skip_ratio={r}"] + remedy_overrides(name),
                                       steps, times["remedies"][name]["iteration_s"], {"remedy": name}, 1 - r)
    return runs


def training_curve(run_dir: str | Path, tokens_per_step: int, iteration_s: float) -> list[dict]:
    """step, tokens seen, predicted wall-clock on the paper's network, training and validation loss."""
    return [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "network_s": r["step"] * iteration_s,
             "loss": r["loss"], "val_loss": r.get("val_loss")} for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def row_at(rows: list[dict], keep: float, placement: str) -> dict:
    return next(r for r in rows if r["placement"] == placement and math.isclose(r["keep"], keep))


def half_over_full(rows: list[dict], placement: str = "even") -> float:
    """Perplexity at keep 0.5 over keep 1.0 (q2 for a skip-trained model, q3 for the full pipeline's)."""
    return row_at(rows, 0.5, placement)["ppl"] / row_at(rows, 1.0, placement)["ppl"]


TARGETS = {"q1_equal_time": 1.00, "q1_equal_tokens": 1.05, "full_over_trained_depth": 1.00,
           "q2_skip_half_over_full": 1.07}


def study_answers(runs: dict[str, dict], headline: str = "even") -> dict:
    """The answers, each from the runs' own tables (held-out loss ratios; perplexity ratios for q2/q3):

    q1_equal_time    skip model at its best kept set / full_equal_time at full depth (loss)
    q1_equal_tokens  the same against `full` (equal tokens)
    q1_full_depth    skip at full depth / full at full depth (loss, equal tokens)
    full_over_trained_depth  skip's perplexity with every stage / at its trained depth (even)
    q2_skip_half_over_full, q3_full_half_over_full, layerdrop_q2: keep 0.5 / keep 1.0 (`headline`)
    and each target's verdict ("targets_met"); every run's own q2 (and at random placement, `q2_random`:
    a run trained on the even set can serve it well and others badly) and figures under "by_run".
    """
    skip, full, equal, drop = (runs[k] for k in ("skip", "full", "full_equal_time", "layerdrop"))
    answers = {
        "q1_equal_time": skip["depth"]["best"]["loss"] / equal["depth"]["full"]["loss"],
        "q1_equal_tokens": skip["depth"]["best"]["loss"] / full["depth"]["full"]["loss"],
        "q1_full_depth": skip["depth"]["full"]["loss"] / full["depth"]["full"]["loss"],
        "full_over_trained_depth": skip["depth"]["full_over_trained_depth"],
        "q2_skip_half_over_full": half_over_full(skip["omission"], headline),
        "q3_full_half_over_full": half_over_full(full["omission"], headline),
        "layerdrop_q2": half_over_full(drop["omission"], headline),
        "time_ratio": equal["time_ratio"], "headline_placement": headline,
    }
    met = {k: answers[k] <= v for k, v in TARGETS.items()}
    met["q3_minus_1_at_least_3x_q2_minus_1"] = answers["q3_full_half_over_full"] - 1 >= 3 * (answers["q2_skip_half_over_full"] - 1)
    met["q2_no_worse_than_layerdrop"] = answers["q2_skip_half_over_full"] <= answers["layerdrop_q2"]
    by_run = {name: {"q2": half_over_full(run["omission"], headline),
                     "q2_random": half_over_full(run["omission"], "random"),
                     "best_over_full_equal_tokens": run["depth"]["best"]["loss"] / full["depth"]["full"]["loss"],
                     "full_depth_over_full": run["depth"]["full"]["loss"] / full["depth"]["full"]["loss"],
                     "full_over_trained_depth": run["depth"]["full_over_trained_depth"],
                     "predicted_iteration_s": run["predicted_iteration_s"]} for name, run in runs.items()}
    return {**answers, "targets": dict(TARGETS), "targets_met": met, "by_run": by_run}
