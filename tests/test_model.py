"""The stage model: seeded init independent of the cut, paths, gradients, parity with transformers."""
import pytest
import torch

from skippipe.model import FullModel, Stage, hf_state_dict
from topology.model_spec import ModelSpec, load_model_spec

SEED = 1234


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_model_spec("llama-tiny")


@pytest.fixture(scope="module")
def tokens(spec) -> torch.Tensor:
    return torch.randint(spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def _layer_state(stage: Stage, layer_index: int) -> dict[str, torch.Tensor]:
    return stage.layers[str(layer_index)].state_dict()


def test_init_is_independent_of_the_cut(spec):
    fine, coarse = Stage(spec, 1, 4, SEED), Stage(spec, 0, 2, SEED)
    assert fine.layer_indices == [2, 3] and coarse.layer_indices == [0, 1, 2, 3]
    for name, tensor in _layer_state(fine, 3).items():
        assert torch.equal(tensor, _layer_state(coarse, 3)[name]), name
    assert torch.equal(Stage(spec, 0, 4, SEED).embed_tokens.weight, coarse.embed_tokens.weight)
    assert torch.equal(Stage(spec, 0, 8, SEED).lm_head.weight, coarse.lm_head.weight)


def test_init_depends_on_seed_and_layer(spec):
    stage = Stage(spec, 0, 1, SEED)
    q2, q3 = (stage.layers[str(i)].self_attn.q_proj.weight for i in (2, 3))
    assert not torch.equal(q2, q3)
    other = Stage(spec, 0, 1, SEED + 1)
    assert not torch.equal(q2, other.layers["2"].self_attn.q_proj.weight)
    # Output projections are scaled down by sqrt(2 * num_layers).
    o_std = stage.layers["2"].self_attn.o_proj.weight.std().item()
    assert o_std == pytest.approx(0.02 / 4, rel=0.15)
    assert q2.std().item() == pytest.approx(0.02, rel=0.1)
    # Built on the meta device and then allocated: the seeded init must have set every norm weight.
    for name, param in stage.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name


def test_only_stage_zero_has_embedding_and_head(spec):
    stage = Stage(spec, 2, 4, SEED)
    assert not hasattr(stage, "embed_tokens") and not hasattr(stage, "lm_head")
    assert set(Stage(spec, 0, 4, SEED).state_dict()) >= {"embed_tokens.weight", "norm.weight", "lm_head.weight",
                                                           "layers.0.self_attn.q_proj.weight"}
    with pytest.raises(AssertionError):
        stage.embed(torch.zeros(1, 4, dtype=torch.long))


def test_stage_by_stage_equals_full_path(spec, tokens):
    model = FullModel(spec, 4, SEED)
    hidden = model.stages[0].embed(tokens)
    for stage in model.stages:
        hidden = stage(hidden)
    assert torch.equal(model.stages[0].head(hidden), model.forward_path(tokens, [0, 1, 2, 3]))
    # The cut does not change the function: one stage holding every layer gives the same logits.
    whole = FullModel(spec, 1, SEED)
    torch.testing.assert_close(whole(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_skipping_and_reordering_change_the_output(spec, tokens):
    model = FullModel(spec, 4, SEED)
    full = model.forward_path(tokens, [0, 1, 2, 3])
    skipped = model.forward_path(tokens, [0, 1, 3])
    reordered = model.forward_path(tokens, [0, 2, 1, 3])
    assert skipped.shape == reordered.shape == full.shape == (*tokens.shape, spec.vocab_size)
    assert not torch.allclose(full, skipped) and not torch.allclose(full, reordered)


@pytest.mark.parametrize("bad", [[], [1, 2], [0, 1, 1], [0, 4]])
def test_invalid_stage_sequences_are_rejected(spec, tokens, bad):
    with pytest.raises(ValueError):
        FullModel(spec, 4, SEED).forward_path(tokens, bad)


def test_gradients_reach_only_visited_stages(spec, tokens):
    model = FullModel(spec, 4, SEED)
    logits = model.forward_path(tokens[:, :-1], [0, 2, 1])
    model.loss(logits, tokens[:, 1:]).backward()
    for stage_index, stage in enumerate(model.stages):
        for name, param in stage.named_parameters():
            if stage_index == 3:
                assert param.grad is None, name
            else:
                assert param.grad is not None and param.grad.abs().sum() > 0, (stage_index, name)


def test_loss_is_mean_cross_entropy(spec, tokens):
    logits = torch.zeros(*tokens.shape, spec.vocab_size)
    loss = FullModel.loss(logits, tokens)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(float(spec.vocab_size))).item())


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_llama(spec, tokens, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = ModelSpec(**{**spec.to_dict(), "tie_embeddings": tie, "rope_theta": 500000.0})
    assert spec.num_kv_heads < spec.num_heads  # grouped-query attention is exercised
    model = FullModel(spec, 3, SEED)
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.dim, intermediate_size=spec.ffn_dim,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.context,
                         rms_norm_eps=spec.norm_eps, tie_word_embeddings=tie,
                         rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta})
    reference = LlamaForCausalLM(config).eval()
    missing, unexpected = reference.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k and not (tie and k == "lm_head.weight")]
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-5)
        # An omitted stage too: the evaluator's mode (kept stages in order).
        reference.model.layers = torch.nn.ModuleList(
            layer for i, layer in enumerate(reference.model.layers) if i not in model.stages[1].layer_indices)
        for i, layer in enumerate(reference.model.layers):
            layer.self_attn.layer_idx = i
        reference.config.num_hidden_layers = len(reference.model.layers)
        torch.testing.assert_close(model.forward_path(tokens, [0, 2]), reference(input_ids=tokens).logits,
                                   rtol=1e-4, atol=1e-5)
