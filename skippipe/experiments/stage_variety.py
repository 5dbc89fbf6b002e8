"""How many stage sets can a skip schedule reach at the plan's network cost? (issue 14, q1_equal_tokens)

    python -c "import json; from skippipe.experiments.stage_variety import report; print(json.dumps(report(), indent=1))" > reports/stage_variety.json

Two measurements per setting of the omission study (skippipe/experiments/omission_study.py, SETTINGS):
- `rotation`: the stage sets the plans of a rotation (scheduler/rotation.py: the placement fixed, other
  solver seeds, within 2% of the first plan's predicted time) visit, on the study's own training problem
  (configs/train/omission.yaml), for each rotation length: ordered sequences, in-order sets, and how many
  in-order sets a path of the skip ratio's length could visit (stage 0 always; C(S - 1, L - 1)).
- `drawn_over_plan`: the predicted iteration time of fresh network-blind draws of in-order stage sets
  (scheduler.depth.shallow_depth with strategy "random-skip", seeds 1..draws, the plan's placement) over
  the solver's plan, on the paper's network (omission_study.NETWORK), as quantiles.
Deterministic; about a minute on 2 cores (each rotated plan is a solve).
"""
from __future__ import annotations

import math
import statistics

ROTATIONS = (8, 32)  # rotation lengths measured: the default remedy's 8, and four times as many
DRAWS = 40  # random-skip draws priced per setting
COMMAND = ("python -c \"import json; from skippipe.experiments.stage_variety import report; "
           "print(json.dumps(report(), indent=1))\" > reports/stage_variety.json")


def rotation_variety(stages: int, skip_ratio: float, counts: tuple[int, ...] = ROTATIONS) -> dict:
    """{count: {"plans", "stage_sequences", "in_order_sets", "possible_in_order_sets"}} for rotations of
    each length in `counts` on the omission config's training problem with `stages` stages (one node
    each) at `skip_ratio`, at the config's train.seed (0), which seeds the solver and the topology as in
    the study's runs (another seed gives other plans). ConfigError from the solver for an impossible
    setting."""
    from scheduler.constraints import path_length
    from scheduler.rotation import distinct_stage_sets, rotation
    from skippipe.config import load_config
    from skippipe.planning import build_problem, job_topology, make_plan
    cfg = load_config("omission", [f"schedule.num_stages={stages}", f"schedule.num_nodes={stages}",
                                   f"schedule.skip_ratio={skip_ratio}"])
    plan, problem = make_plan(cfg), build_problem(cfg, job_topology(cfg))
    possible = math.comb(stages - 1, path_length(stages, skip_ratio) - 1)
    result = {}
    for count in counts:
        plans = rotation(problem, plan, count)
        result[count] = {"plans": len(plans), "stage_sequences": distinct_stage_sets(plans),
                         "in_order_sets": len({tuple(sorted(p.stages)) for rotated in plans for p in rotated.paths}),
                         "possible_in_order_sets": possible}
    return result


def drawn_over_plan(stages: int, skip_ratio: float, draws: int = DRAWS) -> dict:
    """Predicted iteration time of `draws` random-skip draws over the solver's plan on the paper's network:
    {"plan_iteration_s" (seconds), "draws", "min", "p10", "p25", "median", "p75", "max" (ratios)}."""
    from scheduler.depth import shallow_depth
    from scheduler.solve import solve
    from skippipe.experiments.omission_study import network_problem
    problem = network_problem(stages, skip_ratio)
    plan = solve(problem, "skippipe")
    base = plan.predicted["iteration_s"]
    ratios = sorted(float(shallow_depth(problem, plan, skip_ratio, strategy="random-skip", seed=k).predicted["iteration_s"]
                          / base) for k in range(1, draws + 1))
    twentieths = statistics.quantiles(ratios, n=20, method="inclusive")  # the 5%, 10%, ..., 95% points
    return {"plan_iteration_s": round(float(base), 1), "draws": draws, "min": round(ratios[0], 3),
            "p10": round(twentieths[1], 3), "p25": round(twentieths[4], 3),
            "median": round(statistics.median(ratios), 3), "p75": round(twentieths[14], 3),
            "max": round(ratios[-1], 3)}


def report(settings: tuple[str, ...] = ("paper", "mission")) -> dict:
    """Both measurements for each named setting of the omission study: {name: {"stages", "skip_ratio",
    "rotation", "drawn_over_plan"}}. ConfigError for an unknown setting, before any solve."""
    from skippipe.experiments.omission_study import setting_of
    chosen = [setting_of(name, None, None) for name in settings]
    return {"about": __doc__.strip().splitlines()[0], "command": COMMAND,
            **{s["name"]: {"stages": s["stages"], "skip_ratio": s["skip_ratio"],
                           "rotation": rotation_variety(s["stages"], s["skip_ratio"]),
                           "drawn_over_plan": drawn_over_plan(s["stages"], s["skip_ratio"])} for s in chosen}}
