"""Surviving node loss: who is alive, which plan they run, and the checkpoint carried over to that plan.

Under torchrun's elastic launch (`--nnodes MIN:MAX --max-restarts K`, c10d rendezvous) a dead node makes
its peers' workers fail (comm.PeerError); the surviving agents restart their workers in a smaller world.
scripts/train.py then runs `join` and `plan_for_world`: every rank says which topology node it is
(SKIPPIPE_NODE, set per machine by the launcher), rank 0 decides whether this start continues the job and
which plan the live nodes run, and shares both.

Note [node loss]: the decisions, in the order they are taken.
- Identity. Ranks are not nodes: torchrun re-numbers the survivors. SKIPPIPE_NODE names a node of the
  job's topology (its name, or its index in the topology); ranks are matched to plan nodes by name.
- Continue or start. A start resumes when --resume is given, or when this torchrun job (same
  TORCHELASTIC_RUN_ID) already saved a checkpoint in the run dir since it began (run_dir/elastic.json
  records what the run dir held when the job began). Restarted workers of one agent may report a restart
  count of 0 (an agent whose worker was healthy restarts it for the new round without counting), so the
  marker, not the count, tells a restart from a new job.
- Same nodes: the checkpoint's plan runs on, its ranks re-assigned to the live ranks by node name.
- Other nodes: re-solve on the job's topology restricted to the live nodes (Topology.subset), with the
  same strategy, skip ratio, stage count, microbatch size and number of microbatches per iteration.
  Stage sizes shrink from the current ones (`survivor_stage_sizes`): a node is taken from the largest
  stage other than 0 first, so stage 0 keeps its data nodes and the data shards their readers.
- Lost stages are taken over, not skipped: the solver puts a live node on every stage and that node
  loads the stage's weights and AdamW state from the shared checkpoint (every stage's files are there,
  whoever wrote them). Skipping a stage until someone can take it would freeze its weights, break CC4
  (balanced updates) and change the model the run trains; taking it over costs one re-solve (well
  under a second) and one file read.
- Fewer live nodes than stages: no plan with one stage per node exists; the job stops with an error
  that says so (resume on at least that many nodes). Re-cutting the layers into fewer stages would
  change the model's stage structure, and SkipPipe's skip ratio with it.
- The carried-over checkpoint (`carry_over`): rank 0 writes checkpoints/step_N-replanK/ next to the
  checkpoint it continues from, with the new plan and `latest` pointing at it, so the ordinary resume
  path loads it and a second loss re-plans from it. Stage files are hard links (checkpoint files are
  only ever replaced, never written in place). Data positions (Note [data determinism] in data.py):
  data shard i continues on the new plan's i-th data node (by node id), exactly where the checkpoint
  left it, whenever the number of data nodes is unchanged (the stage sizes above keep it so while
  enough nodes live). Otherwise the training split is re-cut into one shard per new data node, each
  with a fresh generator seeded by (seed, shard, step): deterministic, but not the batches an
  uninterrupted run would have drawn. Per-process RNG state is not carried (training draws no random
  numbers outside the data streams).
- Where checkpoints live: the run dir, which must be on storage every node reaches and that outlives
  any one node (a shared filesystem). A checkpoint on a lost node's local disk is lost with it.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from scheduler.problem import Problem
from skippipe.checkpoint import checkpoint_step, data_files_by_shard, derive_checkpoint, latest_checkpoint, latest_token
from skippipe.config import Config, load_config
from skippipe.planning import build_problem, job_topology
from skippipe.rundir import claim_run_dir
from topology.errors import ConfigError
from topology.network import Topology
from topology.plan import Plan

NODE_ENV = "SKIPPIPE_NODE"  # this machine's node of the job's topology: its name or its index
EMULATED_ENV = "SKIPPIPE_EMULATED_NODE"  # the emulator's namespace index of this process, if emulated
MARKER = "elastic.json"


@dataclass
class World:
    """The live ranks and who they are; `identities` is None for a job that does not name its nodes,
    `emulated` None unless every rank runs in an emulated node (then each rank's node index)."""
    rank: int
    world_size: int
    identities: list[str] | None
    emulated: list[int] | None
    resume: bool = False

    @property
    def rank_nodes(self) -> list[int] | None:
        """Each rank's emulated node, for a job whose ranks need not be their nodes (named nodes: the
        survivors of a loss are re-ranked); None where rank == node is to be checked instead."""
        return self.emulated if self.identities is not None else None


def node_identity() -> str | None:
    value = os.environ.get(NODE_ENV, "").strip()
    return value or None


def check_identities(identities: list[str | None]) -> list[str] | None:
    """All ranks name their node or none does; no node twice."""
    named = [i for i in identities if i is not None]
    if not named:
        return None
    if len(named) != len(identities):
        missing = [r for r, i in enumerate(identities) if i is None]
        raise ConfigError(f"{NODE_ENV} is set on some ranks but not on rank(s) {missing}; set it on every "
                          f"machine (the name of its node in the topology) or on none")
    twice = sorted({i for i in named if named.count(i) > 1})
    if twice:
        raise ConfigError(f"{NODE_ENV}={twice[0]} is set on {named.count(twice[0])} ranks; each machine must "
                          f"name a different node of the topology")
    return list(named)


def resolve_names(identities: list[str], topology: Topology) -> list[str]:
    """Per rank, the topology node name its identity stands for (a name, or an index into the topology)."""
    names = [n.name for n in topology.nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"topology {topology.name!r} repeats node names; surviving node loss needs unique names")
    out = []
    for rank, identity in enumerate(identities):
        if identity in names:
            out.append(identity)
        elif identity.isdigit() and int(identity) < len(names):
            out.append(names[int(identity)])
        else:
            raise ConfigError(f"{NODE_ENV}={identity!r} on rank {rank} names no node of topology {topology.name!r}; "
                              f"use one of {', '.join(names)} or an index 0..{len(names) - 1}")
    if len(set(out)) != len(out):
        raise ConfigError(f"two ranks name the same node ({NODE_ENV} by name and by index); names: {out}")
    return out


def stage_sizes(plan: Plan) -> list[int]:
    return [len(plan.stage_nodes(s)) for s in range(plan.num_stages)]


def survivor_stage_sizes(sizes: list[int], num_nodes: int) -> list[int]:
    """Nodes per stage for `num_nodes` live nodes, changed as little as possible from `sizes`.

    Shrinking takes a node from the largest stage other than 0 (ties: the highest stage), stage 0 only
    when every other stage is down to one node; so the data nodes, and the data shards they read, stay.
    Growing gives a node to the smallest stage (ties: the lowest). Fewer nodes than stages is an error.
    """
    sizes = list(sizes)
    if num_nodes < len(sizes):
        raise ConfigError(f"{num_nodes} node(s) are left for {len(sizes)} stages; every stage needs a node. "
                          f"Resume on at least {len(sizes)} nodes (the model's stages are fixed by its checkpoint)")
    while sum(sizes) > num_nodes:
        rest = [s for s in range(1, len(sizes)) if sizes[s] > 1]
        stage = max(rest, key=lambda s: (sizes[s], s)) if rest else 0
        sizes[stage] -= 1
    while sum(sizes) < num_nodes:
        sizes[min(range(len(sizes)), key=lambda s: (sizes[s], s))] += 1
    return sizes


def assign_ranks(plan: Plan, rank_names: list[str]) -> Plan:
    """The plan with each node played by the rank that names it."""
    rank_of = {name: rank for rank, name in enumerate(rank_names)}
    if sorted(rank_of) != sorted(n.name for n in plan.nodes):
        raise ConfigError(f"the live nodes {sorted(rank_of)} are not the plan's {sorted(n.name for n in plan.nodes)}")
    return replace(plan, nodes=[replace(n, rank=rank_of[n.name]) for n in plan.nodes])


@dataclass
class Shape:
    """What a re-plan keeps: the training shape of the plan it replaces."""
    skip_ratio: float
    num_stages: int
    stage_sizes: list[int]
    microbatch_size: int
    num_microbatches: int
    memory: int
    max_swaps: int

    @classmethod
    def of_plan(cls, plan: Plan) -> "Shape":
        return cls(plan.skip_ratio, plan.num_stages, stage_sizes(plan), plan.microbatch_size, plan.num_microbatches,
                   int(plan.constraints.get("memory", 3)), int(plan.constraints.get("max_swaps", 2)))

    @classmethod
    def of_problem(cls, problem: Problem) -> "Shape":
        """The shape a fresh solve of `problem` would have (its stage sizes even when not given)."""
        return cls(problem.skip_ratio, problem.num_stages, problem.even_stage_sizes(), problem.microbatch_size,
                   problem.microbatches_for(problem.even_stage_sizes()[0]), problem.memory, problem.max_swaps)


def replan(topology: Topology, live_names: list[str], shape: Shape, cfg: Config) -> Plan:
    """Solve `shape` on the live nodes of the job's topology; rank r plays live_names[r]."""
    from scheduler.solve import solve
    index = {n.name: n.id for n in topology.nodes}
    ids = sorted(index[name] for name in live_names)  # topology order: the same plan whatever the rank order
    sub = topology.subset(ids, name=f"{topology.name}[{len(ids)} of {topology.num_nodes}]")
    problem = build_problem(cfg, sub, microbatch_size=shape.microbatch_size, num_stages=shape.num_stages,
                            stage_sizes=survivor_stage_sizes(shape.stage_sizes, len(ids)),
                            num_microbatches=shape.num_microbatches, memory=shape.memory, skip_ratio=shape.skip_ratio,
                            max_swaps=shape.max_swaps,
                            topology_source={"spec": cfg.schedule.topology, "seed": cfg.train.seed,
                                             "nodes": [topology.nodes[i].name for i in ids]})
    return assign_ranks(solve(problem, cfg.schedule.strategy), live_names)


# -- the checkpoint, carried over to a new plan ----------------------------------------------------------

def data_nodes(plan: Plan) -> list[int]:
    return sorted(plan.stage_nodes(0))


def carry_over(folder: Path, new_plan: Plan, *, make_stream: Callable[[int, int], object], seed: int) -> Path:
    """A checkpoint for `new_plan` from `folder` (another plan's), made the `latest`; Note [node loss].

    `make_stream(shard_index, num_shards)` builds a fresh TokenStream, used only when the number of data
    nodes changes. The files are laid out by checkpoint.derive_checkpoint.
    """
    from skippipe.model import derive_seed
    old_plan = Plan.load(folder / "plan.json")
    if old_plan.num_stages != new_plan.num_stages:
        raise ConfigError(f"the checkpoint in {folder} has {old_plan.num_stages} stages, the new plan "
                          f"{new_plan.num_stages}; the stage count cannot change on resume")
    step = checkpoint_step(folder)
    old_shards = data_files_by_shard(folder, data_nodes(old_plan))
    new_data = data_nodes(new_plan)
    data: dict[int, Path | dict] = {}
    if len(new_data) == len(old_shards):
        shards = "continued"
        for shard, node in enumerate(new_data):
            data[node] = old_shards[shard]
    else:
        shards = "re-cut"
        for shard, node in enumerate(new_data):
            stream = make_stream(shard, len(new_data))
            stream.generator.manual_seed(derive_seed(seed, "data", shard, "resharded at", step))
            data[node] = stream.state_dict()
    old_names, new_names = {n.name for n in old_plan.nodes}, {n.name for n in new_plan.nodes}
    return derive_checkpoint(folder, plan=new_plan, data=data, meta={
        "carried_over_from": folder.name, "lost": sorted(old_names - new_names),
        "joined": sorted(new_names - old_names), "data_shards": shards})


# -- the decisions rank 0 takes at every (re)start -------------------------------------------------------

def decide_resume(run_dir: str | Path, explicit: bool, run_id: str | None, overwrite: bool = False) -> bool:
    """Note [node loss], 'continue or start'. Rank 0 only: it writes run_dir/elastic.json.

    A new job (not a restart of this one) claims the run dir first (Note [run dir ownership] in rundir.py):
    raises ConfigError when the dir holds another run and neither --resume nor `overwrite` is given.
    """
    if explicit:
        claim_run_dir(run_dir, resume=True, overwrite=overwrite)  # refuses --resume with --overwrite
        return True
    run_dir = Path(run_dir)
    marker = run_dir / MARKER
    try:
        seen = json.loads(marker.read_text()) if run_id else None
    except (OSError, ValueError):
        seen = None
    if isinstance(seen, dict) and seen.get("run_id") == run_id:  # a restart of this job: its own run dir
        latest = latest_token(run_dir)
        return latest is not None and latest != seen.get("latest_at_start")
    claim_run_dir(run_dir, resume=False, overwrite=overwrite)
    if not run_id:
        return False
    latest = latest_token(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{MARKER}.tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "latest_at_start": latest}))
    tmp.replace(marker)
    return False


def plan_for_world(cfg: Config, world: World, *, resume: bool, make_plan: Callable[[Config], Plan],
                   log: Callable[[str], None] = lambda text: print(text, flush=True)) -> Plan:
    """Rank 0: the plan the live ranks run (and, after node loss, the checkpoint carried over to it)."""
    folder = latest_checkpoint(cfg.train.run_dir) if resume else None
    if world.identities is None:  # nodes not named: the plan as before, for exactly this world
        return Plan.load(folder / "plan.json") if folder else make_plan(cfg)
    job_cfg = load_config(folder / "config.yaml") if folder else cfg
    topology = job_topology(job_cfg)
    names = resolve_names(world.identities, topology)
    current = Plan.load(folder / "plan.json") if folder else None
    if current is None and len(names) == topology.num_nodes:
        current = make_plan(cfg)
    if current is not None and sorted(n.name for n in current.nodes) == sorted(names):
        return assign_ranks(current, names)
    shape = Shape.of_plan(current) if current is not None else Shape.of_problem(build_problem(cfg, topology))
    plan = replan(topology, names, shape, job_cfg)
    was = sorted(n.name for n in current.nodes) if current is not None else [n.name for n in topology.nodes]
    lost, joined = sorted(set(was) - set(names)), sorted(set(names) - set(was))
    head = "node loss" if lost else "nodes joined"
    changes = "; ".join(part for part in (f"lost {', '.join(lost)}" if lost else "",
                                          f"joined {', '.join(joined)}" if joined else "") if part)
    log(f"{head}: {len(was)} -> {len(names)} nodes ({changes}); re-planned: stage sizes {stage_sizes(plan)}, "
        f"{plan.num_microbatches} microbatches, skip ratio {plan.skip_ratio:g}, "
        f"predicted iteration {plan.predicted.get('iteration_s', float('nan')):.3f} s")
    if folder is not None:
        corpus = []

        def make_stream(shard: int, num_shards: int):
            from skippipe.data import load_corpus
            from topology.model_spec import load_model_spec
            if not corpus:
                spec = load_model_spec(job_cfg.model)
                corpus.append(load_corpus(job_cfg.data.corpus, context=job_cfg.data.context or spec.context,
                                          tokenizer=job_cfg.data.tokenizer, val_fraction=job_cfg.data.val_fraction,
                                          vocab_size=spec.vocab_size))
            return corpus[0].stream(plan.microbatch_size, shard, num_shards, job_cfg.train.seed)

        out = carry_over(folder, plan, make_stream=make_stream, seed=job_cfg.train.seed)
        meta = json.loads((out / "meta.json").read_text())
        log(f"{head}: carried checkpoint {folder.name} over to {out.name} (data shards {meta['data_shards']}); "
            f"resuming after step {meta['step']}")
    return plan


def join(cfg: Config, *, explicit_resume: bool, rank: int, world_size: int, overwrite: bool = False) -> World:
    """Every rank: gather who is who and agree on resuming (collective). The launcher picks the transport
    from the result (World.rank_nodes). Rank 0 claims the run dir for a new job (decide_resume, `overwrite`);
    a refusal reaches every rank as ConfigError."""
    from skippipe.comm import all_gather_json, broadcast_json, peer_errors
    mine = {"node": node_identity(), "emulated": os.environ.get(EMULATED_ENV)}
    with peer_errors("gathering node identities"):  # JSON, not pickles (Note [no pickles from peers], comm.py)
        gathered = all_gather_json(mine)
    identities = check_identities([g["node"] for g in gathered])
    emulated = [g["emulated"] for g in gathered]
    emulated = [int(e) for e in emulated] if all(e is not None for e in emulated) else None
    decision: list = [None]
    if rank == 0:
        try:
            decision = [("ok", decide_resume(cfg.train.run_dir, explicit_resume, os.environ.get("TORCHELASTIC_RUN_ID"),
                                             overwrite))]
        except ValueError as exc:  # ConfigError: the run dir holds another run
            decision = [("error", str(exc))]
        except OSError as exc:
            decision = [("error", f"{type(exc).__name__}: {exc}")]
    with peer_errors("agreeing on resuming"):
        decision = broadcast_json(decision, src=0)
    kind, value = decision[0]
    if kind == "error":
        raise ConfigError(value)
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        print("warning: torchrun shares its TCPStore with the workers, and a restarted world then reads the last "
              "world's addresses (pytorch/pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the "
              "torchrun agents so that restarts after a node loss can connect", file=sys.stderr, flush=True)
    if value and not explicit_resume and rank == 0:
        print(f"restarted (torchrun restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '?')}, world of "
              f"{world_size}): continuing from the run dir's latest checkpoint", file=sys.stderr, flush=True)
    return World(rank, world_size, identities, emulated, resume=value)
