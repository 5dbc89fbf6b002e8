"""The numeric precision of a run: what computes in which dtype, and what crosses a stage boundary.

Note [mixed precision]: `bf16` is the scheme of torchtitan and Megatron-LM's bf16 mode: parameters, their
gradients and the AdamW state stay float32 (the master weights); matmuls and attention run in bfloat16
under `torch.autocast`; the residual stream, the norms and the loss stay float32. A stage boundary is the
exception: hidden states and their gradients cross it as bfloat16 (2 bytes an element, what the cost model
counts with a model's `dtype_bytes: 2`). The rounding is a differentiable cast pair, `to_wire` before the
boundary and `from_wire` after it, so the backward pass rounds the gradient to bfloat16 at the same place.
The path-faithful single-process mode applies the same pair between stages, so both modes round
identically and their losses agree. `fp32` changes nothing: no autocast, float32 on the wire.

Gradients are all-reduced in float32 (the master gradients): `GRAD_BYTES`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from topology.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
GRAD_BYTES = 4  # bytes per gradient element in the data-parallel all-reduce (float32 master gradients)


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` is fp32 or bf16; `wire_dtype` is what crosses a stage boundary."""
    name: str
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bf16" else None

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def wire_bytes(self) -> int:
        """Bytes per activation/gradient element on a stage boundary (a model spec's dtype_bytes)."""
        return wire_bytes(self.name)

    def autocast(self):
        """The compute context of a forward (and of its recomputation under activation checkpointing)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def to_wire(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states as they leave a stage (differentiable: the gradient comes back in float32)."""
        return hidden.to(self.wire_dtype)

    def from_wire(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states as a stage computes on them: the float32 residual stream (differentiable: the
        gradient leaves in the wire dtype)."""
        return hidden.float()

    def boundary(self, hidden: torch.Tensor) -> torch.Tensor:
        """Crossing a boundary in one process: exactly the rounding of to_wire, the wire, from_wire."""
        return self.from_wire(self.to_wire(hidden))


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """`auto` is bf16 on CUDA and fp32 elsewhere (a CPU's bfloat16 matmuls are slow and gain nothing).

    Raises ConfigError for an unknown name."""
    device_type = torch.device(device).type
    if name not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    return Precision(name, device_type)


def wire_bytes(name: str) -> int:
    """Bytes per element crossing a stage boundary for a resolved precision name (fp32: 4, bf16: 2)."""
    return {"fp32": 4, "bf16": 2}[name]
