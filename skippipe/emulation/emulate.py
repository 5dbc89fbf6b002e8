"""Run real multi-node training on an emulated heterogeneous cluster on one machine (needs root).

    with EmulatedCluster(emulated_topology(load_topology("configs/topologies/emulated-8.yaml"), 1 / 128),
                         work_dir) as cluster:
        cluster.train(run_dir, ["--config", "configs/train/emulated.yaml", "--skip-ratio", "0.25"])

Each node is a network namespace (skippipe/emulation/netns.py) with its links shaped to the topology's bandwidths;
link latency is added in the processes (skippipe/emulation/latency.py). One torchrun agent per namespace is started
with the real multi-node flags (--nnodes N --node-rank i, c10d rendezvous on node 0's address,
GLOO_SOCKET_IFNAME=eth0), exactly as on N machines.

Note [rank = node]: the plan, the shaped links and the latency file all index nodes by rank, so rank i must
run in namespace i. With c10d rendezvous torchrun ignores --node-rank and ranks the agents by their
--local-addr (then pid); node addresses have equal length (netns.FIRST_HOST), so address order is node
order and rank i is node i. Each rank checks this (latency.NODE_ENV).

Note [bandwidth scale]: the tiny CPU model's messages are a few tens of KB, a real model's several MB. Scaling
every bandwidth by the ratio of their message sizes (`auto_bandwidth_scale`) makes each hop of the tiny model
take as long on the emulated link as the reference model's hop on the real one; compute, which the tiny
model does in a millisecond, then is a small part of the iteration, as in a geo-distributed job.

Note [emulated compute]: with real compute only links matter (the tiny model computes in milliseconds), so a
straggling node changes nothing measurable. For benchmarks where compute must weigh as it does for the
reference model (scripts/adaptation.py), `emulated_topology(compute_scale=...)` scales every node's FLOP/s
by the ratio of the two models' FLOPs per sample (`auto_compute_scale`), and each rank is told, through
context.COMPUTE_ENV, the seconds its forward, loss and backward take by the cost model on that emulated
topology (`compute_floors`); a faster real action waits out the rest (worker.py). The ranks sleep rather than
compute, so 8 of them share 2 cores without contending. Hops and compute then take what the reference
model's would on the real network, times 1 / time scale when bandwidths and FLOP/s are multiplied and
latencies divided by the same factor (a shorter benchmark with the same plan and the same ratios).

Note [priority]: the agents and ranks run at nice -19. On a shared machine, other jobs' CPU load otherwise
adds a scheduling delay to every hop (a delayed send's timer thread, gloo's I/O thread on both ends, the
receiving rank: each waits for a core), which no real cluster of dedicated nodes has: at a load average
of 10-15 on 2 cores this added 10-20% to the measured iteration time at nice 0, up to 11% at nice -10,
and 2-3% at nice -19. The emulated nodes are network-bound and use little CPU (a few percent of a core
each once started), so their priority costs other jobs little.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from skippipe.emulation.events import LinkEvents, event_env
from skippipe.emulation.latency import ENV as LATENCY_ENV, NODE_ENV, write_latency_file
from skippipe.emulation.netns import EmulatedNetwork, netns_unavailable_reason, remove_stale
from skippipe.context import COMPUTE_ENV
from topology.cost import CostModel, layer_forward_flops
from topology.model_spec import ModelSpec
from topology.network import Node, Topology

REPO = Path(__file__).resolve().parents[2]
RDZV_PORT = 29400


def auto_bandwidth_scale(model: ModelSpec, reference: ModelSpec) -> float:
    """Message bytes of `model` over those of `reference`, per sample (Note [bandwidth scale])."""
    return (model.context * model.dim * model.dtype_bytes) / (reference.context * reference.dim * reference.dtype_bytes)


def auto_compute_scale(model: ModelSpec, reference: ModelSpec) -> float:
    """Forward FLOPs per sample of all `model`'s layers over those of `reference` (Note [emulated compute]):
    a stage of `model` on a node whose FLOP/s are scaled by this takes as long as the same share of
    `reference`'s layers on the real node."""
    return (model.num_layers * layer_forward_flops(model)) / (reference.num_layers * layer_forward_flops(reference))


def emulated_topology(configured: Topology, bandwidth_scale: float, latency_scale: float = 1.0,
                      compute_scale: float = 1.0) -> Topology:
    """The topology as emulated: bandwidths times `bandwidth_scale`, latencies times `latency_scale`, node
    FLOP/s times `compute_scale` (which only the ranks given `compute_floors` honour). ValueError for a
    scale that is not positive (latency: negative)."""
    if not bandwidth_scale > 0 or not latency_scale >= 0 or not compute_scale > 0:
        raise ValueError(f"scales must be positive (bandwidth {bandwidth_scale}, latency {latency_scale}, "
                         f"compute {compute_scale})")
    nodes = [Node(n.id, n.name, n.region, n.flops * compute_scale, n.memory_gb) for n in configured.nodes]
    return Topology(f"{configured.name}-emulated", nodes, configured.latency_ms * latency_scale,
                    configured.bandwidth_gbit_s * bandwidth_scale)


def compute_floors(cost: CostModel, stage_of_node: list[int]) -> dict[int, dict[str, str]]:
    """node -> the COMPUTE_ENV its ranks get: the cost model's seconds of a forward, loss and backward of
    the node's stage (`stage_of_node[node]`) on the node (Note [emulated compute])."""
    return {node: {COMPUTE_ENV: f"F={cost.forward_s[stage, node]:.6f},L={cost.loss_s[node]:.6f},"
                                f"B={cost.backward_s(stage, node):.6f}"}
            for node, stage in enumerate(stage_of_node)}


def write_topology(path: str | Path, topology: Topology) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(topology.to_dict(), sort_keys=False))
    return path


class JobFailed(RuntimeError):
    """A node of the emulated job failed; the message names it and quotes the logs."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP turned into an exception, so that every `finally` (tear-down) runs."""


class EmulatedCluster:
    """The namespaces, shaping and latency file for one topology; `train` launches one job on it."""

    def __init__(self, topology: Topology, work_dir: str | Path, python: str = sys.executable, nice: int = -19):
        reason = netns_unavailable_reason()
        if reason is not None:
            raise OSError(f"cannot emulate a cluster here: {reason}")
        self.nice = nice  # Note [priority]
        self.topology = topology
        self.work_dir = Path(work_dir)
        self.python = python
        self.net = EmulatedNetwork(topology.bandwidth_gbit_s * 1e3)
        self.latency_file = self.work_dir / "link_latency.json"
        self._old_handlers: dict = {}
        self._jobs = 0
        self.last_events: list[dict] = []  # the link events the last job applied (events.LinkEvents)

    def __enter__(self) -> "EmulatedCluster":
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: it may be ignored in a background job
            self._old_handlers[sig] = signal.signal(sig, self._raise)
        try:
            removed = remove_stale()
            if removed:
                print(f"removed leftovers of an earlier emulation: {', '.join(removed)}", flush=True)
            self.work_dir.mkdir(parents=True, exist_ok=True)
            write_latency_file(self.latency_file, self.topology.latency_ms)
            write_topology(self.work_dir / "topology.shaped.yaml", self.topology)
            self.net.up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.net.down()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    @staticmethod
    def _raise(signum, frame):
        raise Interrupted(f"signal {signum}")

    def agent_command(self, index: int, script_args: list[str], run_id: str) -> list[str]:
        n = self.topology.num_nodes
        return ["nice", "-n", str(self.nice), self.python, "-m", "torch.distributed.run", "--nnodes", str(n),
                "--nproc-per-node", "1", "--node-rank", str(index), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{self.net.address(0)}:{RDZV_PORT}", "--rdzv-id", run_id,
                "--rdzv-conf", f"is_host={'true' if index == 0 else 'false'},join_timeout=120",
                "--local-addr", self.net.address(index), "--max-restarts", "0", "--monitor-interval", "0.5",
                "-m", "skippipe.commands.train", *script_args]

    def agent_env(self, index: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "GLOO_SOCKET_IFNAME": "eth0",  # the namespace's only interface besides lo
            "OMP_NUM_THREADS": "1",  # N ranks share this machine's cores; more threads only contend
            LATENCY_ENV: str(self.latency_file), NODE_ENV: str(index),
            "SKIPPIPE_NODE_NAME": self.topology.nodes[index].name,
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra or {})
        return env

    def train(self, run_dir: str | Path, script_args: list[str], timeout_s: float = 1800, *,
              events: list | None = None, compute_env: dict[int, dict[str, str]] | None = None) -> float:
        """Run scripts/train.py on every node with `script_args` (+ --run-dir); return the wall seconds.

        `events`: scheduled link and node events (skippipe/emulation/events.py); the links they changed
        are shaped back to the topology's figures when the job ends. `compute_env`: node -> extra environment
        of its processes (`compute_floors`).

        Each agent's output goes to run_dir/logs/<node>.log. A failing node ends the whole job; the error
        names it and shows the end of its log.
        """
        run_dir = Path(run_dir)
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        write_topology(run_dir / "topology.shaped.yaml", self.topology)
        self._jobs += 1
        run_id = f"emu-{self.net.tag}-{self._jobs}"
        args = [*script_args, "--run-dir", str(run_dir)]
        procs, files = [], []
        extra_env = {i: dict((compute_env or {}).get(i, {})) for i in range(self.topology.num_nodes)}
        for i, env in event_env(events or []).items():
            extra_env[i].update(env)
        scheduled = LinkEvents(events or [], self.net, run_dir)
        started = time.monotonic()
        try:
            for i in range(self.topology.num_nodes):
                out = open(logs / f"{self.topology.nodes[i].name}.log", "w")
                files.append(out)
                procs.append(self.net.popen(i, self.agent_command(i, args, run_id), env=self.agent_env(i, extra_env.get(i)),
                                            stdout=out, stderr=subprocess.STDOUT))
            while True:
                scheduled.poll(time.monotonic() - started)
                codes = [p.poll() for p in procs]
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    raise JobFailed(self._failure(failed[0], codes[failed[0]], logs))
                if all(c == 0 for c in codes):
                    return time.monotonic() - started
                if time.monotonic() - started > timeout_s:
                    raise JobFailed(f"the job did not finish within {timeout_s:.0f} s; logs in {logs}")
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            self.net.processes = [p for p in self.net.processes if p not in procs]
            for f in files:
                f.close()
            self.last_events = scheduled.applied
            shaped = self.topology.bandwidth_gbit_s * 1e3
            for record in scheduled.applied_links():  # the next job starts on the topology's links
                for i, j in record:
                    self.net.set_rate(i, j, shaped[i, j])

    def _failure(self, index: int, code: int, logs: Path) -> str:
        """The failing node, every distinct `error:` line of any node (the cause is often on another node),
        and the end of the failing node's log."""
        name = self.topology.nodes[index].name
        log = logs / f"{name}.log"
        errors = []
        for path in sorted(logs.glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("error:") and line not in errors:
                    errors.append(line)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.is_file() else "(no log)"
        return (f"node {index} ({name}) exited with {code}" + "".join(f"\n  {e}" for e in errors[:5]) +
                f"\nthe end of {log}:\n{tail}")



def run_benchmark(topology_path: str, *, skip_ratios: list[float], steps: int, profile: bool, config: str,
                  work_dir: str | Path, bandwidth_scale: float | None = None, reference_model: str = "llama-500m",
                  latency_scale: float = 1.0, overrides: list[str] = (), plots_dir: str | Path | None = None,
                  timeout_s: float = 1800, nice: int = -19, overwrite: bool = False) -> dict:
    """Train for `steps` at each skip ratio on one emulated cluster; the report of the issue's end-to-end run.

    With `profile`, every run starts with `--topology measure` (rank 0 solves on what was measured);
    otherwise it solves on the shaped topology. See skippipe/emulation/emulate_report.py for the figures.
    `overwrite`: pass --overwrite to scripts/train.py (replace runs already in the work dir's run dirs).
    """
    from skippipe.config import load_config
    from skippipe.emulation.emulate_report import gantt_for_run, summarise_run
    from topology.load import load_topology
    from topology.model_spec import load_model_spec

    cfg = load_config(config, list(overrides))
    model = load_model_spec(cfg.model)
    configured = load_topology(topology_path)
    scale = bandwidth_scale or auto_bandwidth_scale(model, load_model_spec(reference_model))
    shaped = emulated_topology(configured, scale, latency_scale)
    work_dir = Path(work_dir)
    runs = []
    with EmulatedCluster(shaped, work_dir, nice=nice) as cluster:
        for ratio in skip_ratios:
            run_dir = work_dir / f"skip{ratio:g}"
            topo_arg = "measure" if profile else str(work_dir / "topology.shaped.yaml")
            wall = cluster.train(run_dir, ["--config", config, "--skip-ratio", str(ratio), "--steps", str(steps),
                                           "--topology", topo_arg, *overrides,
                                           *(["--overwrite"] if overwrite else [])], timeout_s)
            summary = summarise_run(run_dir, shaped, model)
            summary["wall_s"] = wall
            if plots_dir is not None:
                summary["gantt"] = str(gantt_for_run(run_dir, shaped=shaped, model=model, summary=summary,
                                                     out=Path(plots_dir) / f"emulate_gantt_skip{ratio:g}.png"))
            runs.append(summary)
            print(f"skip ratio {ratio:g}: measured {summary['measured_iteration_s']:.3f} s, predicted "
                  f"{summary['predicted_iteration_s']:.3f} s ({summary['prediction_error']:+.1%})", flush=True)
    report = {"topology": topology_path, "config": config, "steps": steps, "profile": profile,
              "bandwidth_scale": scale, "reference_model": None if bandwidth_scale else reference_model,
              "latency_scale": latency_scale, "nice": nice, "load_average_at_end": list(os.getloadavg()),
              "shaped_topology": shaped.to_dict(), "runs": runs}
    errors = [e for r in runs if "profile" in r for e in r["profile"]["bandwidth_rel_errors"]]
    if errors:
        report["profile_bandwidth_error"] = float(np.median(errors))
        report["profile_bandwidth_error_max"] = float(np.max(errors))
        report["profile_latency_error_ms_median"] = float(np.median(
            [r["profile"]["latency_abs_error_ms_median"] for r in runs if "profile" in r]))
    by_ratio = {r["skip_ratio"]: r for r in runs}
    if 0.0 in by_ratio:
        full = by_ratio[0.0]
        report["ratio_to_full"] = {f"{r:g}": {"measured": v["measured_iteration_s"] / full["measured_iteration_s"],
                                              "predicted": v["predicted_iteration_s"] / full["predicted_iteration_s"]}
                                   for r, v in by_ratio.items() if r != 0.0}
    return report
