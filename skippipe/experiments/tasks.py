"""A study's commands run side by side: the longest ready one first, a fixed number at once.

The omission study (skippipe/commands/omission_study.py) trains and evaluates several runs on a few cores.
Each command is a Task that becomes ready when its condition holds (its run's training has finished; a
checkpoint it branches from exists); whenever a slot is free, the longest ready task starts. Longest
first keeps the slots busy to the end: the short evaluations fill in after the long trainings.
"""
from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from topology.errors import ConfigError

Done = set[tuple[str, str]]  # (run, step) of every task that has finished


@dataclass
class Task:
    """One command: `step` ("train", "evaluate") of `run`; its output goes to `log_dir`/<run>/<step>.log.

    `cost`: its expected length in any unit shared by the tasks (the longest ready one starts first).
    `ready(done)`: whether it may start, given the tasks that have finished (None: at once).
    `before()`: called just before the command starts (the study forks a checkpoint there).
    """
    run: str
    step: str
    command: list[str]
    cost: float
    ready: Callable[[Done], bool] | None = None
    before: Callable[[], None] | None = None


def run_tasks(tasks: list[Task], *, parallel: int, log_dir: Path, env: dict[str, str],
              poll_s: float = 1.0) -> None:
    """Run every task, at most `parallel` at once, each started when ready, the longest ready one first;
    one line per start and finish on stdout. Raises ConfigError naming the task that failed (the others are
    stopped) with the last line of its log, and RuntimeError when tasks wait on one another forever."""
    pending = sorted(tasks, key=lambda t: -t.cost)
    active: dict[tuple[str, str], tuple[subprocess.Popen, object, Task]] = {}
    done: Done = set()
    try:
        while pending or active:
            for task in [t for t in pending if t.ready is None or t.ready(done)]:
                if len(active) >= max(1, parallel):
                    break
                pending.remove(task)
                if task.before is not None:
                    task.before()
                (log_dir / task.run).mkdir(parents=True, exist_ok=True)
                log = open(log_dir / task.run / f"{task.step}.log", "w")
                print(f"{task.step} {task.run}: {shlex.join(task.command)}", flush=True)
                active[task.run, task.step] = (subprocess.Popen(task.command, stdout=log, stderr=subprocess.STDOUT,
                                                                env=env), log, task)
            if not active and pending:
                raise RuntimeError(f"tasks wait on each other: {', '.join(f'{t.step} {t.run}' for t in pending)}")
            time.sleep(poll_s)
            for key, (proc, log, task) in list(active.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del active[key]
                if proc.returncode != 0:
                    tail = (log_dir / task.run / f"{task.step}.log").read_text().strip().splitlines()[-1:]
                    raise ConfigError(f"the {task.run} run failed ({task.step}): {tail[0] if tail else 'no output'}")
                done.add(key)
                print(f"{task.step} {task.run}: done", flush=True)
    finally:
        for proc, log, _ in active.values():
            proc.terminate()
            proc.wait()
            log.close()
