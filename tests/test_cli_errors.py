"""The command lines: every bad input gets one `error:` line, exit status 2 and no traceback; and the issue's
must-show commands work end to end."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scheduler.cli import main as scheduler_main
from scheduler.problem import Problem
from scheduler.solve import solve
from topology.cli import main as topology_main
from topology.model_spec import load_model_spec
from topology.scenarios import scenario

ROOT = Path(__file__).resolve().parent.parent
SOLVE = ["scheduler", "solve", "--strategy", "full", "--topology", "gcp-12-regions", "--nodes", "20"]

FILES = {
    "malformed.yaml": "nodes: [a, b\n",
    "malformed.json": '{"version": 1,\n',
    "nowhere.yaml": "scenario: gcp-13-regions\nnum_nodes: 4\n",
    "missing-link.yaml": """
        nodes: [{name: a, flops: 1.0e13}, {name: b, flops: 1.0e13}, {name: c, flops: 1.0e13}]
        links:
          - {a: a, b: b, latency_ms: 1, bandwidth_gbit_s: 1}
          - {a: b, b: c, latency_ms: 1, bandwidth_gbit_s: 1}
    """,
    "zero-bandwidth.yaml": """
        nodes: [{name: a, flops: 1.0e13}, {name: b, flops: 1.0e13}]
        links: [{a: a, b: b, latency_ms: 1, bandwidth_gbit_s: 0}]
    """,
    "negative-latency.yaml": """
        nodes: [{name: a, flops: 1.0e13}, {name: b, flops: 1.0e13}]
        links: [{a: a, b: b, latency_ms: -5, bandwidth_gbit_s: 1}]
    """,
    "half-scenario.yaml": "scenario: gcp-12-regions\nnum_nodes: 2.5\n",
    "bad-model.yaml": "name: m\ndim: 64\nnum_layers: 2\nnum_heads: 4\nffn_dim: 128\ncontext: 64\n",
}


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The bad inputs, a plan solved for gcp-12-regions with 20 nodes, and two plans that break a rule."""
    d = tmp_path_factory.mktemp("inputs")
    for name, text in FILES.items():
        (d / name).write_text(textwrap.dedent(text))
    problem = Problem(scenario("gcp-12-regions", 20), load_model_spec("llama-500m"), microbatch_size=8,
                      stage_sizes=[5, 3, 3, 3, 3, 3], num_microbatches=30, memory=3)
    plan = solve(problem, "full").to_dict()
    (d / "plan.json").write_text(json.dumps(plan))
    tight = json.loads(json.dumps(plan))
    tight["constraints"]["memory"] = 1  # the order keeps up to 3 microbatches on a node
    (d / "tc1.json").write_text(json.dumps(tight))
    jumpy = json.loads(json.dumps(plan))
    path = jumpy["paths"][1]
    perm = [0, 3, 1, 2, 4, 5]  # 0,3,1,2 goes back further than a neighbouring swap
    path["nodes"], path["stages"] = [path["nodes"][i] for i in perm], [path["stages"][i] for i in perm]
    (d / "cc3.json").write_text(json.dumps(jumpy))
    return d


# The issue's list of bad inputs, each run as a real command line.
ISSUE_CASES = [
    # (id, command with {d} for the inputs folder, what the one line must say)
    ("malformed-yaml", "topology show --topology {d}/malformed.yaml", r"malformed YAML at line \d+"),
    ("malformed-json", "scheduler validate {d}/malformed.json", r"malformed JSON at line \d+, column \d+"),
    ("unknown-scenario", "topology show --topology gcp-13-regions --nodes 4", "unknown topology 'gcp-13-regions'"),
    ("missing-link", "topology show --topology {d}/missing-link.yaml", "the link a-c is missing; add it"),
    ("zero-bandwidth", "topology show --topology {d}/zero-bandwidth.yaml", "bandwidth_gbit_s is 0.0; it must be positive"),
    ("nodes-zero", "topology show --topology gcp-12-regions --nodes 0", "--nodes must be a positive integer, got '0'"),
    ("nodes-fraction", "scheduler solve --topology gcp-12-regions --nodes 2.5 --stages 2",
     "--nodes must be a positive integer, got '2.5'"),
    ("stage-sizes-sum", " ".join(SOLVE) + " --stage-sizes 5,3,3 --out {d}/x.json",
     "stage sizes sum to 11 but the topology has 20 nodes; pass --stage-sizes that sum to 20 or --nodes 11"),
    ("stage-sizes-zero", " ".join(SOLVE) + " --stage-sizes 20,0 --out {d}/x.json", "every stage needs a node"),
    ("zero-microbatches", " ".join(SOLVE) + " --stages 6 --microbatches 0 --out {d}/x.json",
     "--microbatches must be a positive integer, got '0'"),
    ("model-missing", " ".join(SOLVE) + " --stages 6 --model {d}/absent.yaml --out {d}/x.json", "model file not found"),
    ("plan-breaks-cc3", "scheduler validate {d}/cc3.json", "breaks .* rule\\(s\\): first CC3"),
    ("simulate-other-network", "topology simulate --topology aws-worldwide --nodes 20 --plan {d}/plan.json",
     "made for another topology"),
]

# More of the same, run in-process through the same main() (a subprocess costs ~0.3 s of imports each).
MORE_CASES = [
    ("malformed-json-simulate", "topology simulate --topology gcp-12-regions --nodes 20 --plan {d}/malformed.json",
     "malformed JSON"),
    ("unknown-scenario-yaml", "topology show --topology {d}/nowhere.yaml", "unknown scenario 'gcp-13-regions'"),
    ("validate-nodes-alone", "scheduler validate {d}/plan.json --nodes 12", "--nodes applies to a --topology scenario"),
    ("topology-file-missing", "topology show --topology {d}/absent.yaml", "file not found"),
    ("negative-latency", "topology show --topology {d}/negative-latency.yaml", "latency_ms is -5.0"),
    ("nodes-negative", "topology show --topology gcp-12-regions --nodes -3", "--nodes must be a positive integer"),
    ("nodes-fraction-show", "topology show --topology gcp-12-regions --nodes 2.5", "--nodes must be a positive integer"),
    ("nodes-word", "scheduler solve --topology gcp-12-regions --nodes many --stages 2", "--nodes must be a positive integer"),
    ("nodes-zero-solve", "scheduler solve --topology gcp-12-regions --nodes 0 --stages 2", "--nodes must be a positive"),
    ("nodes-yaml-fraction", "topology show --topology {d}/half-scenario.yaml", "node count must be a positive integer"),
    ("nodes-missing", "topology show --topology gcp-12-regions", "needs a node count; pass --nodes N"),
    ("stage-sizes-word", " ".join(SOLVE) + " --stage-sizes 5,x --out {d}/x.json", "comma-separated integers"),
    ("stages-vs-sizes", " ".join(SOLVE) + " --stages 3 --stage-sizes 10,10 --out {d}/x.json", "--stages 3 disagrees"),
    ("too-many-stages", " ".join(SOLVE) + " --stages 21 --out {d}/x.json", "21 stages need at least 21 nodes"),
    ("memory-zero", " ".join(SOLVE) + " --stages 6 --memory 0 --out {d}/x.json", "--memory must be a positive integer"),
    ("skip-ratio", " ".join(SOLVE) + " --stages 6 --skip-ratio 1 --out {d}/x.json", "skip ratio must be in"),
    ("full-with-skips", " ".join(SOLVE) + " --stages 6 --skip-ratio 0.5 --out {d}/x.json",
     "full strategy sends every microbatch through all 6 stages, but skip ratio 0.5 asks for 3"),
    ("model-missing-name", " ".join(SOLVE) + " --stages 6 --model llama-9b --out {d}/x.json", "model file not found"),
    ("model-incomplete", " ".join(SOLVE) + " --stages 2 --model {d}/bad-model.yaml --out {d}/x.json",
     "missing required key.*vocab_size"),
    ("unknown-strategy", "scheduler solve --strategy best --topology gcp-12-regions --nodes 4 --stages 2",
     "invalid choice: 'best'"),
    ("unknown-flag", "topology show --topology gcp-12-regions --nodes 4 --colour red", "unrecognized arguments"),
    ("plan-missing", "scheduler validate {d}/absent.json", "file not found"),
    ("plan-breaks-tc1", "scheduler validate {d}/tc1.json", "breaks .* rule\\(s\\): first TC1"),
    ("plan-other-network", "scheduler validate {d}/plan.json --topology aws-worldwide --nodes 20",
     "made for another topology"),
    ("simulate-other-count", "topology simulate --topology gcp-12-regions --nodes 12 --plan {d}/plan.json",
     "made for another topology .* 20 nodes"),
    ("simulate-microbatch-size", "topology simulate --topology gcp-12-regions --nodes 20 --plan {d}/plan.json "
     "--microbatch-size 0", "microbatch size must be a positive integer"),
    ("simulate-model-missing", "topology simulate --topology gcp-12-regions --nodes 20 --plan {d}/plan.json "
     "--model llama-9b", "model file not found"),
]


def check_one_error_line(returncode: int, stdout: str, stderr: str, command: str, message: str) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr + stdout
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert re.search(message, errors[0]), errors[0]
    if command.startswith("scheduler validate") and "breaks" in message:
        # validate first lists each broken rule with its grid, then ends with the one error line
        assert stderr.splitlines()[-1] == errors[0]
        assert "(microbatch" in stderr
    else:
        assert stderr.splitlines() == errors


@pytest.mark.parametrize("command, message", [c[1:] for c in ISSUE_CASES], ids=[c[0] for c in ISSUE_CASES])
def test_bad_input_gets_one_error_line_and_status_2(files, command, message):
    result = cli(*command.format(d=files).split())
    check_one_error_line(result.returncode, result.stdout, result.stderr, command, message)


@pytest.mark.parametrize("command, message", [c[1:] for c in MORE_CASES], ids=[c[0] for c in MORE_CASES])
def test_more_bad_input_in_process(files, command, message, capsys):
    package, *argv = command.format(d=files).split()
    main = {"topology": topology_main, "scheduler": scheduler_main}[package]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    check_one_error_line(exit_info.value.code, out.out, out.err, command, message)


def test_validate_names_the_cell_that_broke(files):
    result = cli("scheduler", "validate", str(files / "cc3.json"))
    lines = result.stdout.splitlines()  # the details on stdout, the one-line error on stderr
    assert result.stderr.count("\n") == 1 and "first CC3" in result.stderr
    assert lines[0].endswith("CC3: stages [0, 3, 1, 2, 4, 5] go back further than one neighbouring swap "
                             f"(microbatch 1, node {json.loads((files / 'cc3.json').read_text())['paths'][1]['nodes'][2]}, "
                             "stage 1)")
    assert "microbatch 1: 0@n" in lines[1] and "[1@n" in lines[1]


def test_must_show_commands(tmp_path):
    plan, report, trace, gantt, heat = (tmp_path / f for f in ("full.json", "report.json", "trace.json", "gantt.png",
                                                                 "heat.png"))
    shown = cli("topology", "show", "--topology", "gcp-12-regions", "--nodes", "20", "--plot", str(heat))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("gcp-12-regions: 20 nodes in 12 regions")
    assert "Australia" in shown.stdout and "slowest link" in shown.stdout

    solved = cli(*SOLVE, "--stage-sizes", "5,3,3,3,3,3", "--model", "configs/models/llama-500m.yaml",
                 "--microbatch-size", "8", "--microbatches", "30", "--memory", "3", "--out", str(plan))
    assert solved.returncode == 0, solved.stderr
    assert "30 microbatches" in solved.stdout

    valid = cli("scheduler", "validate", str(plan))
    assert valid.returncode == 0 and "valid" in valid.stdout and valid.stderr == ""

    sim = cli("topology", "simulate", "--topology", "gcp-12-regions", "--nodes", "20", "--model",
              "configs/models/llama-500m.yaml", "--microbatch-size", "8", "--plan", str(plan),
              "--json", str(report), "--trace", str(trace), "--plot", str(gantt))
    assert sim.returncode == 0, sim.stderr

    data = json.loads(report.read_text())
    assert data["iteration_s"] > 0 and len(data["nodes"]) == 20
    assert data["iteration_s"] == pytest.approx(json.loads(plan.read_text())["predicted"]["iteration_s"])
    events = json.loads(trace.read_text())["traceEvents"]
    assert all({"ph", "pid", "tid", "name"} <= set(e) for e in events)
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    rows = [e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"]
    assert len(rows) == 40 and sum(r.endswith(" compute") for r in rows) == 20  # a compute and a network row per node
    for png in (gantt, heat):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_plots_a_one_node_topology(tmp_path, capsys):
    topology_main(["show", "--topology", "single-cluster", "--nodes", "1", "--plot", str(tmp_path / "one.png")])
    assert "single-cluster: 1 node in 1 region " in capsys.readouterr().out
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


def test_outputs_that_exist_are_refused_unless_overwrite(tmp_path, files, capsys):
    """A second solve, compare, simulate or show with the same output path stops before any work, with one
    line, and leaves the first run's file as it was; --overwrite replaces it."""
    plan = tmp_path / "plan.json"
    plan.write_text("the first run's plan")
    solve_args = ["solve", "--strategy", "full", "--topology", "gcp-12-regions", "--nodes", "20", "--stages", "4",
                  "--out", str(plan)]
    commands = [
        (scheduler_main, solve_args, "--out"),
        (scheduler_main, ["compare", "--topology", "gcp-12-regions", "--nodes", "20", "--stages", "4",
                          "--strategies", "full", "--json", str(plan)], "--json"),
        (topology_main, ["simulate", "--topology", "gcp-12-regions", "--nodes", "20", "--plan", str(files / "plan.json"),
                         "--plot", str(plan)], "--plot"),
        (topology_main, ["show", "--topology", "gcp-12-regions", "--nodes", "20", "--plot", str(plan)], "--plot"),
    ]
    for main, args, flag in commands:
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {flag} {plan} already exists; pass another path, or --overwrite to replace it"
        assert plan.read_text() == "the first run's plan"
    scheduler_main([*solve_args, "--overwrite"])
    assert json.loads(plan.read_text())["strategy"] == "full"


@pytest.mark.parametrize("argv0, expected", [("/venv/bin/skippipe-scheduler", "skippipe-scheduler"),
                                             ("/repo/scheduler/__main__.py", "python -m scheduler")])
def test_usage_names_the_command_the_user_ran(argv0, expected, monkeypatch):
    from scheduler.cli import build_parser
    monkeypatch.setattr(sys, "argv", [argv0])
    assert build_parser().prog == expected
