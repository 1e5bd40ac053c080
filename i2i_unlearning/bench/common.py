"""Shared helpers of the bench: devices, timing (medians of interleaved repeats) and peak memory."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

MIB = 2**20


def device_of(cfg: DictConfig) -> torch.device:
    """cuda when ``trainer.accelerator`` asks for a GPU and one is there, else cpu."""
    wants_gpu = str(cfg.trainer.accelerator) in ("gpu", "cuda") or (
        str(cfg.trainer.accelerator) == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Seconds of every training step as the Trainer runs it (loss, backward, clipping, optimiser step),
    the device synchronised at both ends; loading the batch falls outside."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._t0 = device, [], 0.0

    def on_train_batch_start(self, *args) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        sync(self.device)
        self.seconds.append(time.perf_counter() - self._t0)


def interleaved_medians(fits: dict[str, Callable[[int], list[float]]], warmup: int, repeats: int,
                        steps: int) -> dict[str, dict]:
    """Median seconds per step of each named ``fit(n)`` (n timed steps, their seconds returned), measured
    side by side: ``warmup`` untimed rounds, then ``repeats`` rounds in which every fit runs ``steps``
    steps, the order rotated each round so no kind always follows the same one."""
    names = list(fits)
    for _ in range(warmup):
        for name in names:
            fits[name](steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name] += fits[name](steps)
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
