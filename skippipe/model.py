"""The LLaMa-style decoder, cut into pipeline stages.

Weight names, shapes and the rotary formulation follow Hugging Face's ``LlamaForCausalLM``, so a
checkpoint maps 1:1 onto it (:func:`hf_state_dict`) and its logits match (tests/test_model.py).
Inside a :class:`Stage` the keys are ``embed_tokens.weight``, ``layers.<global index>.<...>``,
``norm.weight`` and ``lm_head.weight``: the same names as Hugging Face's without the ``model.`` prefix,
and layer keys are global so checkpoints do not depend on how the model is cut.

Note [seeded init]: every layer draws its initial weights from its own generator, seeded by
(seed, global layer index); the embedding and the head have their own seeds. A rank therefore builds
its stage exactly as the single-process model would, without communication, whatever the cut.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from topology.model_spec import ModelSpec, split_layers

INIT_STD = 0.02


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from a base seed and a tag. Hashing (not seed + index) keeps streams unrelated."""
    text = ":".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as Hugging Face does, so that
        # low-precision runs round the same way as the exported model.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(seq_len: int, *, head_dim: int, theta: float, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, shape (seq_len, head_dim), computed in float32 for accuracy."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    # Halves, not interleaved pairs: the "rotate_half" layout of Hugging Face's Llama.
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, spec.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa shares each key/value head with a consecutive group of query heads, the same
        # grouping as Hugging Face's repeat_kv.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.dim, spec.ffn_dim, bias=False)
        self.up_proj = nn.Linear(spec.dim, spec.ffn_dim, bias=False)
        self.down_proj = nn.Linear(spec.ffn_dim, spec.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.dim, spec.norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.dim, spec.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _init_layer(layer: DecoderLayer, spec: ModelSpec, seed: int, layer_index: int) -> None:
    generator = torch.Generator().manual_seed(derive_seed(seed, "layer", layer_index))
    # Scaled output projections keep the residual stream's variance from growing with depth (GPT-2).
    output_std = INIT_STD / math.sqrt(2 * spec.num_layers)
    with torch.no_grad():
        # named_parameters follows definition order, so the draws are in a fixed order.
        for name, param in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, output_std, generator=generator)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)


def _uninitialised(module_type, *args) -> nn.Module:
    """Build on the meta device and allocate: every parameter is then set by a seeded init, and the
    default (unseeded, wasted) init of nn.Linear is skipped."""
    with torch.device("meta"):
        module = module_type(*args)
    return module.to_empty(device="cpu")


class Stage(nn.Module):
    """One pipeline stage: consecutive layers, plus embedding, final norm and LM head on stage 0."""

    def __init__(self, spec: ModelSpec, stage_index: int, num_stages: int, seed: int,
                 device: torch.device | str | None = None):
        super().__init__()
        ranges = split_layers(spec.num_layers, num_stages)
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index {stage_index} is out of range for {num_stages} stages; "
                             f"use 0..{num_stages - 1}")
        self.spec, self.stage_index, self.num_stages = spec, stage_index, num_stages
        self.layer_indices = list(ranges[stage_index])
        layers = {}
        for layer_index in self.layer_indices:
            layer = _uninitialised(DecoderLayer, spec)
            _init_layer(layer, spec, seed, layer_index)
            layers[str(layer_index)] = layer
        self.layers = nn.ModuleDict(layers)
        if stage_index == 0:
            self.embed_tokens = _uninitialised(nn.Embedding, spec.vocab_size, spec.dim)
            self.norm = RMSNorm(spec.dim, spec.norm_eps)
            self.lm_head = _uninitialised(nn.Linear, spec.dim, spec.vocab_size, False)
            with torch.no_grad():
                embed_gen = torch.Generator().manual_seed(derive_seed(seed, "embedding"))
                self.embed_tokens.weight.normal_(0.0, INIT_STD, generator=embed_gen)
                if spec.tie_embeddings:
                    self.lm_head.weight = self.embed_tokens.weight
                else:
                    head_gen = torch.Generator().manual_seed(derive_seed(seed, "head"))
                    self.lm_head.weight.normal_(0.0, INIT_STD, generator=head_gen)
        if device is not None:
            self.to(device)

    @property
    def has_head(self) -> bool:
        return self.stage_index == 0

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.has_head, "only stage 0 holds the embedding"
        return self.embed_tokens(tokens)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run this stage's layers on hidden states of shape (batch, seq_len, dim)."""
        cos, sin = rotary_cos_sin(hidden.shape[1], head_dim=self.spec.head_dim, theta=self.spec.rope_theta,
                                  device=hidden.device, dtype=hidden.dtype)
        for layer in self.layers.values():
            hidden = layer(hidden, cos, sin)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.has_head, "only stage 0 holds the final norm and LM head"
        return self.lm_head(self.norm(hidden))


def check_stage_sequence(stage_sequence: Sequence[int], num_stages: int) -> list[int]:
    sequence = [int(s) for s in stage_sequence]
    if not sequence or sequence[0] != 0:
        raise ValueError(f"stage sequence {sequence} must begin with stage 0, which holds the embedding")
    if len(set(sequence)) != len(sequence):
        raise ValueError(f"stage sequence {sequence} visits a stage twice; each stage at most once (CC2)")
    bad = [s for s in sequence if not 0 <= s < num_stages]
    if bad:
        raise ValueError(f"stage sequence {sequence} names stage(s) {bad}; the model has stages 0..{num_stages - 1}")
    return sequence


class FullModel(nn.Module):
    """Every stage of one cut on one device: the path-faithful single-process mode and the evaluator."""

    def __init__(self, spec: ModelSpec, num_stages: int, seed: int, device: torch.device | str | None = None):
        super().__init__()
        self.spec, self.num_stages = spec, num_stages
        self.stages = nn.ModuleList(Stage(spec, s, num_stages, seed, device) for s in range(num_stages))

    def forward_path(self, tokens: torch.Tensor, stage_sequence: Sequence[int]) -> torch.Tensor:
        """Logits after the layers of the stages in ``stage_sequence``, in that order.

        A microbatch's path (which may skip and reorder stages) in training; the kept stages in natural
        order when evaluating with omitted layers.
        """
        sequence = check_stage_sequence(stage_sequence, self.num_stages)
        first = self.stages[0]
        hidden = first.embed(tokens)
        for stage_index in sequence:
            hidden = self.stages[stage_index](hidden)
        return first.head(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_path(tokens, range(self.num_stages))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross entropy, mean over all tokens, in float32 whatever the logits' dtype."""
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def hf_key(stage_key: str) -> str:
    """Stage state-dict key -> Hugging Face LlamaForCausalLM key."""
    return stage_key if stage_key.startswith("lm_head.") else f"model.{stage_key}"


def hf_state_dict(stages: Sequence[Stage] | FullModel) -> dict[str, torch.Tensor]:
    """The union of the stages' weights under Hugging Face LlamaForCausalLM names.

    With tied embeddings ``lm_head.weight`` is left out, as in Hugging Face checkpoints (safetensors
    also refuses to save two names for one storage).
    """
    if isinstance(stages, FullModel):
        stages = list(stages.stages)
    out: dict[str, torch.Tensor] = {}
    for stage in stages:
        for key, tensor in stage.state_dict().items():
            if key == "lm_head.weight" and stage.spec.tie_embeddings:
                continue
            out[hf_key(key)] = tensor
    return out
