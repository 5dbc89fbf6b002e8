"""The plan contract: JSON round trip, the action string form, the per-pair message order."""
import json

import pytest

from handplan import hand_plan
from scheduler.problem import Problem
from scheduler.solve import solve
from topology.errors import ConfigError
from topology.model_spec import load_model_spec
from topology.plan import Action, Plan, dependencies, message_order
from topology.scenarios import scenario

REQUIRED = {"version", "skip_ratio", "num_stages", "constraints", "seed", "nodes", "paths", "order", "predicted"}


@pytest.fixture(scope="module")
def solved() -> Plan:
    problem = Problem(scenario("gcp-12-regions", 8), load_model_spec("llama-tiny"), microbatch_size=2,
                      stage_sizes=[3, 2, 2, 1], num_microbatches=7, memory=2, seed=4)
    return solve(problem, "full")


def small() -> Plan:
    return hand_plan("0 0 1 2 3", ["0@0 2@3 1@2", "0@1 1@2 3@4", "0@0 2@3 3@4"], skip_ratio=0.25)


# ---- JSON round trip -------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["solved", "hand-written"])
def test_to_dict_from_dict_round_trip(which, solved):
    plan = solved if which == "solved" else small()
    data = plan.to_dict()
    assert REQUIRED <= set(data)
    assert all({"id", "name", "region", "stage", "rank"} <= set(n) for n in data["nodes"])
    assert all({"microbatch", "data_node", "nodes", "stages"} <= set(p) for p in data["paths"])
    again = Plan.from_dict(json.loads(json.dumps(data)))
    assert again == plan
    assert again.to_dict() == data


def test_round_trip_through_a_file(tmp_path, solved):
    path = tmp_path / "plan.json"
    solved.save(path)
    assert not (tmp_path / "plan.json.tmp").exists()  # written atomically
    loaded = Plan.load(path)
    assert loaded == solved
    assert loaded.to_json() == path.read_text()
    assert loaded.predicted["iteration_s"] > 0 and loaded.topology["num_nodes"] == 8


def test_json_shape_is_readable_by_other_tools(solved):
    data = json.loads(solved.to_json())
    assert data["version"] == 1 and data["num_stages"] == 4 and data["skip_ratio"] == 0.0
    assert data["constraints"] == {"max_swaps": 2, "memory": 2}
    assert data["paths"][0] == {"microbatch": 0, "data_node": data["paths"][0]["nodes"][0],
                                "nodes": data["paths"][0]["nodes"], "stages": [0, 1, 2, 3]}
    assert set(data["order"]) == {str(i) for i in range(8)}
    assert all(isinstance(a, str) for actions in data["order"].values() for a in actions)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("order"), "missing key.*order"),
    (lambda d: d.update(version=7), "plan version 7 is not supported"),
    (lambda d: d["nodes"][0].pop("rank"), "malformed plan"),
    (lambda d: d["paths"][0].update(nodes="abc"), "malformed plan"),
    (lambda d: d["order"].update({"0": ["F0@0", "Z1"]}), "bad action 'Z1'"),
])
def test_from_dict_refuses_broken_plans(change, message):
    data = small().to_dict()
    change(data)
    with pytest.raises(ConfigError, match=message):
        Plan.from_dict(data)


def test_node_of_rank():
    plan = small()
    assert plan.node_of_rank(3).id == 3
    with pytest.raises(ConfigError, match="no node for rank 5"):
        plan.node_of_rank(5)


# ---- the action string form ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, microbatch, stage", [
    ("F3@2", "F", 3, 2),
    ("B0@0", "B", 0, 0),
    ("L12@0", "L", 12, 0),
    (" F3@2\n", "F", 3, 2),
])
def test_action_parses_and_prints_back(text, kind, microbatch, stage):
    action = Action.parse(text)
    assert action == Action(kind, microbatch, stage)
    assert str(action) == text.strip() and Action.parse(str(action)) == action


@pytest.mark.parametrize("text", ["X3@2", "f3@2", "F3", "F@2", "3@2", "F-1@2", "F3@2@1", "F3 @2", "F3@", "", None, 3])
def test_action_refuses_bad_strings(text):
    with pytest.raises(ConfigError, match="actions look like F3@2"):
        Action.parse(text)


# ---- message order ---------------------------------------------------------------------------------------

def test_message_order_of_a_three_stage_pipeline():
    plan = hand_plan("0 1 2", ["0@0 1@1 2@2", "0@0 1@1 2@2"])
    got = {pair: " ".join(f"{a}>{b}" for a, b in msgs) for pair, msgs in message_order(plan).items()}
    assert got == {
        (0, 1): "F0@0>F0@1 F1@0>F1@1",
        (1, 2): "F0@1>F0@2 F1@1>F1@2",
        (2, 0): "F0@2>L0@0 F1@2>L1@0",  # the last stage's output returns to the data node for the loss
        (0, 2): "L0@0>B0@2 L1@0>B1@2",
        (2, 1): "B0@2>B0@1 B1@2>B1@1",
        (1, 0): "B0@1>B0@0 B1@1>B1@0",
    }


@pytest.mark.parametrize("which", ["solved", "hand-written"])
def test_message_order_follows_each_senders_order(which, solved):
    plan = solved if which == "solved" else small()
    pairs = message_order(plan)
    cross = {(a, n, b, m) for p in plan.paths for a, n, b, m in dependencies(p) if n != m}
    listed = [(a, s, b, r) for (s, r), msgs in pairs.items() for a, b in msgs]
    assert sorted(listed, key=str) == sorted(cross, key=str) and len(listed) == len(set(listed))  # each message once
    for (sender, receiver), msgs in pairs.items():
        assert sender != receiver
        position = {a: i for i, a in enumerate(plan.order[sender])}
        sent = [position[a] for a, _ in msgs]
        assert sent == sorted(sent)  # in the sender's order
        assert all(b in plan.order[receiver] for _, b in msgs)
