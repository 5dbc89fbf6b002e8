"""One line from torchrun's agent, before the rendezvous: whom a multi-machine skippipe job waits for.

torchrun starts the training script only once every node has joined the rendezvous, so
``torchrun --nnodes 8 scripts/train.py ...`` on a machine whose peers are not up yet would print nothing
at all, for as long as they are missing, and no code of the script can run to say so. The one place
an installed package runs inside the agent before the rendezvous is torchrun's rendezvous-plugin entry
point (group ``torchrun.handlers``, see ``torch.distributed.elastic.rendezvous.registry``): torchrun
loads every such entry point when it imports its rendezvous module. :func:`torchrun_hook` is that entry
point (pyproject.toml). In any agent that launches skippipe's training with more than one node it
prints, on stderr::

    skippipe: waiting for 8 nodes to join the rendezvous at 127.0.0.1:29500 (backend static, node rank 0); ...

and, for the default static rendezvous on localhost (the mission's bare ``--nnodes 8``), that every
machine would wait on its own localhost and which flags fix that. Other torchrun jobs see nothing.
The registered backend name (``skippipe-notice``) is not a rendezvous backend; choosing it is an error.
A checkout used without installing has no entry point and so no notice (README, Multi-machine launch).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def _is_torchrun_agent() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return Path(sys.argv[0]).name == "torchrun" or getattr(spec, "name", None) == "torch.distributed.run"


def _is_skippipe_training(script: str, module: bool, script_args: list[str]) -> bool:
    """True for scripts/train.py of a skippipe checkout, skippipe-train, or -m skippipe[.commands.train] train."""
    if module:
        return script == "skippipe.commands.train" or (script == "skippipe" and script_args[:1] == ["train"])
    path = Path(script)
    if path.name == "skippipe-train":
        return True
    if path.name == "skippipe" and script_args[:1] == ["train"]:
        return True
    return path.name == "train.py" and (path.resolve().parent.parent / "skippipe" / "commands" / "train.py").is_file()


def notice(argv: list[str], torchrun=None) -> list[str]:
    """The lines to print for a torchrun command line `argv` (without the program name); [] for none.

    Parses `argv` with torchrun's own parser (`torchrun`: its module, default torch.distributed.run);
    anything it rejects gives no notice (torchrun says why).
    """
    if torchrun is None:
        import torch.distributed.run as torchrun
    parse_args, parse_min_max_nnodes = torchrun.parse_args, torchrun.parse_min_max_nnodes
    try:
        args = parse_args(list(argv))
        _, max_nodes = parse_min_max_nnodes(args.nnodes)
    except (SystemExit, Exception):  # torchrun reports its own usage errors; the notice stays out of the way
        return []
    if args.standalone or max_nodes <= 1 or not _is_skippipe_training(args.training_script, args.module,
                                                                        list(args.training_script_args)):
        return []
    backend = args.rdzv_backend
    endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port or 29500}"  # torchrun's default port
    identity = f"node rank {args.node_rank}" if backend == "static" else f"job id {args.rdzv_id!r}"
    lines = [f"skippipe: waiting for {args.nnodes} nodes to join the rendezvous at {endpoint} (backend {backend}, "
             f"{identity}); training starts when all have joined: run the same command on every machine"]
    host = endpoint.rsplit(":", 1)[0]
    if backend == "static" and not args.rdzv_endpoint and host in ("127.0.0.1", "localhost"):
        lines.append("skippipe: with no --rdzv-endpoint every machine waits on its own localhost; pass "
                     "--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB (the same on every machine; "
                     "README: Multi-machine launch)")
    return lines


def _not_a_backend(params):
    raise ValueError("skippipe-notice is not a rendezvous backend; use --rdzv-backend c10d")


def _announce() -> None:
    # torchrun imports its rendezvous module, and so calls the hook, while its own module is still being
    # imported: wait (briefly) until its parser exists, then print. The agent is by then in the rendezvous.
    for _ in range(200):
        module = sys.modules.get("torch.distributed.run") or sys.modules.get("__main__")
        if hasattr(module, "parse_min_max_nnodes") and hasattr(module, "parse_args"):
            for line in notice(sys.argv[1:], module):
                print(line, file=sys.stderr, flush=True)
            return
        time.sleep(0.05)


def torchrun_hook():
    """torchrun's plugin entry point: print :func:`notice` in a skippipe agent; return the (refusing) backend."""
    if _is_torchrun_agent():
        threading.Thread(target=_announce, name="skippipe-launch-notice", daemon=True).start()
    return _not_a_backend
