"""What a run reports, on rank 0: a `|`-separated line per step, metrics.jsonl, TensorBoard, tqdm, a plot.

metrics.jsonl holds one object per step: step, loss, lr, grad_norm, iteration_s, tokens_per_s,
idle_share, per-rank compute / wait / idle seconds, model_flops_per_token, peak_tflops, mfu (null without
a known peak), per-rank tokens_per_s_per_rank and mfu_per_rank (skippipe/flops.py), val_loss when measured
(null otherwise: never a number that was not measured; Note [non-finite steps] in finite.py for `skipped`),
and the per-rank timeline
of the step's actions (seconds from rank 0's iteration start; exact on one machine, shifted by clock
skew across machines).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from topology.errors import ConfigError


def format_line(record: dict, total_steps: int, val_due: bool = False) -> str:
    """The step's log line; `val_due`: an evaluation was due this step (shown as 'val n/a' if not measured)."""
    parts = [f"step {record['step']:>{len(str(total_steps))}}/{total_steps}", f"loss {record['loss']:.4f}"]
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.4f}")
    elif val_due:
        parts.append("val n/a")
    parts += [f"lr {record['lr']:.2e}", f"grad_norm {record['grad_norm']:.3f}",
              f"{record['tokens_per_s']:,.0f} tok/s", f"iter {record['iteration_s']:.3f} s",
              f"idle {record['idle_share']:.0%}"]
    if record.get("mfu") is not None:  # null without a known peak (a CPU): never a made-up figure
        parts.append(f"MFU {format_share(record['mfu'])}")
    if record.get("skipped"):
        parts.append("update skipped (non-finite, train.nonfinite=skip)")
    return " | ".join(parts)


class Metrics:
    """No-op on every rank but the one that reports (enabled=False)."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run_dir = Path(run_dir)
        self._bar = self._tb = None
        if not enabled:
            return
        # A resumed run replaces the records after its checkpoint, so the file reads as one run.
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            pass
        if sys.stderr.isatty():  # a progress bar only helps a person watching; in logs it is noise
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def log(self, record: dict, print_line: bool = True, val_due: bool = False) -> None:
        """Print (when `print_line`) and append one step's record; NaN and infinity are written as null."""
        if not self.enabled:
            return
        if print_line:
            self.info(format_line(record, self.total_steps, val_due))
        with self.path.open("a") as out:
            out.write(json.dumps(_json_safe(record)) + "\n")
        if self._tb is not None:
            for key in ("loss", "val_loss", "lr", "grad_norm", "iteration_s", "tokens_per_s", "idle_share", "mfu"):
                if record.get(key) is not None and math.isfinite(record[key]):
                    self._tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", record[key], record["step"])
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> Path | None:
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        return plot_losses(self.path, self.run_dir / "loss.png")


def _json_safe(record: dict) -> dict:
    """NaN/infinity are not JSON: a non-finite top-level number becomes null (the step says `skipped`)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a damaged line is a ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {number} is not JSON ({exc.msg}); the metrics file is damaged: "
                              f"repair or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ConfigError(f"{path}: line {number} is not a step record; repair or remove that line")
        records.append(record)
    return records


def plot_losses(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Training (and validation) loss against step, as a PNG; None without matplotlib or records."""
    records = read_metrics(metrics_path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    measured = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]  # null: a skipped step
    if measured:
        ax.plot(*zip(*measured), label="train loss", lw=1)
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (full model)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean token cross entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def format_share(share: float) -> str:
    """A measured fraction as a percentage with two significant digits: 0.4912 -> '49%', 0.00052 ->
    '0.052%'. A fixed '.1%' printed a tiny model's real MFU as '0.0%', which reads as 'not measured'."""
    return f"{share * 100:.2g}%"
