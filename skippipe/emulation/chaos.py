"""The chaos run: train on an emulated cluster, kill one node mid-iteration, and check the job carries on.

    report = run_chaos(ChaosSettings(), work_dir="runs/chaos")   # scripts/chaos.py --out reports/chaos.json

One torchrun agent per node, elastic (`--nnodes N-1:N --max-restarts K`, c10d rendezvous on node 0), each
with SKIPPIPE_NODE set to its topology node's name. On the emulated cluster (skippipe/emulation/emulate.py: one
network namespace per node, links shaped) the node's processes are every process in its namespace; without
namespaces (not root), the fallback is plain agents on localhost, told apart only by SKIPPIPE_NODE, and a
node's processes are its agent and the agent's descendants. After `kill_after_step` is logged and about
half an iteration more, every process of one node gets SIGKILL; the survivors' workers fail on the dead
peer, their agents restart them in a smaller world, and scripts/train.py re-plans and resumes
(Note [node loss] in skippipe/elastic.py).

The victim: a node other than node 0 (its agent hosts the rendezvous store, which must outlive the job),
preferring the sole replica of a stage, so that a stage loses every replica and is taken over.

Note [rendezvous timing]: torchrun's c10d rendezvous starts the next round only when every participant
of the last one has left it, and a dead node leaves only when its heartbeat expires (keep_alive_interval
x keep_alive_max_attempt, 5 s x 3 by default); the round then waits last_call_timeout (30 s by default)
for more nodes once MIN are in. RDZV_CONF shortens both, so recovery takes seconds, not a minute.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

REPO = Path(__file__).resolve().parents[2]
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=3"  # Note [rendezvous timing]
# torchrun shares its agents' TCPStore with the workers by default and keeps it across restarts, so a
# restarted world reads the previous world's addresses and gloo cannot connect (pytorch/pytorch#135712).
AGENT_ENV = MappingProxyType({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # read-only


@dataclass
class ChaosSettings:
    topology: str = "configs/topologies/emulated-8.yaml"  # a YAML, or a scenario with num_nodes
    num_nodes: int = 8
    config: str = "configs/train/emulated.yaml"
    skip_ratio: float = 0.25
    steps: int = 30
    checkpoint_every: int = 5
    kill_after_step: int = 17  # killed during the next step
    bandwidth_scale: float = 1 / 16  # the emulated links' speed (1/128 matches a 500M model's messages: slow)
    max_restarts: int = 3
    overrides: list[str] = field(default_factory=lambda: ["schedule.stage_sizes=[3,2,2,1]", "train.comm_timeout_s=30"])
    timeout_s: float = 600


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag`'s value replaced (the emulator's agent command, made elastic)."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class LocalAgents:
    """The fallback without namespaces: N agents on localhost, distinct only by SKIPPIPE_NODE."""

    def __init__(self, names: list[str], python: str = sys.executable):
        self.names, self.python, self.port = names, python, _free_port()
        self.kind = "localhost"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def popen(self, index: int, *, script_args: list[str], run_id: str, settings: ChaosSettings, out) -> subprocess.Popen:
        n = len(self.names)
        argv = [self.python, "-m", "torch.distributed.run", "--nnodes", f"{n - 1}:{n}", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", run_id,
                "--local-addr", "127.0.0.1",
                "--rdzv-conf", f"is_host={'true' if index == 0 else 'false'},join_timeout=120,{RDZV_CONF}",
                "--max-restarts", str(settings.max_restarts), "--monitor-interval", "0.5",
                str(REPO / "scripts" / "train.py"), *script_args]
        env = dict(os.environ, **AGENT_ENV, SKIPPIPE_NODE=self.names[index], OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
                                start_new_session=True)

    def kill(self, index: int, proc: subprocess.Popen) -> None:
        pids = [proc.pid] + _descendants(proc.pid)  # the agent first, so it cannot restart its worker
        _kill(pids)


class NamespaceAgents:
    """The emulated cluster: a node's processes are every process in its network namespace."""

    def __init__(self, topology, work_dir: Path):
        from skippipe.emulation.emulate import EmulatedCluster
        self.cluster = EmulatedCluster(topology, work_dir)
        self.names = [n.name for n in topology.nodes]
        self.kind = "network namespaces"

    def __enter__(self):
        self.cluster.__enter__()
        return self

    def __exit__(self, *exc):
        self.cluster.__exit__(*exc)

    def popen(self, index: int, *, script_args: list[str], run_id: str, settings: ChaosSettings, out) -> subprocess.Popen:
        n = len(self.names)
        argv = self.cluster.agent_command(index, script_args, run_id)
        argv = _set_flag(argv, "--nnodes", f"{n - 1}:{n}")
        argv = _set_flag(argv, "--max-restarts", str(settings.max_restarts))
        argv = _set_flag(argv, "--rdzv-conf", argv[argv.index("--rdzv-conf") + 1] + "," + RDZV_CONF)
        env = dict(self.cluster.agent_env(index), **AGENT_ENV, SKIPPIPE_NODE=self.names[index])
        return self.cluster.net.popen(index, argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))

    def kill(self, index: int, proc: subprocess.Popen) -> None:
        ns = self.cluster.net.namespace(index)
        for _ in range(3):  # a process may fork while we kill
            pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                   text=True).stdout.split()]
            _kill([proc.pid] + pids)
            time.sleep(0.05)


def _records(path: Path) -> list[dict]:
    from skippipe.metrics import read_metrics
    try:
        return read_metrics(path)
    except (ValueError, OSError):  # a line being written
        return []


def pick_victim(plan: dict) -> dict:
    """Not node 0 (the rendezvous host); the sole replica of a stage if there is one; else the last node."""
    replicas = {}
    for n in plan["nodes"]:
        replicas[n["stage"]] = replicas.get(n["stage"], 0) + 1
    candidates = [n for n in plan["nodes"] if n["id"] != 0]
    return min(candidates, key=lambda n: (replicas[n["stage"]], -n["id"]))


def run_job(agents, script_args: list[str], run_dir: Path, settings: ChaosSettings) -> dict:
    """Launch every agent, kill one node mid-iteration, wait for the rest; what happened, with times."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    metrics, plan_path = run_dir / "metrics.jsonl", run_dir / "plan.json"
    run_id = f"chaos-{os.getpid()}-{int(time.time())}"
    files = [open(logs / f"{name}.log", "w") for name in agents.names]
    procs = []
    out: dict = {"kind": agents.kind}
    started = time.monotonic()
    try:
        for i in range(len(agents.names)):
            procs.append(agents.popen(i, script_args=[*script_args, "--run-dir", str(run_dir)], run_id=run_id,
                                      settings=settings, out=files[i]))
        victim, killed_at = None, None
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0) and agents.names[i] != out.get("victim")]
            if failed:
                raise RuntimeError(f"node {agents.names[failed[0]]} exited with {codes[failed[0]]}; logs in {logs}")
            if all(c is not None for c in codes):
                break
            if time.monotonic() - started > settings.timeout_s:
                raise RuntimeError(f"the job did not finish within {settings.timeout_s:.0f} s; logs in {logs}")
            records = _records(metrics)
            if victim is None and plan_path.is_file() and records:
                victim = pick_victim(json.loads(plan_path.read_text()))
                out["plan_before"] = json.loads(plan_path.read_text())
            if killed_at is None and records and records[-1]["step"] >= settings.kill_after_step:
                iteration = sorted(r["iteration_s"] for r in records[-5:])[len(records[-5:]) // 2]
                time.sleep(iteration / 2)  # into the next iteration
                index = agents.names.index(victim["name"])
                agents.kill(index, procs[index])
                killed_at = time.monotonic()
                out.update(victim=victim["name"], victim_stage=victim["stage"], kill_s=killed_at - started,
                           records_before=_records(metrics), iteration_s_before=iteration)
            if killed_at is not None and "resumed_s" not in out:
                before = {(r["step"], r["loss"]) for r in out["records_before"]}
                if any((r["step"], r["loss"]) not in before for r in records):  # a step of the resumed run
                    out["resumed_s"] = time.monotonic() - started
            time.sleep(0.05)
        out["wall_s"] = time.monotonic() - started
        out["exit_codes"] = {agents.names[i]: c for i, c in enumerate(codes)}
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                agents.kill(i, p)
                p.wait()
        for f in files:
            f.close()
    out["records_after"] = _records(metrics)
    out["plan_after"] = json.loads(plan_path.read_text())
    out["log_lines"] = sorted({line.strip() for f in logs.glob("*.log") for line in f.read_text(errors="replace").splitlines()
                               if line.startswith(("node loss:", "nodes joined:", "resumed from", "restarted ("))})
    return out


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _stage_sizes(plan: dict) -> list[int]:
    return [sum(1 for n in plan["nodes"] if n["stage"] == s) for s in range(plan["num_stages"])]


def summarise(job: dict, settings: ChaosSettings) -> dict:
    """The report's figures from what `run_job` saw; Note [chaos criteria] in scripts/chaos.py's docstring."""
    before, after = job["records_before"], job["records_after"]
    first = {r["step"]: r["loss"] for r in before}
    final = {r["step"]: r["loss"] for r in after}
    last_before = max(first, default=0)
    resumed_from = max((s for s, loss in final.items() if first.get(s) == loss), default=0)
    redone = [s for s in sorted(first) if s > resumed_from]
    window = [s for s in range(max(2, resumed_from - 9), resumed_from + 1) if s in final and s - 1 in final]
    change_before = max((abs(final[s] - final[s - 1]) for s in window), default=float("nan"))
    jump = abs(final[resumed_from + 1] - final[resumed_from]) if resumed_from in final and resumed_from + 1 in final else float("nan")
    redone_diff = max((abs(final[s] - first[s]) for s in redone if s in final), default=0.0)
    survivors_ok = all(code == 0 for name, code in job["exit_codes"].items() if name != job.get("victim"))
    pb, pa = job["plan_before"], job["plan_after"]
    lost_stage = job["victim_stage"]
    return {
        "completed": survivors_ok and sorted(final) == list(range(1, settings.steps + 1)),
        "steps_requested": settings.steps,
        "steps_completed": len(final),
        "nodes_before": len(pb["nodes"]),
        "nodes_after": len(pa["nodes"]),
        "steps_redone": len(redone),
        "checkpoint_interval": settings.checkpoint_every,
        "killed_node": job["victim"],
        "killed_during_step": last_before + 1,
        "resumed_after_step": resumed_from,
        "loss": [{"step": s, "loss": final[s]} for s in sorted(final)],
        "loss_first_attempt": [{"step": s, "loss": first[s]} for s in sorted(first)],
        "loss_continuity": {
            "jump_at_resume": jump, "max_step_change_before": change_before,
            "redone_steps_max_abs_diff": redone_diff,
            "continuous": bool(jump <= 2 * change_before and redone_diff <= 2 * change_before),
        },
        "stage_of_killed_node": lost_stage,
        "replicas_of_that_stage_before": _stage_sizes(pb)[lost_stage],
        "taken_over_by": sorted(n["name"] for n in pa["nodes"] if n["stage"] == lost_stage),
        "stage_sizes_before": _stage_sizes(pb), "stage_sizes_after": _stage_sizes(pa),
        "placement_before": {n["name"]: n["stage"] for n in pb["nodes"]},
        "placement_after": {n["name"]: n["stage"] for n in pa["nodes"]},
        "microbatches_before": len(pb["paths"]), "microbatches_after": len(pa["paths"]),
        "predicted_iteration_s_before": pb["predicted"].get("iteration_s"),
        "predicted_iteration_s_after": pa["predicted"].get("iteration_s"),
        # Medians, leaving out each run's first step (warm-up) and the last (it evaluates).
        "measured_iteration_s_before": _median([r["iteration_s"] for r in before if 1 < r["step"]]),
        "measured_iteration_s_after": _median([r["iteration_s"] for r in after
                                               if resumed_from + 1 < r["step"] < settings.steps]),
        "kill_s": job["kill_s"], "resumed_s": job.get("resumed_s"),
        "recovery_s": job["resumed_s"] - job["kill_s"] if job.get("resumed_s") else None,
        "wall_s": job["wall_s"], "exit_codes": job["exit_codes"], "log_lines": job["log_lines"],
        "emulation": job["kind"], "settings": asdict(settings),
    }


def plot(report: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.2))
    final = report["loss"]
    ax.plot([r["step"] for r in final], [r["loss"] for r in final], "o-", ms=3, lw=1.2,
            label=f"the job: {report['nodes_before']} nodes, then {report['nodes_after']}")
    c = report["resumed_after_step"]
    lost = [r for r in report["loss_first_attempt"] if r["step"] >= c]
    if len(lost) > 1:
        ax.plot([r["step"] for r in lost], [r["loss"] for r in lost], "x--", ms=5, lw=1, color="tab:red",
                label=f"steps done before the failure and redone ({report['steps_redone']})")
    ax.axvline(report["killed_during_step"] - 0.5, color="tab:red", lw=1,
               label=f"{report['killed_node']} (stage {report['stage_of_killed_node']}) killed during step "
                     f"{report['killed_during_step']}")
    ax.axvline(c, color="gray", ls=":", lw=1.2, label=f"resumed from the checkpoint after step {c}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean token cross entropy)")
    ax.set_title(f"chaos run ({report['emulation']}): stage sizes {report['stage_sizes_before']} -> "
                 f"{report['stage_sizes_after']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def run_chaos(settings: ChaosSettings, work_dir: str | Path, namespaces: bool = True) -> dict:
    """The whole chaos run; on namespaces when asked and possible, else on localhost (the report says which)."""
    import shutil

    from skippipe.emulation.emulate import emulated_topology, write_topology
    from skippipe.emulation.netns import netns_unavailable_reason
    from topology.load import load_topology
    shaped = emulated_topology(load_topology(settings.topology, settings.num_nodes), settings.bandwidth_scale)
    reason = netns_unavailable_reason() if namespaces else "not asked for (--localhost)"
    work_dir = Path(work_dir)
    run_dir = work_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh job: nothing to resume from but what it saves itself
    topology_file = write_topology(work_dir / "topology.shaped.yaml", shaped)
    agents = NamespaceAgents(shaped, work_dir) if reason is None else LocalAgents([n.name for n in shaped.nodes])
    args = ["--config", settings.config, "--skip-ratio", str(settings.skip_ratio), "--steps", str(settings.steps),
            "--topology", str(topology_file), f"train.checkpoint_every={settings.checkpoint_every}", *settings.overrides]
    with agents:
        job = run_job(agents, args, run_dir, settings)
    report = summarise(job, settings)
    report["namespaces_unavailable"] = reason
    report["train_command"] = shlex.join(["scripts/train.py", *args, "--run-dir", str(run_dir)])
    report["run_dir"] = str(run_dir)
    return report
