"""skippipe.experiments.residual_scale: what each grain of scaling computes, that it leaves the model as
it was, its report on a real checkpoint, and its refusals."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from skippipe.checkpoint import load_full_model
from skippipe.commands import residual_scale as command
from skippipe.config import load_config
from skippipe.evaluation.omission import evaluate_stages, held_out_batches
from skippipe.experiments import residual_scale
from skippipe.model import FullModel
from skippipe.planning import make_plan
from skippipe.trainer import train
from topology.errors import ConfigError
from topology.model_spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ModelSpec(name="scale", dim=32, num_layers=6, num_heads=4, num_kv_heads=2, ffn_dim=64, context=16,
                 vocab_size=64)


@pytest.fixture(scope="module")
def model_and_tokens():
    torch.manual_seed(0)
    return FullModel(SPEC, 3, seed=1).eval(), torch.randint(0, 64, (2, SPEC.context))


def test_scale_one_is_the_model_as_trained_at_either_grain(model_and_tokens):
    model, tokens = model_and_tokens
    with torch.no_grad():
        plain = model.forward_path(tokens, [0, 1, 2])
        for grain in residual_scale.GRAINS:
            with residual_scale.scaled_residuals(model, scale=1.0, grain=grain):
                assert torch.equal(model.forward_path(tokens, [0, 1, 2]), plain)


def test_stage_grain_scales_each_omissible_stage_s_update_and_not_stage_0(model_and_tokens):
    model, tokens = model_and_tokens
    with torch.no_grad():
        hidden = model.stages[0](model.stages[0].embed(tokens))
        for stage in model.stages[1:]:
            hidden = hidden + 0.5 * (stage(hidden) - hidden)
        expected = model.stages[0].head(hidden)
        with residual_scale.scaled_residuals(model, scale=0.5, grain="stage"):
            got = model.forward_path(tokens, [0, 1, 2])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, model.forward_path(tokens, [0, 1, 2]))


def test_layer_grain_equals_the_output_projections_scaled_in_the_weights(model_and_tokens):
    """What an exported checkpoint could carry: o_proj and down_proj of stages 1.. times the scale."""
    model, tokens = model_and_tokens
    folded = FullModel(SPEC, 3, seed=1).eval()
    folded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in folded.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) and not name.startswith("stages.0."):
                param.mul_(0.7)
        with residual_scale.scaled_residuals(model, scale=0.7, grain="layer"):
            got = model.forward_path(tokens, [0, 2])
        torch.testing.assert_close(got, folded.forward_path(tokens, [0, 2]), rtol=1e-5, atol=1e-6)


def test_the_hooks_are_gone_after_the_block_even_on_an_error(model_and_tokens):
    model, tokens = model_and_tokens
    with torch.no_grad():
        before = model.forward_path(tokens, [0, 1, 2])
        with pytest.raises(RuntimeError, match="inside"):
            with residual_scale.scaled_residuals(model, scale=0.3, grain="stage"):
                raise RuntimeError("inside")
        assert torch.equal(model.forward_path(tokens, [0, 1, 2]), before)


@pytest.mark.parametrize("scale", [0.0, -1.0, 2.5, float("nan"), float("inf")])
def test_a_scale_out_of_range_is_refused(model_and_tokens, scale):
    with pytest.raises(ConfigError, match=r"out of range; use a number in \(0, 2\]"):
        with residual_scale.scaled_residuals(model_and_tokens[0], scale=scale, grain="stage"):
            pass


def test_an_unknown_grain_names_the_choices(model_and_tokens):
    with pytest.raises(ConfigError, match="use one of stage, layer"):
        with residual_scale.scaled_residuals(model_and_tokens[0], scale=0.5, grain="block"):
            pass


@pytest.mark.parametrize("stages, trained, expected", [(6, 4, 0.6), (8, 6, 5 / 7), (8, 8, 1.0), (1, 1, 1.0)])
def test_survival_scale_is_the_share_of_omissible_stages_a_path_visits(stages, trained, expected):
    assert residual_scale.survival_scale(stages, trained) == pytest.approx(expected)


def run_command(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit status, stderr) of skippipe-residual-scale run in-process."""
    monkeypatch.setattr(sys, "argv", ["residual_scale.py", *args])
    try:
        command.main()
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_the_command_measures_a_real_checkpoint_at_every_grain_and_keep(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/train/debug.yaml", [
        "schedule.skip_ratio=0.25", "train.steps=2", "train.eval_batches=1", "train.eval_every=0",
        f"train.run_dir={run}", "train.single_process=true", "train.log_every=100"])
    train(cfg, make_plan(cfg))
    out = tmp_path / "r.json"
    code, err = run_command([str(run), "--out", str(out), "--scales", "1.0"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["command"] == f"python scripts/residual_scale.py {run} --out {out} --scales 1.0"
    measured = report["runs"][0]
    rule = measured["survival_scale"]
    assert rule == residual_scale.survival_scale(measured["num_stages"], measured["trained_depth"]) < 1.0
    # Every grain and keep, at 1.0 and at the survival rule's scale; scale 1.0 is the same at both grains
    # and is the evaluator's own figure.
    assert len(measured["losses"]) == len(residual_scale.GRAINS) * len(residual_scale.KEEPS) * 2
    at_one = {(r["grain"], r["keep"]): r["loss"] for r in measured["losses"] if r["scale"] == 1.0}
    assert at_one[("stage", 1.0)] == at_one[("layer", 1.0)]
    model, cfg, _ = load_full_model(run)
    batches = held_out_batches(cfg, model.spec)
    assert at_one[("stage", 1.0)] == evaluate_stages(model, batches, range(model.num_stages))["loss"]
    assert {r["loss"] for r in measured["losses"] if r["keep"] == 1.0 and r["scale"] == rule} != {at_one[("stage", 1.0)]}
    assert set(measured["best"]) == {"stage@1.0", "stage@0.5", "layer@1.0", "layer@0.5"}
    # An existing report is refused, untouched, unless --overwrite.
    text = out.read_text()
    code, err = run_command([str(run), "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err and out.read_text() == text


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nothing", "--out", "{tmp}/r.json"], "checkpoint not found"),
    (["{tmp}/nothing", "--out", "{tmp}/r.json", "--scales", "1.0,half"], "comma-separated list of numbers"),
    (["{tmp}/nothing", "--out", "{tmp}/r.json", "--scales", "3"], r"out of range; use a number in \(0, 2\]"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    code, err = run_command([a.format(tmp=tmp_path) for a in args], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err)
    assert not (tmp_path / "r.json").exists()
