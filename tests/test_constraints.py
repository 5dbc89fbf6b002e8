"""The validator, one rule at a time: each test starts from a valid small plan, breaks exactly one thing, and
checks that the rule is named with the microbatch, node and stage where it broke."""
import pytest

from handplan import hand_plan
from scheduler.constraints import check, check_topology, count_swaps, path_length, violations
from scheduler.problem import Problem
from scheduler.solve import solve
from topology.errors import ConfigError
from topology.model_spec import load_model_spec
from topology.scenarios import scenario

# Skip ratio 0.25 over 4 stages: every path visits stage 0 and two of stages 1-3. Nodes 0 and 1 are the data
# nodes (stage 0); nodes 2, 3, 4 serve stages 1, 2, 3. Visits: stage 1 five times, stage 2 five, stage 3 four;
# data nodes 4 and 3 microbatches.
SKIP = "0 0 1 2 3"
SKIP_PATHS = ["0@0 1@2 2@3", "0@1 2@3 3@4", "0@0 1@2 3@4", "0@1 1@2 2@3", "0@0 2@3 3@4", "0@1 1@2 3@4",
              "0@0 1@2 2@3"]

# A full pipeline over three nodes, one per stage.
FULL = "0 1 2"
FULL_PATHS = ["0@0 1@1 2@2", "0@0 1@1 2@2"]

# Memory 2 on three nodes: node 0 keeps two microbatches in flight, the others one.
MEM_ORDER = {0: "F0@0 F1@0 L0@0 B0@0 F2@0 L1@0 B1@0 L2@0 B2@0",
             1: "F0@1 B0@1 F1@1 B1@1 F2@1 B2@1",
             2: "F0@2 B0@2 F1@2 B1@2 F2@2 B2@2"}


def skip_plan(**paths: str):
    """The skip plan with some microbatches' paths replaced: skip_plan(mb2="0@0 1@2 2@3")."""
    texts = list(SKIP_PATHS)
    for key, text in paths.items():
        texts[int(key[2:])] = text
    return hand_plan(SKIP, texts, skip_ratio=0.25)


def full_order(**nodes: str):
    order = {0: "F0@0 L0@0 B0@0 F1@0 L1@0 B1@0", 1: "F0@1 B0@1 F1@1 B1@1", 2: "F0@2 B0@2 F1@2 B1@2"}
    order.update({int(k[1:]): v for k, v in nodes.items()})
    return hand_plan(FULL, FULL_PATHS, order=order)


def named(plan) -> list[tuple]:
    return [(v.rule, v.microbatch, v.node, v.stage) for v in violations(plan)]


@pytest.mark.parametrize("plan", [
    pytest.param(lambda: skip_plan(), id="skip"),
    pytest.param(lambda: skip_plan(mb0="0@0 2@3 1@2"), id="skip-with-a-swap"),
    pytest.param(lambda: hand_plan(FULL, FULL_PATHS), id="full"),
    pytest.param(lambda: full_order(), id="full-explicit-order"),
    pytest.param(lambda: hand_plan(FULL, FULL_PATHS + ["0@0 1@1 2@2"], memory=2, order=MEM_ORDER), id="memory-2"),
    pytest.param(lambda: hand_plan("0 1 2 3", ["0@0 2@2 1@1 3@3", "0@0 1@1 3@3 2@2"]), id="CC3-0213-0132"),
    pytest.param(lambda: hand_plan("0 1 2 3 4", ["0@0 2@2 1@1 4@4 3@3"]), id="CC3-two-swaps"),
])
def test_valid_plans_pass(plan):
    plan = plan()
    assert violations(plan) == []
    check(plan)


# ---- the convergence rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, first", [
    ("1@2 0@0 2@3", ("CC1", 6, 2, 1)),      # stage 0 not first (stage 1 on node 2 is)
    ("n1: 0@0 1@2 2@3", ("CC1", 6, 0, 0)),  # the path starts on node 0 but names node 1 its data node
])
def test_cc1_stage_0_first_on_the_data_node(path, first):
    found = named(skip_plan(mb6=path))
    assert found[0] == first
    # a different data node also leaves its loss without the forward it needs on that node
    assert {v[0] for v in found} <= {"CC1", "order"}


def test_cc2_each_stage_at_most_once():
    found = named(skip_plan(mb2="0@0 3@4 3@4"))
    assert found[0] == ("CC2", 2, None, 3)
    assert {v[0] for v in found} <= {"CC2", "deadlock"}  # its second visit waits for itself


@pytest.mark.parametrize("mb, path", [
    ("mb0", "0@0 1@2 2@3 3@4"),  # four stages where the skip ratio allows three
    ("mb6", "0@0 1@2"),          # two
])
def test_cc2_all_paths_have_the_same_length(mb, path):
    found = named(skip_plan(**{mb: path}))
    assert found == [("CC2", int(mb[2:]), None, None)]
    assert "needs 3" in str(violations(skip_plan(**{mb: path}))[0])


@pytest.mark.parametrize("stages, swaps", [
    ((0, 1, 2, 3), 0), ((0, 2, 1, 3), 1), ((0, 1, 3, 2), 1), ((0, 2, 1, 4, 3), 2), ((0, 3, 1), 1),
    ((0, 3, 1, 2), None), ((0, 2, 3, 1), None), ((0, 3, 2, 1), None), ((0, 2, 1, 4, 3, 6, 5), 3),
])
def test_count_swaps(stages, swaps):
    assert count_swaps(stages) == swaps


def test_cc3_going_back_further_than_a_neighbouring_swap():
    plan = hand_plan("0 1 2 3", ["0@0 1@1 2@2 3@3", "0@0 3@3 1@1 2@2"])
    assert named(plan) == [("CC3", 1, 1, 1)]  # stage 1 on node 1 comes after stage 3


@pytest.mark.parametrize("stages, paths, max_swaps", [
    ("0 1 2 3", ["0@0 2@2 1@1 3@3"], 0),
    ("0 1 2 3 4 5 6", ["0@0 2@2 1@1 4@4 3@3 6@6 5@5"], 2),
])
def test_cc3_too_many_swaps(stages, paths, max_swaps):
    plan = hand_plan(stages, paths, max_swaps=max_swaps)
    assert named(plan) == [("CC3", 0, None, None)]
    assert f"at most {max_swaps} allowed" in str(violations(plan)[0])


def test_cc4_balanced_stage_visits():
    plan = skip_plan(mb2="0@0 1@2 2@3")  # stage 3 loses a visit to stage 2: 5, 6, 3
    assert named(plan) == [("CC4", None, None, 3)]
    assert "3 here, up to 6" in str(violations(plan)[0])


# ---- the technical rule ----------------------------------------------------------------------------------

def test_tc1_memory():
    order = {**MEM_ORDER, 0: "F0@0 F1@0 L0@0 F2@0 B0@0 L1@0 B1@0 L2@0 B2@0"}  # F2 before B0 frees room
    plan = hand_plan(FULL, FULL_PATHS + ["0@0 1@1 2@2"], memory=2, order=order)
    assert named(plan) == [("TC1", 2, 0, 0)]
    assert "3 microbatches' activations held at once; memory allows 2" in str(violations(plan)[0])


def test_tc1_uneven_replica_load():
    plan = skip_plan(mb5="0@0 1@2 3@4")  # data node 0 takes five microbatches, node 1 two
    assert named(plan) == [("TC1", None, 1, 0)]


# ---- order and deadlock ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change, first, text", [
    ({"n1": "F0@1 B0@1 F1@1"}, ("order", 1, 1, 1), "lacks B1@1"),
    ({"n1": "F0@1 B0@1 F1@1 B1@1 F5@1"}, ("order", 5, 1, 1), "has F5@1 which no path routes here"),
    ({"n1": "B0@1 F0@1 F1@1 B1@1"}, ("order", 0, 1, 1), "B0@1 comes before F0@1"),
    ({"n0": "L0@0 F0@0 B0@0 F1@0 L1@0 B1@0"}, ("order", 0, 0, 0), "L0@0 comes before F0@0"),
    ({"n0": "F0@0 B0@0 L0@0 F1@0 L1@0 B1@0"}, ("order", 0, 0, 0), "B0@0 comes before L0@0"),
])
def test_order_errors(change, first, text):
    plan = full_order(**change)
    assert named(plan) == [first]
    assert text in str(violations(plan)[0])


def test_deadlock():
    # node 1 serves microbatch 1 first, node 2 microbatch 0 first: each waits for the other
    plan = full_order(n0="F0@0 F1@0 L0@0 B0@0 L1@0 B1@0", n1="F1@1 B1@1 F0@1 B0@1")
    assert named(plan) == [("deadlock", 0, 0, 0)]  # the first stalled action: L0@0 on node 0
    assert "L0@0, B1@1, F0@2" in str(violations(plan)[0])


# ---- structure, and check() ------------------------------------------------------------------------------

@pytest.mark.parametrize("stages, paths, first", [
    (FULL, ["0@0 2@1 1@2"], ("structure", 0, 1, 2)),  # node 1 serves stage 1, not 2
    (FULL, ["0@0 1@1 2@7"], ("structure", 0, None, None)),  # no node 7
    (FULL, [], ("structure", None, None, None)),  # no microbatches
    ("0 2", ["0@0 2@1"], ("structure", None, None, 1)),  # no node serves stage 1
])
def test_structure(stages, paths, first):
    assert named(hand_plan(stages, paths))[0] == first


def test_structure_order_for_a_node_the_plan_lacks():
    plan = full_order()
    plan.order[7] = []
    assert named(plan) == [("structure", None, 7, None)]


def test_check_raises_one_line_naming_the_first_rule():
    with pytest.raises(ConfigError, match=r"^invalid plan: CC3: .*\(microbatch 1, node 1, stage 1\)$"):
        check(hand_plan("0 1 2 3", ["0@0 1@1 2@2 3@3", "0@0 3@3 1@1 2@2"]))
    with pytest.raises(ConfigError, match=r"^invalid plan: CC1: .* \(and 2 more; run python -m scheduler validate\)$"):
        check(skip_plan(mb6="n1: 0@0 1@2 2@3"))


def test_check_catches_another_world_or_topology():
    problem = Problem(scenario("gcp-12-regions", 6), load_model_spec("llama-tiny"), stage_sizes=[2, 2, 2])
    plan = solve(problem, "full")
    check(plan, world_size=6, topology=scenario("gcp-12-regions", 6))
    with pytest.raises(ConfigError, match="6 nodes but 4 ranks are running"):
        check(plan, world_size=4)
    with pytest.raises(ConfigError, match="made for 6 nodes but the topology 'gcp-12-regions' has 7"):
        check_topology(plan, scenario("gcp-12-regions", 7))
    with pytest.raises(ConfigError, match="made for another topology"):
        check_topology(plan, scenario("aws-worldwide", 6))


@pytest.mark.parametrize("num_stages, skip_ratio, length", [
    (6, 0.0, 6), (6, 0.25, 5), (6, 0.5, 3), (4, 0.25, 3), (8, 0.5, 4), (1, 0.0, 1),
])
def test_path_length(num_stages, skip_ratio, length):
    assert path_length(num_stages, skip_ratio) == length


@pytest.mark.parametrize("num_stages, skip_ratio, message", [
    (6, 1.0, r"skip ratio must be in \[0, 1\)"), (6, -0.1, "skip ratio must be in"), (4, 0.7, "keeps only stage 0 of"),
])
def test_path_length_refuses_impossible_skip_ratios(num_stages, skip_ratio, message):
    with pytest.raises(ConfigError, match=message):
        path_length(num_stages, skip_ratio)
