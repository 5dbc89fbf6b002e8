"""Mixed precision (Note [mixed precision] in skippipe/precision.py): what rounds where, in one process."""
from __future__ import annotations

import pytest
import torch

from skippipe.model import FullModel
from skippipe.precision import resolve_precision, wire_bytes
from topology.errors import ConfigError
from topology.model_spec import ModelSpec

SPEC = ModelSpec(name="t", dim=32, num_layers=4, num_heads=2, num_kv_heads=1, ffn_dim=64, context=16, vocab_size=64)


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", "cpu").name == "fp32"
    assert resolve_precision("auto", "cuda").name == "bf16"
    assert resolve_precision("bf16", "cpu").wire_dtype == torch.bfloat16
    assert (wire_bytes("bf16"), wire_bytes("fp32")) == (2, 4)
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_boundary_rounds_forward_and_backward_like_the_wire():
    """Forward: values rounded to bf16; backward: the gradient crossing back is bf16-representable too."""
    bf16 = resolve_precision("bf16", "cpu")
    x = torch.randn(4, 8, dtype=torch.float32, requires_grad=True)
    y = bf16.boundary(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.detach().to(torch.bfloat16).float())
    upstream = torch.randn(4, 8)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream.to(torch.bfloat16).float())
    fp32 = resolve_precision("fp32", "cpu")
    assert fp32.boundary(x) is x  # fp32: no op, no graph node, bit-identical to no precision at all


def test_bf16_keeps_float32_master_weights_and_gradients():
    model = FullModel(SPEC, 2, seed=0)
    bf16 = resolve_precision("bf16", "cpu")
    tokens = torch.randint(0, 64, (2, 16))
    with bf16.autocast():
        logits = model.forward_path(tokens, [0, 1], boundary=bf16.boundary)
    assert logits.dtype == torch.bfloat16  # the head's matmul ran in bf16
    loss = FullModel.loss(logits, tokens)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    reference = FullModel.loss(model(tokens), tokens)
    reference = float(reference.detach())
    assert float(loss.detach()) == pytest.approx(reference, rel=2e-2) and float(loss.detach()) != reference
