"""skippipe.experiments.stage_variety: the counts and quantiles its report holds, and its refusals."""
from __future__ import annotations

import pytest

from scheduler.rotation import distinct_stage_sets
from skippipe.config import load_config
from skippipe.experiments import stage_variety
from skippipe.planning import make_plan
from topology.errors import ConfigError


def test_a_rotation_of_one_counts_the_plan_s_own_stage_sets():
    """Paper setting: 4 of 6 stages per path, stage 0 always, so C(5, 3) = 10 in-order sets could occur."""
    got = stage_variety.rotation_variety(6, 0.33, counts=(1,))[1]
    plan = make_plan(load_config("omission", ["schedule.num_stages=6", "schedule.num_nodes=6",
                                              "schedule.skip_ratio=0.33"]))
    assert got["plans"] == 1
    assert got["stage_sequences"] == distinct_stage_sets([plan])
    assert got["in_order_sets"] == len({tuple(sorted(p.stages)) for p in plan.paths})
    assert got["in_order_sets"] <= got["possible_in_order_sets"] == 10


def test_drawn_over_plan_reports_ordered_quantiles_of_the_draws():
    got = stage_variety.drawn_over_plan(6, 0.33, draws=4)
    assert got["draws"] == 4 and got["plan_iteration_s"] > 0
    quantiles = [got[k] for k in ("min", "p10", "p25", "median", "p75", "max")]
    assert quantiles == sorted(quantiles) and quantiles[0] > 0


def test_an_unknown_setting_is_refused_before_any_solve():
    with pytest.raises(ConfigError, match="unknown --setting 'deep'"):
        stage_variety.report(("paper", "deep"))
