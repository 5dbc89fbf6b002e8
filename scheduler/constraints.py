"""The convergence (CC1-CC4) and technical (TC1) constraints, checked on a plan.

`violations(plan)` lists every broken rule with the microbatch, node and stage it concerns;
`check(plan)` raises a one-line ConfigError for the first. The rules are described in
docs/design.md ("Paths and constraints").
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from topology.errors import ConfigError
from topology.plan import Action, Plan, dependencies, path_actions


@dataclass(frozen=True)
class Violation:
    rule: str
    message: str
    microbatch: int | None = None
    node: int | None = None
    stage: int | None = None

    def __str__(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in (("microbatch", self.microbatch), ("node", self.node),
                                                    ("stage", self.stage)) if v is not None)
        return f"{self.rule}: {self.message}" + (f" ({where})" if where else "")


def path_length(num_stages: int, skip_ratio: float) -> int:
    """Stages each path visits, stage 0 included: round(S * (1 - r)), halves rounded up."""
    if not 0 <= skip_ratio < 1:
        raise ConfigError(f"skip ratio must be in [0, 1), got {skip_ratio}; e.g. --skip-ratio 0.25")
    length = math.floor(num_stages * (1 - skip_ratio) + 0.5)
    if length < 2 and num_stages > 1:
        raise ConfigError(f"skip ratio {skip_ratio} keeps only stage 0 of {num_stages} on each path; use a skip ratio "
                          f"below {1 - 1.5 / num_stages:.2f} or more stages")
    return max(length, 1)


def count_swaps(stages: tuple[int, ...] | list[int]) -> int | None:
    """Adjacent swaps that turn the sorted sequence into `stages`, or None if it is not such a sequence.

    CC3 allows going back only by swapping neighbouring stages of the path (0,2,1,3), never further
    (0,3,1,2), so the sequence must be its sorted self with disjoint neighbouring pairs exchanged.
    """
    ordered = sorted(stages)
    swaps, i = 0, 0
    while i < len(stages):
        if stages[i] == ordered[i]:
            i += 1
        elif i + 1 < len(stages) and stages[i] == ordered[i + 1] and stages[i + 1] == ordered[i]:
            swaps += 1
            i += 2
        else:
            return None
    return swaps


def violations(plan: Plan) -> list[Violation]:
    out: list[Violation] = []
    out += _structure(plan)
    if out:
        return out  # the rules below index by node and stage
    out += _paths(plan)
    out += _balance(plan)
    out += _order(plan)
    return out


def check(plan: Plan, world_size: int | None = None, topology=None) -> None:
    """Raise ConfigError naming the first broken rule; also catch a plan made for another world or network."""
    if world_size is not None and world_size != len(plan.nodes):
        raise ConfigError(f"the plan has {len(plan.nodes)} nodes but {world_size} ranks are running; "
                          f"launch {len(plan.nodes)} ranks or re-solve for {world_size}")
    if topology is not None:
        check_topology(plan, topology)
    found = violations(plan)
    if found:
        more = f" (and {len(found) - 1} more; run python -m scheduler validate)" if len(found) > 1 else ""
        raise ConfigError(f"invalid plan: {found[0]}{more}")


def check_topology(plan: Plan, topology) -> None:
    expected = plan.topology.get("fingerprint")
    if topology.num_nodes != len(plan.nodes):
        raise ConfigError(f"the plan was made for {len(plan.nodes)} nodes but the topology {topology.name!r} has "
                          f"{topology.num_nodes}; pass the topology it was solved for or re-solve")
    if expected and expected != topology.fingerprint():
        raise ConfigError(f"the plan was made for another topology ({plan.topology.get('name')!r}, fingerprint "
                          f"{expected}) than {topology.name!r} ({topology.fingerprint()}); re-solve it for this one")


def _structure(plan: Plan) -> list[Violation]:
    out = []
    n, s = len(plan.nodes), plan.num_stages
    if [node.id for node in plan.nodes] != list(range(n)):
        out.append(Violation("structure", f"node ids must be 0..{n - 1} in order"))
    if sorted(node.rank for node in plan.nodes) != list(range(n)):
        out.append(Violation("structure", f"ranks must be a permutation of 0..{n - 1}"))
    for node in plan.nodes:
        if not 0 <= node.stage < s:
            out.append(Violation("structure", f"stage {node.stage} is outside 0..{s - 1}", node=node.id, stage=node.stage))
    # Only the first n + 1 stages are looked at: n nodes cannot serve them all, and num_stages may be absurd
    # (1e9 in a hand-edited plan would hang a loop over every stage).
    served = {node.stage for node in plan.nodes}
    for stage in range(min(s, n + 1)):
        if stage not in served:
            out.append(Violation("structure", "no node serves this stage", stage=stage))
    if s > n + 1:
        out.append(Violation("structure", f"num_stages is {s} but the plan has only {n} nodes; every stage needs one"))
    if not plan.paths:
        out.append(Violation("structure", "the plan has no microbatches; pass --microbatches N with N >= 1"))
    if plan.microbatch_size < 1:
        out.append(Violation("structure", f"microbatch_size is {plan.microbatch_size}; a microbatch needs at least "
                                          f"one sequence (--microbatch-size)"))
    if sorted(p.microbatch for p in plan.paths) != list(range(len(plan.paths))):
        out.append(Violation("structure", f"microbatch ids must be 0..{len(plan.paths) - 1}, each once"))
    for path in plan.paths:
        if len(path.nodes) != len(path.stages) or any(not 0 <= x < n for x in path.nodes) or not 0 <= path.data_node < n:
            out.append(Violation("structure", "path nodes and stages must pair up and name known nodes",
                                 microbatch=path.microbatch))
        elif any(plan.nodes[x].stage != st for x, st in zip(path.nodes, path.stages)):
            bad = next((x, st) for x, st in zip(path.nodes, path.stages) if plan.nodes[x].stage != st)
            out.append(Violation("structure", f"node {bad[0]} serves stage {plan.nodes[bad[0]].stage}, not {bad[1]}",
                                 microbatch=path.microbatch, node=bad[0], stage=bad[1]))
    for node in sorted(set(plan.order) - set(range(n))):
        out.append(Violation("structure", f"the order names node {node}, which the plan does not have", node=node))
    return out


def full_depth_ids(plan: Plan) -> set[int]:
    """The microbatches the plan declares full depth (constraints["full_depth"], scheduler.depth); a
    malformed entry is a ConfigError naming the fix."""
    ids = plan.constraints.get("full_depth", [])
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ConfigError(f"the plan's constraints.full_depth must be a list of microbatch ids, got {ids!r}")
    return set(ids)


def kept_stages(plan: Plan) -> list[int] | None:
    """The one stage set every path not at full depth visits, in order, if the plan declares one
    (constraints["kept_stages"]: an even shallow iteration, scheduler.depth.even_depth), else None; a
    malformed entry is a ConfigError naming the fix."""
    kept = plan.constraints.get("kept_stages")
    if kept is None:
        return None
    if (not isinstance(kept, list) or not kept or kept[0] != 0 or any(isinstance(s, bool) or not isinstance(s, int) for s in kept)
            or kept != sorted(set(kept)) or kept[-1] >= plan.num_stages):
        raise ConfigError(f"the plan's constraints.kept_stages must be ascending stage ids from 0 below "
                          f"{plan.num_stages}, got {kept!r}")
    return kept


def _paths(plan: Plan) -> list[Violation]:
    out = []
    length = path_length(plan.num_stages, plan.skip_ratio)
    max_swaps = int(plan.constraints.get("max_swaps", 2))
    full_depth = full_depth_ids(plan)
    kept = kept_stages(plan)
    spread = plan.constraints.get("depth_spread", False) is True  # depths spread around the length (scheduler.depth)
    half = plan.constraints.get("spread_even") if spread else None  # a spread's even half-depth set, if any
    for p in plan.paths:
        if not p.stages or p.stages[0] != 0 or p.nodes[0] != p.data_node:
            out.append(Violation("CC1", "a path must start at stage 0 on its data node", microbatch=p.microbatch,
                                 node=p.nodes[0] if p.nodes else None, stage=p.stages[0] if p.stages else None))
        dup = [st for st, c in Counter(p.stages).items() if c > 1]
        if dup:
            out.append(Violation("CC2", "the path visits a stage twice", microbatch=p.microbatch, stage=dup[0]))
        if p.microbatch in full_depth:
            if tuple(p.stages) != tuple(range(plan.num_stages)):
                out.append(Violation("CC2", f"a full-depth path must visit every stage in order, not {list(p.stages)}",
                                     microbatch=p.microbatch))
        elif abs(len(p.stages) - length) > (1 if spread else 0) and list(p.stages) != half:
            need = f"{length - 1} to {length + 1} (depths spread)" if spread else str(length)
            need += f", or exactly stages {half}" if half else ""
            out.append(Violation("CC2", f"the path visits {len(p.stages)} stages; skip ratio {plan.skip_ratio} "
                                        f"with {plan.num_stages} stages needs {need}", microbatch=p.microbatch))
        elif kept is not None and list(p.stages) != kept:
            out.append(Violation("CC2", f"the plan keeps stages {kept} on every path, not {list(p.stages)}",
                                 microbatch=p.microbatch))
        if not dup:
            swaps = count_swaps(p.stages)
            if swaps is None:
                bad = next(i for i in range(1, len(p.stages)) if p.stages[i] < p.stages[i - 1])
                out.append(Violation("CC3", f"stages {list(p.stages)} go back further than one neighbouring swap",
                                     microbatch=p.microbatch, node=p.nodes[bad], stage=p.stages[bad]))
            elif swaps > max_swaps:
                out.append(Violation("CC3", f"{swaps} swaps in {list(p.stages)}; at most {max_swaps} allowed",
                                     microbatch=p.microbatch))
    if spread:
        depths = [len(p.stages) for p in plan.paths if p.microbatch not in full_depth]
        if sum(depths) != length * len(depths):
            out.append(Violation("CC2", f"spread depths must average the skip ratio's {length} stages, not "
                                        f"{sum(depths) / len(depths):.3f}"))
    return out


def _balance(plan: Plan) -> list[Violation]:
    out = []
    visits = Counter(st for p in plan.paths for st in p.stages[1:])
    balanced = kept_stages(plan) or range(plan.num_stages)  # a declared stage set: only its stages are visited
    counts = {st: visits.get(st, 0) for st in balanced if st != 0}
    if counts and max(counts.values()) - min(counts.values()) > 1:
        low = min(counts, key=counts.get)
        out.append(Violation("CC4", f"stage visits are unbalanced ({counts[low]} here, up to {max(counts.values())} "
                                    f"elsewhere); every stage but 0 must be visited equally often", stage=low))
    per_node = Counter(n for p in plan.paths for n in p.nodes)
    for stage in range(plan.num_stages):
        loads = {n: per_node.get(n, 0) for n in plan.stage_nodes(stage)}
        if loads and max(loads.values()) - min(loads.values()) > 1:
            low = min(loads, key=loads.get)
            out.append(Violation("TC1", f"load is not spread evenly over the replicas of the stage ({loads[low]} "
                                        f"microbatches here, up to {max(loads.values())} on another)", node=low, stage=stage))
    return out


def _order(plan: Plan) -> list[Violation]:
    out = []
    expected: dict[int, Counter] = {node.id: Counter() for node in plan.nodes}
    for p in plan.paths:
        for node, actions in path_actions(p).items():
            expected[node].update(actions)
    memory = int(plan.constraints.get("memory", 0)) or None
    for node in plan.nodes:
        actions = plan.order.get(node.id, [])
        if Counter(actions) != expected[node.id]:
            extra = list((Counter(actions) - expected[node.id]).elements())
            lacking = list((expected[node.id] - Counter(actions)).elements())
            what = f"has {extra[0]} which no path routes here" if extra else f"lacks {lacking[0]}"
            mb = (extra or lacking)[0]
            out.append(Violation("order", f"the node's order {what}", microbatch=mb.microbatch, node=node.id, stage=mb.stage))
            continue
        held: set[int] = set()
        seen: set[Action] = set()
        for action in actions:
            if action.kind == "F":
                held.add(action.microbatch)
                if memory is not None and len(held) > memory:
                    out.append(Violation("TC1", f"{len(held)} microbatches' activations held at once; memory allows {memory}",
                                         microbatch=action.microbatch, node=node.id, stage=action.stage))
                    break
            else:
                # Same-node prerequisite: the loss after the forward; stage 0's backward after the loss.
                first = "L" if action.kind == "B" and action.stage == 0 else "F"
                before = Action(first, action.microbatch, action.stage)
                if before not in seen:
                    out.append(Violation("order", f"{action} comes before {before}", microbatch=action.microbatch,
                                         node=node.id, stage=action.stage))
                    break
                if action.kind == "B":
                    held.discard(action.microbatch)
            seen.add(action)
    if not out:
        stuck = deadlock(plan)
        if stuck:
            first = stuck[0]
            node = next(n for n, actions in sorted(plan.order.items()) if first in actions)
            out.append(Violation("deadlock", f"executing every node's order in sequence stalls with {', '.join(map(str, stuck[:4]))} "
                                             f"waiting", microbatch=first.microbatch, node=node, stage=first.stage))
    return out


def deadlock(plan: Plan) -> list[Action]:
    """Dry-run the protocol: each node runs its order strictly in sequence; return the stalled actions."""
    needs: dict[Action, Action] = {}
    for p in plan.paths:
        for a, _, b, _ in dependencies(p):
            needs[b] = a
    done: set[Action] = set()
    cursor = {node: 0 for node in plan.order}
    progress = True
    while progress:
        progress = False
        for node, actions in plan.order.items():
            i = cursor[node]
            while i < len(actions) and (actions[i] not in needs or needs[actions[i]] in done):
                done.add(actions[i])
                i += 1
                progress = True
            cursor[node] = i
    return [actions[cursor[node]] for node, actions in sorted(plan.order.items()) if cursor[node] < len(actions)]
