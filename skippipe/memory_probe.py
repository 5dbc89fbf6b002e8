"""Activation memory of one stage with microbatches in flight, measured (scripts/memory_check.py).

Note [measuring activation memory]: the probe builds one stage, allocates every gradient (zeros), and
then records the memory in use as its baseline: parameters, gradients, and everything else the process
holds. It runs `in_flight` forwards whose autograd graphs are kept (as TC1 lets a node hold them), then
their backwards, and reports the peak minus the baseline: the activations saved for backward plus the
transient working memory of a forward or backward (under checkpointing: the one layer being recomputed).
  - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated()
    at the baseline; exact for tensors, blind to the caching allocator's reserve.
  - CPU: torch keeps no allocator statistics there, so the probe reads the process's resident set: the
    kernel's high-water mark VmHWM from /proc/self/status, reset at the baseline by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0). glibc serves large blocks with mmap and returns them on free,
    so resident memory follows the live tensors; the caller runs the probe in a fresh process with
    MALLOC_MMAP_THRESHOLD_ fixed (scripts/memory_check.py does; the meter also sets it with mallopt),
    because glibc otherwise raises the threshold after the first free and later blocks stay in its heap.
    Resolution: pages (4 KiB); tensors under 64 KiB come from the heap and may be missed.
Python's tracemalloc does not see torch's allocations and is not used.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from skippipe.model import Stage
from skippipe.precision import Precision
from topology.model_spec import ModelSpec

MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}  # fixed: large blocks always mmapped


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}; the CPU probe needs Linux")


def _fix_mmap_threshold() -> None:
    """glibc's mallopt(M_MMAP_THRESHOLD, 64 KiB): large blocks are mmapped and returned on free from now on
    (the same as MALLOC_MMAP_THRESHOLD_ at start-up; Note [measuring activation memory])."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 64 * 1024)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the fresh process's environment variable still applies
        pass


class MemoryMeter:
    """Bytes in use and their peak since `reset()`, on CUDA (allocator) or CPU (resident set)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            _fix_mmap_threshold()

    def reset(self) -> int:
        """Start a new peak; returns the bytes in use now (the baseline)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        return _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024

    @property
    def method(self) -> str:
        return ("torch.cuda.max_memory_allocated minus memory_allocated at the baseline" if self.device.type == "cuda"
                else "resident set: /proc/self/status VmHWM (reset via /proc/self/clear_refs) minus VmRSS at the "
                     "baseline, glibc MALLOC_MMAP_THRESHOLD_ fixed")


def probe_stage(spec: ModelSpec, *, stage_index: int, num_stages: int, batch: int, seq_len: int, in_flight: int,
                checkpointing: bool, precision: Precision, device: torch.device, repeats: int = 1) -> dict:
    """Run `in_flight` forwards of (batch, seq_len) hidden states through one stage, then their backwards.

    Returns bytes (activation_bytes: peak minus baseline, Note [measuring activation memory]), parameter
    count, and seconds per forward+backward of one microbatch (the fastest of `repeats` rounds, each of
    `in_flight` microbatches). Raises OSError on a CPU without /proc (the meter needs Linux).
    """
    stage = Stage(spec, stage_index, num_stages, seed=0, device=device)
    stage.checkpoint_layers = checkpointing
    for p in stage.parameters():
        p.grad = torch.zeros_like(p)  # allocated gradients belong to the baseline, as in training
    generator = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(batch, seq_len, spec.dim, generator=generator).to(device, precision.wire_dtype)
              for _ in range(in_flight)]
    upstream = [torch.randn(batch, seq_len, spec.dim, generator=generator).to(device, precision.wire_dtype)
                for _ in range(in_flight)]
    meter = MemoryMeter(device)
    best = float("inf")
    activation = 0
    # A warm-up microbatch first: one-time costs (kernels, code and caches loaded on first use) are not
    # activations and would otherwise land in the first measured peak.
    with precision.autocast():
        warm = precision.to_wire(stage(precision.from_wire(inputs[0].detach().requires_grad_())))
    torch.autograd.backward(warm, upstream[0])
    del warm
    for _ in range(repeats):
        baseline = meter.reset()
        started = time.perf_counter()
        outputs = []
        for x in inputs:  # three forwards ...
            leaf = x.detach().requires_grad_()
            with precision.autocast():
                outputs.append(precision.to_wire(stage(precision.from_wire(leaf))))
        for out, grad in zip(outputs, upstream):  # ... then three backwards, as TC1 allows
            torch.autograd.backward(out, grad)
        peak = meter.peak()
        elapsed = time.perf_counter() - started
        del outputs
        best = min(best, elapsed / in_flight)
        activation = max(activation, peak - baseline)
    return {"activation_bytes": activation, "baseline_bytes": baseline, "parameters": sum(p.numel() for p in stage.parameters()),
            "seconds_per_microbatch": best, "method": meter.method, "pid": os.getpid()}
