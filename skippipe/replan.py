"""Re-planning while training: notice drift, re-estimate the network, re-solve with the placement fixed.

Note [re-plan while training]: the decisions, in order.
- Notice (every rank): the trainer feeds every step's record (gathered, hence the same on every rank) to
  `observe`; the drift detector (skippipe/drift.py) says when the iteration ran `threshold` over its
  reference for `patience` steps. Every rank decides alike, so no extra collective runs on a quiet step.
- Re-estimate (rank 0): the links and node speeds are re-estimated from the action timelines of the
  steps that drifted (the streak, at most `window`) (skippipe/estimate.py), starting from the estimate in force (first: the job's
  topology), and written to run_dir/replans/topology.estimated.yaml (loads back with --topology).
- Re-solve (rank 0): the same strategy, shape and seed, on the estimate, with the node-to-stage
  placement fixed (scheduler Problem.fixed_placement): no weights or optimizer state move, so the switch
  costs one solve and one broadcast. The new plan is taken only if the simulator predicts it faster than
  the plan in force on the same estimate (by `MIN_GAIN`); otherwise the plan stays and the detector
  recalibrates to the network as it now is.
- Switch (every rank): rank 0 shares the outcome as JSON (never a pickle, Note [no pickles from peers]);
  every rank switches between the same two iterations (the trainer's step boundary).
- Moving nodes between stages (a node lost, or a stage whose every replica became slow) is the elastic
  restart's job (skippipe/elastic.py): it moves weights through a checkpoint.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

from scheduler.solve import solve
from skippipe.config import Config
from skippipe.drift import DriftDetector
from skippipe.estimate import estimate_topology, save_topology
from skippipe.planning import build_problem
from topology.cost import CostModel
from topology.model_spec import load_model_spec
from topology.network import Topology
from topology.plan import Plan
from topology.simulator import simulate

MIN_GAIN = 0.05  # a new plan must be predicted at least 5% faster than the one in force to replace it


class Replanner:
    """The trainer's re-plan hook (Note [re-plan while training]); `topology` is the job's topology the
    first plan was solved for (or measured on), one node per plan node (the trainer checks)."""

    def __init__(self, cfg: Config, topology: Topology, run_dir: str | Path):
        r = cfg.schedule.replan
        self.cfg, self.topology, self.run_dir = cfg, topology, Path(run_dir)
        self.detector = DriftDetector(threshold=r.threshold, patience=r.patience, warmup=r.warmup)
        self.history: deque = deque(maxlen=r.window)
        self.remaining = r.max_replans
        self.model = load_model_spec(cfg.model)

    def observe(self, record: dict) -> str | None:
        """Every rank, every step: the reason to re-plan now, or None."""
        if record.get("timeline") is not None:
            self.history.append(record["timeline"])
        if self.remaining <= 0:
            return None
        return self.detector.observe(record["iteration_s"])

    def propose(self, plan: Plan, *, reason: str, step: int) -> tuple[Plan | None, dict]:
        """Rank 0: the plan to switch to (None: keep `plan`) and what was found, for the log."""
        cost = CostModel(self.topology, self.model, plan.microbatch_size, plan.num_stages)
        # Only the steps that drifted: older ones describe the network before the change.
        recent = list(self.history)[-max(1, self.detector.streak):]
        estimate, changes = estimate_topology(plan, recent, prior=self.topology, cost=cost,
                                              name=f"{self.topology.name.split('@')[0]}@step{step}")
        path = save_topology(estimate, self.run_dir / "replans" / "topology.estimated.yaml")
        self.topology = estimate
        problem = build_problem(self.cfg, estimate, fixed_placement=plan.placement(), stage_sizes=None,
                                num_stages=plan.num_stages, microbatch_size=plan.microbatch_size,
                                num_microbatches=plan.num_microbatches, skip_ratio=plan.skip_ratio)
        current = simulate(plan.workload(), cost=problem.cost, memory=problem.memory).iteration_s
        new = solve(problem, plan.strategy or self.cfg.schedule.strategy)
        info = {"estimate": str(path), "changed": changes, "current_plan_predicted_s": current,
                "new_plan_predicted_s": new.predicted["iteration_s"]}
        return (new if new.predicted["iteration_s"] < (1 - MIN_GAIN) * current else None), info

    def took_force(self, switched: bool) -> None:
        """Every rank, after rank 0's answer: a new reference for the plan now in force."""
        if switched:
            self.remaining -= 1
        self.detector.restart()
        self.history.clear()
