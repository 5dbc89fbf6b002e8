"""Model FLOPs, known accelerator peaks, and MFU (model FLOPs utilisation).

Note [model FLOPs]: training FLOPs per token are 6N + 12·L·H·Q·T (Chowdhery et al. 2022, "PaLM", appendix
B; the same count as torchtitan's get_num_flop_per_token and nanoGPT's estimate_mfu): 6 per parameter
(2 forward, 4 backward; N without the embedding table, whose lookup is not a matmul, but with the LM head)
plus the attention scores and their weighted sum, 12 x layers x heads x head_dim x sequence length
(causal masking not discounted, as in PaLM). Recomputation under activation checkpointing is not model
FLOPs: MFU counts the work the model needs, whatever the implementation spends (PaLM, appendix B).
A SkipPipe microbatch runs only the layers on its path, so an iteration's model FLOPs are summed over the
stages each microbatch visits (`node_flops`), not taken as tokens x the full model's per-token figure.

Note [peak FLOP/s]: dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s. bf16 runs
compare against the bf16 peak, fp32 runs against the plain float32 (non-tensor-core) peak, since torch's
float32 matmuls do not use TF32 unless asked. A CPU has no entry: its MFU is null, never a guess.
`train.peak_tflops` overrides the table for any device.
"""
from __future__ import annotations

from topology.plan import Plan
from topology.model_spec import ModelSpec, split_layers

# (substring of torch.cuda.get_device_name(), bf16 dense TFLOP/s, fp32 TFLOP/s); the first match wins,
# so the more specific names come first. Sources: NVIDIA H100 (SXM5 / PCIe / NVL), H200 SXM, A100, L40S,
# L40 and L4 data sheets (dense figures; the sheets' headline numbers are with 2:4 sparsity, twice these).
KNOWN_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
)


def layer_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token of one layer: 6 x its parameters + 12 x heads x head_dim x seq_len."""
    return 6.0 * spec.layer_params + 12.0 * spec.num_heads * spec.head_dim * seq_len


def head_flops_per_token(spec: ModelSpec) -> float:
    """Training FLOPs per token of the final norm and LM head (6 per parameter)."""
    return 6.0 * (spec.dim + spec.vocab_size * spec.dim)


def model_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Note [model FLOPs]: 6N + 12·L·H·Q·T for the full model, N without the embedding table."""
    return spec.num_layers * layer_flops_per_token(spec, seq_len) + head_flops_per_token(spec)


def node_flops(plan: Plan, spec: ModelSpec, seq_len: int) -> dict[int, float]:
    """Model FLOPs each plan node does in one iteration: the layers of its stage for every microbatch that
    visits it there, and the head for the microbatches whose loss it computes (its data node)."""
    layers = split_layers(spec.num_layers, plan.num_stages)
    tokens = plan.microbatch_size * seq_len
    out = {node.id: 0.0 for node in plan.nodes}
    for path in plan.paths:
        for node, stage in zip(path.nodes, path.stages):
            out[node] += tokens * len(layers[stage]) * layer_flops_per_token(spec, seq_len)
        out[path.data_node] += tokens * head_flops_per_token(spec)
    return out


def peak_tflops(device_name: str | None, precision: str, override: float | None = None) -> float | None:
    """Note [peak FLOP/s]: the override, else the known peak of this device for `precision`, else None."""
    if override is not None:
        return float(override)
    if not device_name:
        return None
    for key, bf16, fp32 in KNOWN_PEAKS:
        if key.lower() in device_name.lower():
            return bf16 if precision == "bf16" else fp32
    return None


def mfu(flops: float, seconds: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: flops / (seconds x peak TFLOP/s x 1e12 x devices); None without a peak."""
    if peak is None or seconds <= 0:
        return None
    return flops / (seconds * peak * 1e12 * devices)


def device_memory_gb(device) -> float:
    """The memory one rank may use, in GB (1e9 bytes): a CUDA device's total memory, or on a CPU the
    machine's physical memory shared by the ranks on it (LOCAL_WORLD_SIZE, set by torchrun)."""
    import os

    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 / max(ranks, 1)
