"""Which plan each training step runs: the run's plan, or a schedule of plans around it.

    schedule = plan_schedule(cfg, plan)      # skippipe/trainer.py calls this in setup()
    step_plan = schedule.plan_at(step)       # 1-based step

The schedules (README, "Inference with stages omitted"; issue 14):

- the plan itself, every step (the default; `schedule.full_fraction` is already inside the plan:
  scheduler/depth.py);
- `schedule.rotate` plans in turn, one per step: the plan and others of its placement and predicted
  time with other paths (scheduler/rotation.py);
- one iteration in `schedule.full_every` at full depth: the plan with every microbatch on its full
  route (scheduler.depth.all_full_depth, same placement), the others the plan (or the rotation);
- a full-depth cooldown: the last `schedule.full_tail` of the learning-rate schedule's steps
  (optim.decay_steps or train.steps; scheduler.depth.tail_start) all at full depth, so the model's last,
  low-learning-rate steps train the depth it is served at (a resumed run with another train.steps moves
  the tail with its learning-rate schedule);
- one iteration in `schedule.shallow_every` shallower: the plan solved at skip ratio
  `schedule.shallow_ratio`, same placement (scheduler.depth.shallow_depth), so training also sees the
  deeper omissions that half-depth inference makes (scheduler.depth.step_kind says which step runs what);
  with `schedule.shallow_sets: drawn`, each shallow step draws its in-order stage sets afresh instead
  (strategy random-skip, seeded by train.seed and the step), so over the run they cover every shallow
  set, as LayerDrop's draws do, rather than the few the solver finds fastest; with `even`, every
  microbatch visits the evenly spaced stages an even omission keeps (scheduler.depth.even_depth), so the
  half-depth model a user serves is trained itself; with `even_drawn`, the even set and a fresh draw
  on alternate shallow steps, so the even half is trained without losing the others;
- a depth spread (`schedule.depth_spread`, a fraction of the microbatches) on the plan's own steps (not
  the full-depth or shallow ones): each step, fresh pairs of microbatches move one stage visit from one to
  the other (scheduler.depth.spread_depth, seeded by train.seed and the step), so depths spread one
  either side of the plan's path length, as LayerDrop's do around their mean, with every stage's visits
  and every node's load kept; with `schedule.spread_even`, first that fraction of the microbatches gives
  away every stage off the even half-depth set an even omission keeps, so that set trains inside every
  such step (the sandwich rule), not only in shallow iterations;
- LayerDrop (`schedule.layerdrop`, the field's standard way to train for depth robustness; Fan et al.
  2019, "Reducing Transformer Depth on Demand with Structured Dropout"): every microbatch keeps stage 0
  and each other stage independently with probability p = (L - 1) / (S - 1), where L is the path length
  of skip ratio `layerdrop` (scheduler.constraints.path_length), so a path's expected depth is L; kept
  stages run in natural order. Draws depend only on (train.seed, step), so a resumed run draws the same.

The schedules other than the plan itself switch plans between steps, which only the single-process
executor supports (the distributed one has connected its peers for one plan).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from scheduler.constraints import path_length
from scheduler.depth import spread_depth, step_rng, step_kind
from skippipe.config import Config
from topology.plan import Plan, Route, sequential_order


class PlanSchedule:
    """The plan of each step: `base` (or the `rotation`'s plans in turn, `base` first; with `spread` > 0 or
    `even_donors` > 0, that plan with its depths spread: spread_transfers, and up to `even_donors`
    microbatches on the stage set `even`, seeded by `seed` and the step), or every
    `full_every`-th step and every step from `full_from` on (a full-depth tail; None: none) `full`, or on
    shallow steps (scheduler.depth.step_kind) `shallow` (a plan, or a function of the 1-based step that
    draws one), or LayerDrop draws around `base` with per-stage keep probability `keep_prob` (None: no
    LayerDrop)."""

    def __init__(self, base: Plan, *, full: Plan | None = None, full_every: int = 0, full_from: int | None = None,
                 shallow: Plan | Callable[[int], Plan] | None = None, shallow_every: int = 0,
                 keep_prob: float | None = None, seed: int = 0, rotation: list[Plan] | None = None,
                 spread: float = 0.0, even: list[int] | None = None, even_donors: int = 0):
        self.base, self.keep_prob, self.seed, self.spread = base, keep_prob, seed, spread
        self.even, self.even_donors = even, even_donors if even else 0
        self.full, self.full_every = full, full_every if full is not None else 0
        self.full_from = full_from if full is not None else None
        self.shallow, self.shallow_every = shallow, shallow_every if shallow is not None else 0
        self.rotation = rotation or [base]

    @property
    def varies(self) -> bool:
        """Whether some step runs another plan than `base`."""
        return (self.keep_prob is not None or self.full_every > 0 or self.full_from is not None
                or self.shallow_every > 0 or len(self.rotation) > 1 or self.spread > 0 or self.even_donors > 0)

    def plan_at(self, step: int) -> Plan:
        if self.keep_prob is not None:
            return self._layerdrop(step)
        kind = step_kind(step, full_every=self.full_every, shallow_every=self.shallow_every, full_from=self.full_from)
        if kind == "full":
            return self.full
        if kind == "shallow":
            return self.shallow(step) if callable(self.shallow) else self.shallow
        plan = self.rotation[(step - 1) % len(self.rotation)]
        if self.spread > 0 or self.even_donors > 0:
            transfers = spread_transfers(self.spread, len(plan.paths))
            plan = spread_depth(plan, transfers, step_rng("spread", self.seed, step), even=self.even,
                                even_donors=self.even_donors)
        return plan

    def _layerdrop(self, step: int) -> Plan:
        rng = step_rng("layerdrop", self.seed, step)
        first = {n.stage: n.id for n in sorted(self.base.nodes, key=lambda n: -n.id)}  # a stage's lowest node
        paths = []
        for path in sorted(self.base.paths, key=lambda p: p.microbatch):
            stages = [0] + [s for s in range(1, self.base.num_stages) if rng.random() < self.keep_prob]
            paths.append(Route(path.microbatch, path.data_node, tuple([path.data_node] + [first[s] for s in stages[1:]]),
                               tuple(stages)))
        return dataclasses.replace(self.base, paths=paths, order=sequential_order(paths))


SINGLE_PROCESS_ONLY = ("schedule.full_every, full_tail, shallow_every, rotate, depth_spread, spread_even and layerdrop switch "
                       "plans between steps, which only the single-process mode supports; pass --single-process or "
                       "use schedule.full_fraction")


def switches_plans(s) -> bool:
    """Whether a run's schedule settings (skippipe.config.ScheduleConfig) switch plans between steps: then it
    runs in the single-process mode only (SINGLE_PROCESS_ONLY says so to the user)."""
    return bool(s.layerdrop or s.full_every or s.full_tail or s.shallow_every or s.rotate > 1 or s.depth_spread
                or s.spread_even)


def spread_transfers(spread: float, num_microbatches: int) -> int:
    """Stage visits `spread_depth` moves per step for schedule.depth_spread `spread`: floor(spread x M / 2),
    so `spread` is about the fraction of the M microbatches whose depth moves by one (half up, half down)."""
    return int(spread * num_microbatches / 2)


def spread_even_plan(num_stages: int, shallow_ratio: float, spread_even: float, num_microbatches: int) -> dict:
    """spread_depth's `even` and `even_donors` for schedule.spread_even: the evenly spaced stages of
    shallow_ratio's path length (scheduler.depth.even_stages; 8 stages at 0.5: 0, 2, 4, 6) and
    floor(spread_even x M) microbatches ({} when off)."""
    from scheduler.depth import even_stages
    donors = int(spread_even * num_microbatches)
    if donors == 0:
        return {}
    return {"even": even_stages(num_stages, path_length(num_stages, shallow_ratio)), "even_donors": donors}


def layerdrop_keep_prob(num_stages: int, skip_ratio: float) -> float:
    """p with 1 + (S - 1) p = path_length(S, skip_ratio): the per-stage keep probability of LayerDrop at
    the expected depth of that skip ratio (stage 0 always kept)."""
    if num_stages == 1:
        return 1.0
    return (path_length(num_stages, skip_ratio) - 1) / (num_stages - 1)


def shallow_schedule(problem, plan: Plan, *, sets: str, ratio: float, every: int, seed: int,
                     strategy: str = "skippipe") -> Plan | Callable[[int], Plan]:
    """The shallow iterations' plan (`sets` "solver" or "even"), or a function of the 1-based step that
    draws one ("drawn", "even_drawn"; skippipe.config.SHALLOW_SETS), at skip ratio `ratio` with `plan`'s
    placement, on `problem` (scheduler.problem.Problem); `every` is schedule.shallow_every and `seed` the
    run's seed. ConfigError from the solver for an impossible setting."""
    from scheduler.depth import drawn_shallow_seed, even_depth, shallow_depth
    if sets == "solver":
        return shallow_depth(problem, plan, ratio, strategy=strategy)
    even = even_depth(problem, plan, ratio) if sets in ("even", "even_drawn") else None
    if sets == "even":
        return even

    def shallow(step: int) -> Plan:
        if even is not None and (step // every) % 2 == 0:
            return even  # even_drawn: the even set on every other shallow step
        return shallow_depth(problem, plan, ratio, strategy="random-skip", seed=drawn_shallow_seed(seed, step))
    return shallow


def plan_schedule(cfg: Config, plan: Plan) -> PlanSchedule:
    """The schedule `cfg` asks for around `plan` (ConfigError from the solver for an impossible setting)."""
    s = cfg.schedule
    if s.layerdrop:
        return PlanSchedule(plan, keep_prob=layerdrop_keep_prob(plan.num_stages, s.layerdrop), seed=cfg.train.seed)
    if not switches_plans(s):
        return PlanSchedule(plan)
    from scheduler.depth import all_full_depth, tail_start
    from scheduler.rotation import rotation
    from skippipe.planning import build_problem, job_topology
    problem = build_problem(cfg, job_topology(cfg))
    full = all_full_depth(problem, plan) if s.full_every or s.full_tail else None
    full_from = tail_start(cfg.optim.decay_steps or cfg.train.steps, s.full_tail)
    shallow = shallow_schedule(problem, plan, sets=s.shallow_sets, ratio=s.shallow_ratio, every=s.shallow_every,
                               seed=cfg.train.seed, strategy=s.strategy) if s.shallow_every else None
    plans = rotation(problem, plan, s.rotate, strategy=s.strategy) if s.rotate > 1 else None
    return PlanSchedule(plan, full=full, full_every=s.full_every, full_from=full_from, shallow=shallow,
                        shallow_every=s.shallow_every, rotation=plans, seed=cfg.train.seed, spread=s.depth_spread,
                        **spread_even_plan(plan.num_stages, s.shallow_ratio, s.spread_even, len(plan.paths)))
