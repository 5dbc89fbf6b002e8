"""TC1 from the hardware: how many microbatches' activations a node can hold (`schedule.memory: auto`).

Note [memory arithmetic]: for a node with M bytes serving stage s,

    usable      = M x (1 - RESERVE)                        (allocator fragmentation, CUDA context, workspaces)
    static      = params(s) x 16 B                         (float32 master weights 4, gradients 4, AdamW m and v 8)
    transient   = logits (stage 0) + one layer's activations (recomputed under checkpointing) + bf16 weight copies
    per_mb      = tokens x layers(s) x kept_bytes_per_token + 2 boundary tensors
    cap         = floor((usable - static - transient) / per_mb)

Under `activation_checkpointing: layer` a layer keeps only its float32 input (4 x dim bytes a token);
without it, what autograd saves in skippipe/model.py's DecoderLayer (`layer_activation_bytes_per_token`).
A plan has one TC1 cap, so `auto` takes the smallest over every node and every stage it might serve, and
the plan records the whole table. No torch here: the scheduler uses it without the runtime.
"""
from __future__ import annotations

import math

from topology.errors import ConfigError
from topology.model_spec import ModelSpec, split_layers

RESERVE = 0.10  # of a node's memory, kept free: allocator fragmentation, the CUDA context, kernels' workspaces
STATIC_BYTES_PER_PARAM = 16  # float32 weight, float32 gradient, AdamW exp_avg and exp_avg_sq (float32)
GB = 1e9  # a topology's memory_gb is in decimal gigabytes


def layer_activation_bytes_per_token(spec: ModelSpec, precision: str) -> int:
    """Bytes autograd keeps per token for one DecoderLayer's backward (no checkpointing).

    Counted from the tensors the layer's operations save (h = dim, kv = num_kv_heads x head_dim, f = ffn_dim):
    each RMSNorm keeps its float32 input, normalised input and output (3h, two norms: 6h float32); the
    attention keeps the rotated q (h) and k (kv), v (kv), its output (h) and the o_proj input (h); the MLP
    keeps gate, up, silu(gate) and their product (4f). fp32: 4 bytes each, (9h + 2kv + 4f) x 4. bf16
    (autocast): each norm keeps its input and normalised input in float32 (2h x 4, two norms); autocast casts
    a norm's output to bf16 once per matmul that reads it and each matmul saves its copy (q, k, v: 3h;
    gate, up: 2h; x 2 bytes); the attention keeps bf16 q (h), k (kv), v (kv) and its output (h); the MLP
    4f in bf16: 30h + 4kv + 8f bytes in all. The same kind of count as Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", section 4.1 (34·s·b·h for a GPT layer in 16-bit);
    tests/test_memory.py checks it against the tensors autograd saves.
    """
    h, kv, f = spec.dim, spec.num_kv_heads * spec.head_dim, spec.ffn_dim
    if precision == "fp32":
        return (9 * h + 2 * kv + 4 * f) * 4
    if precision == "bf16":
        return 2 * 2 * h * 4 + 5 * h * 2 + (2 * h + 2 * kv + 4 * f) * 2
    raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")


def stage_memory(spec: ModelSpec, *, stage: int, num_stages: int, microbatch_size: int, precision: str,
                 checkpointing: str, memory_bytes: float) -> dict:
    """Note [memory arithmetic] for one stage on a node with `memory_bytes`: every term in bytes, and `cap`.

    `cap` may be 0 or negative: the stage does not fit even with one microbatch."""
    if checkpointing not in ("none", "layer"):
        raise ConfigError(f"activation checkpointing must be none or layer, got {checkpointing!r}")
    layers = len(split_layers(spec.num_layers, num_stages)[stage])
    params = layers * spec.layer_params + (spec.embedding_params + spec.head_params if stage == 0 else 0)
    tokens = microbatch_size * spec.context
    wire = 2 if precision == "bf16" else 4
    full_layer = tokens * layer_activation_bytes_per_token(spec, precision)
    kept_per_token = 4 * spec.dim if checkpointing == "layer" else layer_activation_bytes_per_token(spec, precision)
    per_mb = tokens * layers * kept_per_token + 2 * tokens * spec.dim * wire  # + the stage's input and output
    # Logits (in the compute dtype), their float32 copy, the saved log-softmax and the gradient: the loss
    # runs forward and backward at once, so only one microbatch's are alive.
    logits = tokens * spec.vocab_size * (wire + 4 + 4 + 4) if stage == 0 else 0
    transient = logits + (full_layer if checkpointing == "layer" else 0) + (params * 2 if precision == "bf16" else 0)
    usable = memory_bytes * (1 - RESERVE)
    static = params * STATIC_BYTES_PER_PARAM
    cap = math.floor((usable - static - transient) / per_mb)
    return {"stage": stage, "layers": layers, "parameters": params, "memory_bytes": memory_bytes,
            "usable_bytes": usable, "static_bytes": static, "transient_bytes": transient,
            "per_microbatch_bytes": per_mb, "cap": cap}


def auto_memory(spec: ModelSpec, *, node_memory_gb: list[float], node_names: list[str], num_stages: int,
                microbatch_size: int, precision: str, checkpointing: str) -> tuple[int, dict]:
    """TC1's cap for `schedule.memory: auto` and the explanation the plan records.

    The cap is the smallest over every node and every stage (placement is not known yet). Raises
    ConfigError if some node cannot hold even one microbatch of some stage, naming it and the fixes."""
    rows = []
    for name, gb in zip(node_names, node_memory_gb):
        stages = [stage_memory(spec, stage=s, num_stages=num_stages, microbatch_size=microbatch_size,
                               precision=precision, checkpointing=checkpointing, memory_bytes=gb * GB)
                  for s in range(num_stages)]
        worst = min(stages, key=lambda r: r["cap"])
        rows.append({"node": name, "memory_gb": gb, "cap": worst["cap"], "binding_stage": worst["stage"],
                     "per_stage_cap": [r["cap"] for r in stages]})
    binding = min(rows, key=lambda r: r["cap"])
    detail = stage_memory(spec, stage=binding["binding_stage"], num_stages=num_stages, microbatch_size=microbatch_size,
                          precision=precision, checkpointing=checkpointing, memory_bytes=binding["memory_gb"] * GB)
    if binding["cap"] < 1:
        raise ConfigError(
            f"node {binding['node']} ({binding['memory_gb']:g} GB) cannot hold one microbatch of stage "
            f"{binding['binding_stage']}: it needs {(detail['static_bytes'] + detail['transient_bytes'] + detail['per_microbatch_bytes']) / GB:.1f} GB "
            f"of {detail['usable_bytes'] / GB:.1f} GB usable; use more stages, a smaller microbatch, "
            f"train.activation_checkpointing=layer or bf16, or a fixed schedule.memory")
    explanation = {
        "source": "auto", "cap": binding["cap"], "precision": precision, "activation_checkpointing": checkpointing,
        "formula": "floor((memory x (1 - reserve) - params x 16 B - transient) / per_microbatch)",
        "reserve": RESERVE, "static_bytes_per_param": STATIC_BYTES_PER_PARAM,
        "binding": {"node": binding["node"], **detail}, "nodes": rows,
    }
    return binding["cap"], explanation


def describe(explanation: dict) -> str:
    """One line: the cap and the arithmetic of the node and stage that bind it."""
    b = explanation["binding"]
    return (f"TC1 memory auto = {explanation['cap']}: node {b['node']} ({b['memory_bytes'] / GB:g} GB), stage {b['stage']}: "
            f"floor(({b['usable_bytes'] / GB:.2f} usable - {b['static_bytes'] / GB:.2f} params+grads+AdamW - "
            f"{b['transient_bytes'] / GB:.2f} transient) / {b['per_microbatch_bytes'] / GB:.3f} per microbatch) GB "
            f"[{explanation['precision']}, checkpointing {explanation['activation_checkpointing']}]")


def resolve_memory(value: int | str, *, topology, spec: ModelSpec, num_stages: int, microbatch_size: int,
                   precision: str, checkpointing: str, measured_gb: float | None = None) -> tuple[int, dict | None]:
    """A fixed TC1 cap as it is, or `auto` worked out from each node's memory_gb (else `measured_gb`, the
    device's memory as measured at start-up, for every node). Returns (cap, explanation or None)."""
    if value != "auto":
        return int(value), None
    memory = [node.memory_gb if node.memory_gb is not None else measured_gb for node in topology.nodes]
    missing = [node.name for node, gb in zip(topology.nodes, memory) if gb is None]
    if missing:
        raise ConfigError(f"memory auto needs every node's memory: {', '.join(missing[:4])} have no memory_gb in "
                          f"topology {topology.name!r}; add memory_gb to its nodes or pass a fixed --memory N")
    cap, explanation = auto_memory(spec, node_memory_gb=memory, node_names=[n.name for n in topology.nodes],
                                   num_stages=num_stages, microbatch_size=microbatch_size, precision=precision,
                                   checkpointing=checkpointing)
    explanation["memory_from"] = "topology" if measured_gb is None or all(n.memory_gb for n in topology.nodes) \
        else "topology, else the device as measured at start-up"
    return cap, explanation
