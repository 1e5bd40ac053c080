"""Shared helpers of the bench: devices, timing (medians of interleaved repeats) and peak memory."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

MIB = 2**20


def device_of(cfg: DictConfig) -> torch.device:
    """cuda when ``trainer.accelerator`` asks for a GPU and one is there, else cpu."""
    wants_gpu = str(cfg.trainer.accelerator) in ("gpu", "cuda") or (
        str(cfg.trainer.accelerator) == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def autocast(cfg: DictConfig, device: torch.device):
    """The trainer's mixed precision (``trainer.precision`` bf16-mixed / 16-mixed) as an autocast context."""
    precision = str(cfg.trainer.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call (the device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_medians(runs: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                        steps: int) -> dict[str, dict]:
    """Median seconds per call of each named callable, measured side by side: ``warmup`` untimed
    rounds, then ``repeats`` rounds in which every callable runs ``steps`` timed calls, the order
    rotated each round so no callable always follows the same one."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for _ in range(steps):
                times[name].append(timed(runs[name], device))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "n": len(t)}
            for name, t in times.items()}


def _trim() -> None:
    """Hand freed heap pages back to the kernel (glibc ``malloc_trim``), so RSS is live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block, in MiB above the memory in use when it starts.

    GPU: the CUDA caching allocator's peak (``max_memory_allocated``, reset at the start). CPU: the
    kernel's resident high-water mark (VmHWM), reset by writing 5 to ``/proc/self/clear_refs`` after
    ``gc.collect`` and glibc ``malloc_trim``, minus the resident set at the start. The CPU figure
    counts the whole process (Python objects, torch tensors, allocator slack) and not data-loader
    worker processes; ``method`` says which was used, ``mib`` is None where neither is available.
    """

    def __init__(self, device: torch.device):
        self.device, self.mib, self.method = device, None, None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        _trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _status_kib("VmRSS")
            self.method = "VmHWM reset via /proc/self/clear_refs, after gc + malloc_trim"
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / MIB
        elif self._base is not None:
            peak = _status_kib("VmHWM")
            self.mib = None if peak is None else (peak - self._base) / 1024


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b
