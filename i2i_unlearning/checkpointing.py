"""Resumable training stages: periodic atomic checkpoints, and the random state that goes with them.

A stage (original / retrain training, unlearning) that is killed resumes from ``<dir>/last.ckpt`` and
ends bit-identical to an uninterrupted run on CPU: Lightning restores weights, optimiser, scheduler and
step counters; the data module restores its stream positions; ``RngState`` restores the global random
generators (the methods draw noise images from them). The checkpoint dir is removed once the stage ends.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("i2iu")
LAST = "last.ckpt"


def rng_states() -> dict[str, Any]:
    """The global torch / numpy / python RNG states, as types a ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RngState(L.Callback):
    """Saves the global RNG states with each checkpoint and puts them back when training resumes."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("rng")

    def on_train_batch_start(self, *args: Any) -> None:
        # Applied just before the first resumed step: creating the data loader iterator draws a seed
        # from the global generator, which the uninterrupted run did before its checkpoint.
        if self._loaded is not None:
            set_rng_states(self._loaded)
            self._loaded = None


class PeriodicCheckpoint(L.Callback):
    """Every ``every_n_steps`` optimiser steps, write ``<dirpath>/last.ckpt`` atomically (tmp + rename)."""

    def __init__(self, dirpath: Path, every_n_steps: int) -> None:
        self.dirpath, self.every_n_steps = Path(dirpath), int(every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps < 1 or step % self.every_n_steps or step >= (trainer.max_steps or 0):
            return
        tmp = self.dirpath / f".{LAST}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)  # collective: rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.dirpath / LAST)
        trainer.strategy.barrier("i2iu-checkpoint")


def resume_path(dirpath: Path) -> Path | None:
    """The checkpoint an interrupted stage left in ``dirpath``, if any."""
    path = Path(dirpath) / LAST
    return path if path.is_file() else None


def callbacks(dirpath: Path, every_n_steps: int) -> list[L.Callback]:
    """The callbacks that make a stage resumable from ``dirpath``."""
    return [RngState(), PeriodicCheckpoint(dirpath, every_n_steps)]


def fit_resumable(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
                  dirpath: Path) -> None:
    """``trainer.fit``, resumed from ``dirpath`` when an earlier attempt left a checkpoint there."""
    ckpt = resume_path(dirpath)
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero:
        shutil.rmtree(dirpath, ignore_errors=True)
