"""Lightning training for every stage: the Trainer from config, resume from its last checkpoint, the RNG state.

The Trainer is the ``conf/trainer`` node (``_target_: lightning.Trainer``); a stage that can be resumed gets
the ``conf/callbacks`` nodes: Lightning's ``ModelCheckpoint`` writes ``<ckpt_dir>/last.ckpt`` every
``every_n_train_steps`` steps, and ``RngState`` puts the global random generators back on resume (the
methods draw noise images from them), so a killed stage ends bit-identical to an uninterrupted one on CPU.
Lightning restores weights, optimiser, scheduler, step counters and the data module's stream positions.
"""

from __future__ import annotations

import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

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


def make_trainer(cfg: DictConfig, max_steps: int = -1, logger=False, ckpt_dir: Path | None = None,
                 root: Path | None = None, **overrides) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` for ``max_steps`` optimiser steps; with ``ckpt_dir`` it carries the
    ``cfg.callbacks`` (resume checkpoints written there). ``logger`` False (or None) logs nothing, and
    nothing is written outside ``root`` / ``ckpt_dir``."""
    callbacks = []
    if ckpt_dir is not None:
        for node in (cfg.get("callbacks") or {}).values():
            callbacks.append(instantiate(node, dirpath=str(ckpt_dir)) if "dirpath" in node else instantiate(node))
    settings = {"max_steps": max_steps, "max_epochs": -1, "logger": logger or False, "callbacks": callbacks,
                "enable_checkpointing": any(isinstance(c, L.pytorch.callbacks.Checkpoint) for c in callbacks),
                "enable_model_summary": False, "enable_progress_bar": sys.stderr.isatty(),
                "default_root_dir": str(root or ckpt_dir or cfg.paths.output_dir)}
    return instantiate(cfg.trainer, **{**settings, **overrides})


def fit_resumable(trainer: L.Trainer, module: L.LightningModule, data, ckpt_dir: Path) -> None:
    """``trainer.fit``, resumed from ``ckpt_dir/last.ckpt`` when an earlier attempt left one (loaded with
    ``weights_only=True``); the checkpoints are removed once the stage ends."""
    ckpt = Path(ckpt_dir) / LAST
    resume = ckpt.is_file()
    if resume:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, data, ckpt_path=str(ckpt) if resume else None, weights_only=True)
    if trainer.is_global_zero:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def fitter(cfg: DictConfig, ckpt_dir: Path | None = None, **overrides):
    """``fit(module, data)``: one pass over a stage's own stream (``max_epochs=1``) with the Trainer of
    ``cfg`` (``overrides`` replace its settings), resumable from ``ckpt_dir`` when one is given."""
    def fit(module: L.LightningModule, data) -> None:
        trainer = make_trainer(cfg, max_epochs=1, ckpt_dir=ckpt_dir, **overrides)
        if ckpt_dir is None:
            trainer.fit(module, data)
        else:
            fit_resumable(trainer, module, data, ckpt_dir)

    return fit
