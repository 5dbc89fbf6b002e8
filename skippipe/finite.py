"""Non-finite losses and weights: never trained through, never saved, never read as a model.

Note [non-finite steps]: one step with a NaN or infinite loss or gradient norm poisons every weight the
optimizer touches, and AdamW's moments with them, so the check runs after the gradient norm is known
and before the optimizer step. `train.nonfinite: stop` (the default) ends the run with one line naming
the step (and, where known, the microbatch and stage), so the last checkpoint, taken from finite weights,
stays `latest`. `skip` drops that step's update instead, as dynamic loss scalers do for overflowed
steps (torch.amp.GradScaler), and logs the step with `skipped: true`.

The global gradient norm is all-reduced over every stage, so every rank decides the same; a NaN loss
makes the loss stage's gradients NaN, so the norm catches it on every rank without another collective.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from topology.errors import ConfigError

POLICIES = ("stop", "skip")


class NonFiniteError(ConfigError):
    """A training step produced a non-finite loss or gradient norm (exit 2, one line)."""


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def nonfinite_microbatches(losses: dict[int, torch.Tensor]) -> list[int]:
    """Microbatches (of those this process computed) whose loss is NaN or infinite."""
    return sorted(mb for mb, loss in losses.items() if not torch.isfinite(loss).all())


def step_message(step: int, loss: float | None, grad_norm: float, where: list[str], run_dir: Path) -> str:
    """The one line that stops a run at a non-finite step (Note [non-finite steps])."""
    what = f"loss {loss}" if loss is not None and not math.isfinite(loss) else f"gradient norm {grad_norm}"
    at = f" ({'; '.join(where)})" if where else ""
    pointer = run_dir / "checkpoints" / "latest"
    kept = (f"the last good checkpoint {pointer.read_text(errors='replace').strip()} stays latest" if pointer.is_file()
            else "no checkpoint was saved")
    return (f"step {step}: non-finite {what}{at}; the run stopped before the optimizer step and {kept}; "
            f"lower optim.lr or raise optim.warmup_steps, or set train.nonfinite=skip to skip such steps")


def check_finite_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinity: raises ConfigError naming the file and the first tensor."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConfigError(f"{path}: tensor {name!r} holds non-finite values (NaN or infinity); this checkpoint "
                              f"is not a usable model: use an earlier checkpoints/step_* folder")
