"""Noticing that the network drifted from what the plan in force was solved for.

Note [drift reference]: the plan's own prediction is not the reference. The cost model is off by some
steady factor on any real network (the emulated cluster's measured iterations are within a few percent
of the prediction, a real cluster's need not be), and that factor would read as drift from the first
step. The reference is instead the median measured iteration of the first `warmup` steps after the plan
took force (the run's first step, which includes start-up, excluded): the plan's prediction, calibrated
by what the network delivered then. A drift is an iteration more than `threshold` over the reference;
`patience` consecutive ones trigger. After a switch the new plan gets its own reference.
"""
from __future__ import annotations

import statistics


class DriftDetector:
    """Per-step iteration seconds in, a reason string out when a re-plan is due.

    `threshold`: relative excess over the reference (0.2: 20% slower) that counts as drift; `patience`:
    consecutive drifting steps that trigger; `warmup`: steps whose median is the reference (Note [drift
    reference]). Deterministic in its inputs, so every rank that feeds it the same gathered iteration
    times triggers at the same step. ValueError for settings that cannot trigger or cannot calibrate.
    """

    def __init__(self, *, threshold: float, patience: int, warmup: int):
        if not threshold > 0 or patience < 1 or warmup < 1:
            raise ValueError(f"threshold must be > 0, patience and warmup >= 1 (got {threshold}, {patience}, {warmup})")
        self.threshold, self.patience, self.warmup = threshold, patience, warmup
        self.restart(skip_first=True)

    def restart(self, *, skip_first: bool = False) -> None:
        """A plan took force: forget the reference and the streak. `skip_first`: the next step is the
        run's first (start-up cost) and does not calibrate."""
        self._skip = skip_first
        self._calibration: list[float] = []
        self.reference: float | None = None
        self.streak = 0

    def observe(self, iteration_s: float) -> str | None:
        """Feed one step's iteration time (seconds, the slowest rank's); the reason when it triggers."""
        if self._skip:
            self._skip = False
            return None
        if self.reference is None:
            self._calibration.append(iteration_s)
            if len(self._calibration) == self.warmup:
                self.reference = statistics.median(self._calibration)
            return None
        drift = iteration_s / self.reference - 1.0
        self.streak = self.streak + 1 if drift > self.threshold else 0
        if self.streak < self.patience:
            return None
        return (f"the iteration ran more than {self.threshold:.0%} over its reference {self.reference:.3f} s for "
                f"{self.streak} steps (now {iteration_s:.3f} s, {drift:+.0%})")
