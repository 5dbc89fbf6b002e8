"""The plan a run executes: loaded from a file, solved for the config, or shared by rank 0.

`build_problem` is the one place a run's solve request (scheduler.problem.Problem) is made from its
config: a fresh run (`make_plan`) and a re-plan after node loss (elastic.replan) both go through it.
"""
from __future__ import annotations

from collections.abc import Callable

from topology.plan import Plan
from scheduler.problem import Problem
from skippipe.checkpoint import latest_checkpoint
from skippipe.comm import broadcast_json, peer_errors
from skippipe.config import Config
from topology.errors import ConfigError
from topology.model_spec import load_model_spec
from topology.network import Topology


def job_topology(cfg: Config) -> Topology:
    """The topology the config names (scenario name or YAML), with its node count and seed."""
    from topology.load import load_topology
    return load_topology(cfg.schedule.topology, cfg.schedule.num_nodes, cfg.train.seed)


def build_problem(cfg: Config, topology: Topology, **changes) -> Problem:
    """The solve request of `cfg` on `topology`; `changes` replace Problem fields (a re-plan keeps the
    shape of the plan it replaces). Raises ConfigError for an impossible request (Problem checks it)."""
    s = cfg.schedule
    fields = dict(microbatch_size=s.microbatch_size, num_stages=s.num_stages, stage_sizes=s.stage_sizes,
                  num_microbatches=s.num_microbatches, memory=s.memory, skip_ratio=s.skip_ratio,
                  max_swaps=s.max_swaps, seed=cfg.train.seed,
                  topology_source={"spec": s.topology, "seed": cfg.train.seed})
    fields.update(changes)
    return Problem(topology=topology, model=load_model_spec(cfg.model), **fields)


def make_plan(cfg: Config) -> Plan:
    """The plan file named by the config, or one solved for the configured topology and training shape."""
    if cfg.schedule.plan:
        return Plan.load(cfg.schedule.plan)
    from scheduler.solve import solve
    return solve(build_problem(cfg, job_topology(cfg)), cfg.schedule.strategy)


def plan_for_run(cfg: Config, resume: bool) -> Plan:
    """A resumed run keeps the plan of its checkpoint; a new one loads or solves it."""
    return Plan.load(latest_checkpoint(cfg.train.run_dir) / "plan.json") if resume else make_plan(cfg)


def share_plan(make: Callable[[], Plan], rank: int) -> Plan:
    """Rank 0 makes the plan and broadcasts it as JSON; a bad input fails on every rank, not only on 0.

    JSON bytes in a tensor, not broadcast_object_list: nothing from a peer is unpickled (Note [no pickles
    from peers] in comm.py). Collective over the default group. Raises ConfigError on every rank when
    rank 0 could not make the plan.
    """
    payload = None
    if rank == 0:
        try:
            payload = {"plan": make().to_dict()}
        except (ValueError, OSError) as exc:
            payload = {"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)}
    with peer_errors("receiving the plan from rank 0"):
        payload = broadcast_json(payload, src=0)
    if not isinstance(payload, dict) or not isinstance(payload.get("plan", payload.get("error")), (dict, str)):
        raise ConfigError("the plan from rank 0 is malformed; is every rank running the same skippipe version?")
    if "error" in payload:
        raise ConfigError(str(payload["error"]))
    return Plan.from_dict(payload["plan"], where="the plan from rank 0")
