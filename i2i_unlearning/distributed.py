"""Evaluation across DDP ranks.

Training is spread over ranks by Lightning; evaluation is spread here. Every rank walks the same
deterministic list of eval batches, computes its share (batch i on rank i % world size: restoration and
feature passes, the expensive part), and all ranks then receive every batch's small result in batch order.
Scores are folded in that one order whatever the world size, so a 2-rank FID equals the 1-rank FID.

`launch` starts the ranks for evaluation when none exist: after a `ddp_spawn` fit (the strategy that keeps
a Hydra multirun cell one process) the ranks are gone, so it spawns them again through Lightning Fabric.
Under plain `ddp` (SLURM, torchrun) the ranks run the whole runner and are still joined after the fit.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

log = logging.getLogger("i2iu")


def world() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ordered_map(fn: Callable[[int, Any], Any], items: Iterable) -> Iterator:
    """``fn(i, item)`` for every item, spread over the ranks, yielded on every rank in item order.

    ``items`` must be the same sequence on every rank (eval batches are); results must be picklable and
    small (feature vectors, scores), as every rank receives all of them.
    """
    rank, size = world()
    numbered = enumerate(items)
    if size == 1:
        for i, item in numbered:
            yield fn(i, item)
        return
    while chunk := list(islice(numbered, size)):
        mine = fn(*chunk[rank]) if rank < len(chunk) else None
        results: list = [None] * size
        dist.all_gather_object(results, mine)
        yield from results[: len(chunk)]
        if len(chunk) < size:
            return


def _on_rank(fabric, fn: Callable, args: tuple, result_file: str) -> None:
    # Rank 0's result goes through a file: Lightning's return queue is read only after the ranks exit, so a
    # large result would block the pipe, and tensors in it would be shared by already closed descriptors.
    result = fn(fabric.device, *args)
    if fabric.global_rank == 0:
        Path(result_file).write_bytes(pickle.dumps(result))


def launch(trainer: DictConfig, fn: Callable[..., Any], *args) -> Any:
    """``fn(device, *args)`` on every rank of ``trainer`` (the Trainer config); returns rank 0's result.

    Inside already joined ranks it just runs; a non-DDP config runs one process; for DDP it joins (or, with
    a spawn strategy, starts) the ranks with Lightning Fabric.
    """
    if world()[1] > 1:
        return fn(_joined_device(), *args)
    strategy = str(trainer.get("strategy", "auto"))
    if not strategy.startswith("ddp"):
        accelerator = str(trainer.get("accelerator", "cpu"))
        gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return fn(torch.device("cuda" if gpu else "cpu"), *args)
    import lightning as L

    fabric = L.Fabric(accelerator=trainer.get("accelerator", "auto"), devices=trainer.get("devices", 1),
                      num_nodes=int(trainer.get("num_nodes", 1)), strategy=strategy)
    if fabric.world_size == 1:
        return fn(fabric.device, *args)
    if "spawn" in strategy:
        log.info("evaluating on %d ranks (%s)", fabric.world_size, strategy)
        with tempfile.TemporaryDirectory(prefix="i2iu-eval-") as tmp:
            result_file = Path(tmp) / "rank0.pkl"
            fabric.launch(_on_rank, fn, args, str(result_file))
            return pickle.loads(result_file.read_bytes())
    fabric.launch()  # ranks started outside (SLURM, torchrun): join them
    return fn(fabric.device, *args)


def _joined_device() -> torch.device:
    """This rank's device in a joined process group: its GPU under NCCL (set by Lightning), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
