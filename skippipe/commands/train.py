"""Train an LLM with partial, reordered pipelines.

    torchrun --standalone --nproc-per-node 8 scripts/train.py --config configs/train/debug.yaml --skip-ratio 0.25
    python scripts/train.py --config configs/train/debug.yaml --skip-ratio 0.25 --single-process
    torchrun --nnodes 8 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 scripts/train.py ...

Every rank plays the plan node with its rank. Rank 0 solves the plan (or loads --plan) and shares it;
every rank checks it against the world size. Settings: defaults < --config YAML < dotted overrides such
as optim.lr=3e-4 < the flags below. --resume continues from the run dir's newest checkpoint, with its plan;
a fresh run into a run dir that holds a run is refused unless --overwrite (Note [run dir ownership],
skippipe/rundir.py).
Node loss: launch elastic (--nnodes MIN:MAX --max-restarts K) with SKIPPIPE_NODE=<topology node name> per
machine; survivors re-plan and go on from the last checkpoint (Note [node loss], skippipe/elastic.py).
"""
import argparse
import contextlib
import os
import sys

from topology.errors import ArgumentParser, ConfigError, cli_errors, one_line


class Parser(ArgumentParser):
    """A bad flag: one `error:` line and exit 2 (not argparse's usage block), said by rank 0 only."""

    def error(self, message: str):
        if int(os.environ.get("RANK", 0)) != 0:
            sys.exit(2)
        super().error(message)


def build_parser() -> Parser:
    """The command's flags (README, Command reference)."""
    p = Parser(description=__doc__)
    p.add_argument("--config", help="training YAML path, or a shipped config by name (debug, emulated, omission); default: none, i.e. the built-in defaults of skippipe/config.py: llama-tiny, 8 nodes of the single-cluster scenario in 4 stages, skip ratio 0, 8 microbatches of 4 x 64 tokens, 100 steps, the built-in corpus, run dir runs/default")
    p.add_argument("--skip-ratio", type=float, help="fraction of stages each microbatch skips (schedule.skip_ratio; default: the config's, else 0)")
    p.add_argument("--topology", help="scenario name, topology YAML, or 'measure' (profile the ranks at "
                   "start-up and solve on that) (schedule.topology; default: the config's, else single-cluster)")
    p.add_argument("--plan", help="run this plan.json instead of solving (schedule.plan; default: solve one at start-up)")
    p.add_argument("--steps", type=int, help="train until this step (train.steps; default: the config's, else 100)")
    p.add_argument("--seed", type=int, help="model init, data order and solver seed (train.seed; default: the config's, else 0)")
    p.add_argument("--run-dir", help="metrics, config, plan and checkpoints go here, relative to the current directory (train.run_dir; default: the config's, else runs/default)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    p.add_argument("--overwrite", action="store_true", help="a fresh run in a run dir that holds a run: delete "
                   "that run's metrics, config, plan and checkpoints first (without it, the start is refused)")
    p.add_argument("--single-process", action="store_true", help="path-faithful mode: whole model, one device")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.log_every=10")
    return p


@contextlib.contextmanager
def quiet_errors():
    """On ranks other than 0: exit 2 on bad input without repeating the line rank 0 prints."""
    try:
        yield
    except (ValueError, OSError, KeyError):
        sys.exit(2)


def transport(rank: int, rank_nodes: list[int] | None):
    """The send of training messages (Note [transport] in skippipe/context.py): delayed by the emulated
    links' latency when the emulator launched this process (it sets SKIPPIPE_LINK_LATENCY), else plain.
    `rank_nodes`: each rank's emulated node after a node loss re-ranked the survivors (None: rank == node)."""
    import torch.distributed as dist
    if not os.environ.get("SKIPPIPE_LINK_LATENCY"):
        return dist.isend
    from skippipe.emulation.latency import link_latency_from_env
    return link_latency_from_env(rank, rank_nodes).isend


def flag_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"schedule.skip_ratio": args.skip_ratio, "schedule.topology": args.topology, "schedule.plan": args.plan,
             "train.steps": args.steps, "train.seed": args.seed, "train.run_dir": args.run_dir,
             "train.single_process": True if args.single_process else None}
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def main() -> None:
    args = build_parser().parse_args()
    rank = int(os.environ.get("RANK", 0))
    # Bad input: one line on rank 0, a quiet exit 2 elsewhere (every rank sees the same input).
    with cli_errors() if rank == 0 else quiet_errors():
        import torch.distributed as dist

        from scheduler.constraints import check
        from topology.plan import Plan
        from skippipe.comm import PeerError
        from skippipe.config import load_config
        from skippipe.context import (build_context, compute_floor_from_env, env_rank, init_process_group,
                                      pick_device, slowdown_from_env)
        from skippipe.elastic import join, node_identity, plan_for_world
        from skippipe.path_schedule import SINGLE_PROCESS_ONLY, switches_plans
        from skippipe.planning import make_plan, plan_for_run, share_plan
        from skippipe.trainer import train

        cfg = load_config(args.config, args.overrides + flag_overrides(args))
        if args.resume and args.overwrite:
            raise ConfigError("--resume continues the run in the run dir and --overwrite deletes it; pass one of them")
        if cfg.train.single_process:
            plan = plan_for_run(cfg, args.resume)
            check(plan)
            train(cfg, plan, resume=args.resume, overwrite=args.overwrite)
            return
        if switches_plans(cfg.schedule):  # before the rendezvous, so that every rank refuses at once
            raise ConfigError(SINGLE_PROCESS_ONLY)
        launched = env_rank()
        if launched is None:
            raise ConfigError("not launched by torchrun; run torchrun --standalone --nproc-per-node N "
                              "scripts/train.py ..., or pass --single-process")
        rank, local_rank, world_size = launched
        # A plan for another world size fails before joining, unless nodes are named (SKIPPIPE_NODE):
        # then a smaller world re-plans (Note [node loss] in skippipe/elastic.py).
        if cfg.schedule.plan and not args.resume and node_identity() is None:
            check(Plan.load(cfg.schedule.plan), world_size=world_size)
        device = pick_device(cfg.train.device, local_rank)
        init_process_group(device, timeout_s=cfg.train.comm_timeout_s)
        try:
            # Who is which node, and whether this (re)start continues the job from its checkpoint.
            world = join(cfg, explicit_resume=args.resume, rank=rank, world_size=world_size, overwrite=args.overwrite)
            isend = transport(rank, world.rank_nodes)
            if cfg.schedule.topology == "measure" and not cfg.schedule.plan and not world.resume:
                from skippipe.profiling import profile_for_run  # every rank measures; rank 0 solves on the result
                cfg.schedule.topology = str(profile_for_run(cfg, rank=rank, world_size=world_size, isend=isend))
            plan = share_plan(lambda: plan_for_world(cfg, world, resume=world.resume, make_plan=make_plan), rank)
            check(plan, world_size=world_size)
            ctx = build_context(plan, device, cfg.train.comm_timeout_s, isend=isend, slowdown=slowdown_from_env(),
                                compute_floor_s=compute_floor_from_env())
            train(cfg, plan, ctx, resume=world.resume)
        except PeerError as exc:
            # A dead or silent peer: say so and leave at once; tearing down groups with messages
            # in flight could itself hang.
            print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        except (ValueError, OSError, KeyError) as exc:
            # Bad input found after the process group formed (an occupied run dir, a changed setting on
            # resume): the one line (rank 0), then leave at once. A normal exit would tear down gloo
            # while other ranks wait in a collective on this one: std::terminate, SIGABRT on some ranks.
            if rank == 0:
                print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            os._exit(2)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
