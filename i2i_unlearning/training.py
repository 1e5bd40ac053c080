"""Lightning training for every stage: the Trainer from config, resume from its last checkpoint, the RNG state.

The Trainer is the ``conf/trainer`` node (``_target_: lightning.Trainer``); a stage that can be resumed gets
the ``conf/callbacks`` nodes: Lightning's ``ModelCheckpoint`` writes ``<ckpt_dir>/last.ckpt`` every
``every_n_train_steps`` steps, and ``RngState`` puts the global random generators back on resume (the
methods draw noise images from them), so a killed stage ends bit-identical to an uninterrupted one on CPU.
Lightning restores weights, optimiser, scheduler, step counters and the data module's stream positions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .attempts import heartbeat
from .errors import Interrupted, NonFiniteError
from .weights import refused

log = logging.getLogger("i2iu")
LAST = "last.ckpt"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SLURM sends SIGTERM, or SIGUSR1 before the limit
_stop: dict[str, Any] = {"signum": None, "fitting": 0}


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


def _on_stop_signal(signum: int, frame) -> None:
    """Inside a training stage: note the signal, the stage stops after its step (`GracefulStop`); outside one, or
    on a second signal: stop now."""
    again = _stop["signum"] is not None
    _stop["signum"] = signum
    if not _stop["fitting"] or again:
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """While inside: SIGTERM, SIGINT and SIGUSR1 stop a run cleanly (`errors.Interrupted`), a training stage
    first saving its checkpoint. Lightning's own SIGTERM handler, registered while it trains, calls this one
    too. The previous handlers are put back on leaving."""
    _stop["signum"] = None
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop["signum"] = None


class GracefulStop(L.Callback):
    """After a stop signal: save ``last.ckpt`` (when the stage checkpoints) and raise `errors.Interrupted` with
    the stage and step, at the end of the running step, so a relaunch resumes from exactly there."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _stop["fitting"] += 1

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            _stop["fitting"] = max(0, _stop["fitting"] - 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_asked(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_asked(trainer, pl_module)  # a signal during the last step: stop before the next stage

    @staticmethod
    def _stop_if_asked(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = _stop["signum"]
        if signum is None:
            return
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) and getattr(cb, "save_last", False):
                path = Path(cb.dirpath) / LAST
                tmp = path.with_name(f".{LAST}.{os.getpid()}.stop.tmp")
                trainer.save_checkpoint(tmp)
                if trainer.is_global_zero:
                    os.replace(tmp, path)
                log.warning("%s: stopping at step %d, checkpoint saved to %s", signal.Signals(signum).name,
                            trainer.global_step, path)
        raise Interrupted(signum, type(pl_module).__name__, trainer.global_step)


class FiniteLoss(L.Callback):
    """A training loss (the step's output or a logged metric) that is NaN or infinite stops the stage with
    `errors.NonFiniteError` naming the stage and step, before a checkpoint of broken weights is written."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        values = {"loss": loss} if isinstance(loss, torch.Tensor) else {}
        values.update({k: v for k, v in trainer.callback_metrics.items() if "loss" in k})
        for name, value in values.items():
            value = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isfinite(value):
                raise NonFiniteError(f"{type(pl_module).__name__} training: {name} is {value} at step "
                                     f"{trainer.global_step}; lower the learning rate or the loss weights")
        heartbeat()  # the stage clocks (attempts.py) record the time spent so far


def make_trainer(cfg: DictConfig, max_steps: int = -1, logger=False, ckpt_dir: Path | None = None,
                 root: Path | None = None, extra_callbacks: tuple[L.Callback, ...] = (), **overrides) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` for ``max_steps`` optimiser steps; with ``ckpt_dir`` it carries the
    ``cfg.callbacks`` (resume checkpoints written there), and ``extra_callbacks`` in any case. ``logger`` False
    (or None) logs nothing, and nothing is written outside ``root`` / ``ckpt_dir``."""
    callbacks: list[L.Callback] = [FiniteLoss(), GracefulStop(), *extra_callbacks]
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
    try:  # weights_only explicitly: no environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn it off
        trainer.fit(module, data, ckpt_path=str(ckpt) if resume else None, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not resume:
            raise
        raise refused(ckpt, exc, "Delete it to restart this stage from its beginning (relaunching then "
                                 "re-creates it).") from None
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
