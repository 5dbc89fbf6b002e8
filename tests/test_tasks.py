"""The study's task runner: the longest ready task first, readiness, a failed task, tasks that never get ready."""
from __future__ import annotations

import os
import sys

import pytest

from skippipe.experiments.tasks import Task, run_tasks
from topology.errors import ConfigError


def append(path, text: str) -> list[str]:
    """A command that appends one line to `path`."""
    return [sys.executable, "-c", f"open({str(path)!r}, 'a').write({text + chr(10)!r})"]


def test_one_slot_runs_the_longest_ready_task_first_and_waits_for_readiness(tmp_path):
    order = tmp_path / "order.txt"
    tasks = [Task("a", "evaluate", append(order, "a evaluate"), 0.0, ready=lambda done: ("a", "train") in done),
             Task("b", "train", append(order, "b train"), 5.0),
             Task("a", "train", append(order, "a train"), 9.0),
             Task("c", "train", append(order, "c train"), 7.0, ready=lambda done: order.exists(),
                  before=lambda: (tmp_path / "before-c").write_text("x"))]
    run_tasks(tasks, parallel=1, log_dir=tmp_path / "logs", env=dict(os.environ), poll_s=0.01)
    # c is longer than b but ready only once a line is written; a's evaluation only after its training.
    assert order.read_text().splitlines() == ["a train", "c train", "b train", "a evaluate"]
    assert (tmp_path / "before-c").exists() and (tmp_path / "logs" / "a" / "evaluate.log").exists()


def test_a_failed_task_names_itself_with_its_last_line_and_stops_the_others(tmp_path):
    sleeper = tmp_path / "slept.txt"
    slow = f"import time; time.sleep(30); open({str(sleeper)!r}, 'w')"
    bad = "print('step 1'); raise SystemExit('error: out of memory')"
    tasks = [Task("slow", "train", [sys.executable, "-c", slow], 9.0),
             Task("bad", "train", [sys.executable, "-c", bad], 1.0)]
    with pytest.raises(ConfigError, match=r"the bad run failed \(train\): error: out of memory"):
        run_tasks(tasks, parallel=2, log_dir=tmp_path, env=dict(os.environ), poll_s=0.01)
    assert not sleeper.exists()  # stopped, not left to run on


def test_tasks_that_can_never_start_are_an_error_not_a_hang(tmp_path):
    tasks = [Task("a", "evaluate", append(tmp_path / "x", "a"), 0.0, ready=lambda done: ("a", "train") in done)]
    with pytest.raises(RuntimeError, match="tasks wait on each other: evaluate a"):
        run_tasks(tasks, parallel=2, log_dir=tmp_path, env=dict(os.environ), poll_s=0.01)
