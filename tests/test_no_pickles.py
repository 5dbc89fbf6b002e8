"""Nothing unpickles a checkpoint or data received from a peer (Note [no pickles from peers] in comm.py).

Statically: every torch.load passes weights_only=True, and no code calls torch.distributed's *_object
collectives (they unpickle what the other ranks send) or pickle itself. Dynamically, on gloo: the JSON
collectives that replace them carry structured values both ways, and share_plan sends rank 0's plan, or
its error, to every rank.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.spawn import spawn_ranks

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("skippipe", "scripts", "experiments", "scheduler", "topology") for p in (ROOT / folder).rglob("*.py"))
UNPICKLING_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                          "recv_object_list", "send_object_list")


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every call of `name` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_code_path_unpickles(path):
    text = path.read_text()
    for args in _calls(text, "torch.load"):
        assert re.search(r"weights_only\s*=\s*True", args), f"torch.load({args}) without weights_only=True"
    for name in UNPICKLING_COLLECTIVES:
        assert not re.search(rf"\b{name}\(", text), f"{name} unpickles what a peer sends; use comm.*_json"
    assert not re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False", text)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from skippipe.comm import all_gather_json, broadcast_json
    from skippipe.planning import share_plan
    from tests.handplan import hand_plan
    from topology.errors import ConfigError
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = {}
    # Different lengths per rank, unicode, nesting; a string that is a pickle stays a string.
    mine = {"rank": rank, "name": "nœud-" * (rank + 1), "pairs": [[rank, 0.5]], "pickle": "cos\nsystem\n(S'x'\ntR."}
    results["gathered"] = all_gather_json(mine)
    results["broadcast"] = broadcast_json({"from": rank, "inf": float("inf")} if rank == 0 else None, src=0)
    plan = hand_plan("0 1", ["0@0 1@1", "0@0 1@1"])
    results["plan"] = share_plan(lambda: plan, rank).to_dict() == plan.to_dict()

    def bad():
        raise ConfigError("rank 0 could not make the plan")
    try:
        share_plan(bad, rank)
        results["error"] = None
    except ConfigError as exc:
        results["error"] = str(exc)
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_json_collectives_on_gloo(tmp_path):
    import json
    world = 2
    assert spawn_ranks(_rank, lambda r: (r, world, f"file://{tmp_path / 'init'}", str(tmp_path)), world) == [0, 0]
    for rank in range(world):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["gathered"] == [{"rank": r, "name": "nœud-" * (r + 1), "pairs": [[r, 0.5]],
                                    "pickle": "cos\nsystem\n(S'x'\ntR."} for r in range(world)]
        assert got["broadcast"] == {"from": 0, "inf": float("inf")}
        assert got["plan"] is True
        assert got["error"] == "rank 0 could not make the plan"
