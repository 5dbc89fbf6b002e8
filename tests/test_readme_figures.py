"""The README's omission-study targets tables say what the reports they cite measured (the timed reports
at seed 0; reports/omission_scratch.json's "seed_1_study" at seed 1): each figure is the report's answer
to three decimals and each verdict ("met" / "not met") is the report's own."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from skippipe.experiments.omission_study import TARGETS

ROOT = Path(__file__).resolve().parent.parent
# target row's first words -> its key in the report's targets_met
VERDICTS = {"q1_equal_time <= 1.00": "q1_equal_time", "q1_equal_tokens <= 1.05": "q1_equal_tokens",
            "full_over_trained_depth <= 1.00": "full_over_trained_depth",
            "q2_skip_half_over_full <= 1.07": "q2_skip_half_over_full",
            "q3 - 1 >= 3 (q2 - 1)": "q3_minus_1_at_least_3x_q2_minus_1",
            "skip's q2 no worse than LayerDrop's": "q2_no_worse_than_layerdrop"}


def targets_table(header: str) -> dict[str, tuple[str, str]]:
    """The README's table under `header` ("| target | paper | mission |"): target cell -> (paper cell,
    mission cell)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(header)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        target, paper, mission = (c.strip() for c in line.strip("|").split("|"))
        rows[target] = (paper, mission)
    return rows


def timed_answers(setting: str) -> dict:
    return json.loads((ROOT / f"reports/omission_{setting}_timed.json").read_text())["answers"]


def seed_1_answers(setting: str) -> dict:
    return json.loads((ROOT / "reports/omission_scratch.json").read_text())["seed_1_study"][setting]["answers"]


@pytest.mark.parametrize("header, answers_of", [("| target | paper | mission |", timed_answers),
                                                ("| target, seed 1 | paper | mission |", seed_1_answers)])
@pytest.mark.parametrize("column, setting", [(0, "paper"), (1, "mission")])
def test_the_readme_targets_tables_match_their_reports(header, answers_of, column, setting):
    answers = answers_of(setting)
    table = targets_table(header)
    for prefix, key in VERDICTS.items():
        target = next(t for t in table if t.startswith(prefix))
        cell = table[target][column]
        stated = cell.replace("*", "").split("(")[0] if key in TARGETS else cell.replace("*", "")
        assert "met" in stated and ("not met" not in stated) == answers["targets_met"][key], (setting, target, cell)
        if key in TARGETS:  # a figured target's cell: "figure, verdict (earlier figure)"
            figure = re.match(r"([0-9.]+),", stated)
            assert figure and figure.group(1) == f"{answers[key]:.3f}", (setting, target, cell)


def test_the_readme_s_recalibrated_figures_match_reports_residual_scale():
    """The sentence on scaling each stage's update by its survival probability: q1_equal_tokens at the
    rule's scale, stage grain, over the full run's loss of the same seed and setting, all in the report."""
    runs = {r["run"]: r for r in json.loads((ROOT / "reports/residual_scale.json").read_text())["runs"]}

    def ratio(skip: str, full: str) -> str:
        rows, rule = runs[skip]["losses"], runs[skip]["survival_scale"]
        scaled = next(r["loss"] for r in rows if (r["grain"], r["keep"], r["scale"]) == ("stage", 1.0, rule))
        plain = next(r["loss"] for r in runs[full]["losses"] if (r["grain"], r["keep"], r["scale"]) == ("stage", 1.0, 1.0))
        return f"{scaled / plain:.3f}"

    exp = "runs/exp/"
    figures = [ratio(exp + "study_paper/skip", exp + "study_paper/full"), ratio(exp + "s1/p_sandwich", exp + "s1/p_full"),
               ratio(exp + "study_mission/skip", exp + "study_mission/full"), ratio(exp + "s1/m_sandwich", exp + "s1/m_full")]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (f"q1_equal_tokens to {figures[0]} and {figures[1]} at seeds 0 and 1 (mission {figures[2]} and "
            f"{figures[3]};") in readme
