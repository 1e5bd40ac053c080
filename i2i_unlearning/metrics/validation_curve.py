"""Validation during unlearning: the cheap scores of the student on a held-out validation split every
``method.val_every`` steps (`ValidationCurve`), and unlearning to a criterion (``method.stop_at``,
`StopCriterion`).

Scores are the final evaluation's (`SplitScorer` with the same feature network, the headline task's mask, one
seed per batch): feature-net FID, cosine and class accuracy of the forget and retain validation splits
(``forget_val`` / ``retain_val``, data/prepare.py `prepare_validation`). Each check is a row of
``validation.csv`` in the run dir (rewritten atomically) and a logged point (``val/<split>_<metric>`` at the
global step: W&B line plots). Validation draws from forked random generators, so the training trajectory is the
one of a run without it.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..atomic import write_text
from ..data.datamodule import ForgetRetainDataModule
from ..errors import ConfigError
from ..families.base import Family
from .evaluate import SplitScorer
from .restoration import _generator, batch_seed, seeded

log = logging.getLogger("i2iu")
SPLITS = ("forget", "retain")
METRICS = ("fid", "cos", "class_acc")
COLUMNS = ("step", "seconds", *(f"{s}_{m}" for s in SPLITS for m in METRICS))
TARGETS = ("original", "retrain")
STOP_KEYS = tuple(f"{s}_{m}_x" for s in SPLITS for m in METRICS)
WORSE_IS_HIGHER = {"fid": True, "cos": False, "class_acc": False}


@dataclass(frozen=True)
class StopCriterion:
    """``method.stop_at``: each ``<split>_<metric>_x`` is a ratio to the ``target`` model's validation value. Forget
    metrics must reach it on the forgotten side (FID >= x * target's; cosine, class accuracy <= x * target's),
    retain metrics must stay on the kept side (FID <= x * target's; cosine, class accuracy >= x * target's)."""

    target: str
    ratios: Mapping[str, float]

    def bounds(self, reference: Mapping[str, float]) -> dict[str, tuple[str, float]]:
        """{"<split>_<metric>": (">=" or "<=", bound)} from the target's validation values."""
        out = {}
        for name, x in self.ratios.items():
            split, metric = name.split("_", 1)
            higher = WORSE_IS_HIGHER[metric] == (split == "forget")
            out[name] = (">=" if higher else "<=", x * reference[name])
        return out

    def met(self, row: Mapping[str, float], reference: Mapping[str, float]) -> bool:
        """Whether the scores ``row`` meet every bound."""
        return all(row[k] >= b if op == ">=" else row[k] <= b for k, (op, b) in self.bounds(reference).items())


def stop_criterion(method_cfg: Mapping) -> StopCriterion | None:
    """The criterion of ``method.stop_at`` (None when unset); ConfigError naming the key when it is malformed or
    when ``method.val_every`` (where it is checked) is unset."""
    node = method_cfg.get("stop_at")
    if node is None:
        return None
    if not isinstance(node, Mapping):
        raise ConfigError(f"method.stop_at={node!r}: use a mapping, e.g. {{target: original, forget_fid_x: 1.3, "
                          "retain_fid_x: 1.1}}, or null")
    if method_cfg.get("val_every") is None:
        raise ConfigError("method.stop_at is checked at each validation: set method.val_every=N (validate every N "
                          "steps; add `+` on the command line: +method.val_every=10)")
    node = dict(node)
    target = node.pop("target", "original")
    if target not in TARGETS:
        raise ConfigError(f"method.stop_at.target={target!r}: use one of {list(TARGETS)}")
    for key, value in node.items():
        if key not in STOP_KEYS:
            raise ConfigError(f"method.stop_at.{key}: unknown key; use target and some of {list(STOP_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"method.stop_at.{key}={value!r}: use a ratio > 0 to the target's validation value")
    ratios = {k.removesuffix("_x"): float(v) for k, v in node.items()}
    if not any(k.startswith("forget_") for k in ratios):
        raise ConfigError(f"method.stop_at sets no forget target: add one of {list(STOP_KEYS[:3])}")
    return StopCriterion(target, ratios)


@torch.no_grad()
def validation_scores(model: Family, dm: ForgetRetainDataModule, net, task: str, seed: int, batch_size: int,
                      device: torch.device) -> dict[str, float]:
    """{"<split>_<metric>"}: ``model`` restores the validation splits under ``task``'s mask (each batch under its
    own seed, the global generators forked) and `SplitScorer` scores them."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    scores = {}
    try:
        for split in SPLITS:
            scorer = SplitScorer(net, device=device)
            for i, batch in enumerate(dm.eval_batches(f"{split}_val", task, batch_size=batch_size)):
                x, m = batch["image"].to(device), batch["mask"].to(device)
                s = batch_seed(seed, "val", task, split, i)
                with seeded(s, device):
                    out = model.restore(x, m, generator=_generator(s, device))
                scorer.score(out, x, batch["label"])
            computed = scorer.compute()
            scores.update({f"{split}_{k}": float(computed[k]) for k in METRICS})
    finally:
        for module, mode in modes.items():
            module.training = mode
    return scores


class ValidationCurve(L.Callback):
    """Scores the student at step 0, every ``every`` steps and at the last step (`validation_scores`); writes
    ``csv_path`` and logs each check; with ``criterion`` stops the stage once it is met, against the validation
    scores of ``reference`` (the criterion's target model).

    ``seconds`` of a row is the stage's training time before the check, validation excluded; it and the
    validation time are part of the checkpoint, and a resumed stage keeps the rows up to its step (no
    duplicates, none lost)."""

    def __init__(self, dm: ForgetRetainDataModule, net, task: str, every: int, csv_path: Path, seed: int,
                 batch_size: int, criterion: StopCriterion | None = None, reference: Family | None = None):
        if criterion is not None and reference is None:
            raise ValueError("a stop criterion needs its reference model")
        self.dm, self.net, self.task, self.every, self.csv_path = dm, net, task, int(every), Path(csv_path)
        self.seed, self.batch_size, self.criterion, self.reference = seed, batch_size, criterion, reference
        self.rows: list[dict[str, float]] = []
        self.reference_scores: dict[str, float] = {}
        self.stop: dict[str, Any] | None = None  # {"step", "seconds"} once met
        self._train_s = self._val_s = 0.0  # up to the attempt's start (from the checkpoint)
        self._t0 = self._attempt_val_s = 0.0

    # -- time
    def train_seconds(self) -> float:
        """Training seconds of the stage so far, validation excluded."""
        return self._train_s + time.perf_counter() - self._t0 - self._attempt_val_s

    @property
    def val_s(self) -> float:
        """Seconds spent validating (the criterion's reference scores included)."""
        return self._val_s + self._attempt_val_s

    def state_dict(self) -> dict[str, float]:
        return {"train_s": self.train_seconds(), "val_s": self.val_s}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._train_s, self._val_s = float(state_dict["train_s"]), float(state_dict["val_s"])

    # -- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._attempt_val_s = time.perf_counter(), 0.0
        step = trainer.global_step
        self.rows = [r for r in self._read() if r["step"] <= step]  # a resumed stage redoes the later checks
        if trainer.is_global_zero:
            self._write()
        if self.criterion is not None:
            t0 = time.perf_counter()
            device = pl_module.device
            home = next(self.reference.parameters()).device
            self.reference_scores = self._scores(self.reference.to(device), device)
            self.reference.to(home)
            self._attempt_val_s += time.perf_counter() - t0
        if self.rows and self.rows[-1]["step"] == step:  # resumed where a check was done
            self._judge(trainer, self.rows[-1])
        elif step % self.every == 0:  # step 0: the starting model
            self._check(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = step % self.every == 0 or step == trainer.max_steps
        if due and (not self.rows or self.rows[-1]["step"] < step):
            self._check(trainer, pl_module)

    # -- one check
    def _scores(self, model: Family, device: torch.device) -> dict[str, float]:
        return validation_scores(model, self.dm, self.net, self.task, self.seed, self.batch_size, device)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds, t0 = self.train_seconds(), time.perf_counter()
        row = {"step": trainer.global_step, "seconds": seconds, **self._scores(pl_module.student, pl_module.device)}
        self.rows.append(row)
        if trainer.is_global_zero:
            self._write()
        for logger in trainer.loggers:
            logger.log_metrics({f"val/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        self._attempt_val_s += time.perf_counter() - t0
        self._judge(trainer, row)

    def _judge(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        if self.criterion is None or self.stop is not None:
            return
        met = trainer.strategy.reduce_boolean_decision(self.criterion.met(row, self.reference_scores), all=True)
        if met:
            self.stop = {"step": int(row["step"]), "seconds": float(row["seconds"])}
            trainer.should_stop = True
            log.info("stop criterion met at step %d (%.1f s of training)", row["step"], row["seconds"])

    # -- the file
    def _read(self) -> list[dict[str, float]]:
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="") as f:
            return [{k: int(v) if k == "step" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.csv_path, buffer.getvalue())

    # -- the record
    def record(self, cap: int) -> dict[str, Any]:
        """What metrics.json keeps of the curve and, with a criterion, whether it was met within ``cap`` steps."""
        out: dict[str, Any] = {"val_every": self.every, "val_checks": len(self.rows), "val_s": self.val_s}
        if self.criterion is None:
            return out
        met = self.stop is not None
        bounds = self.criterion.bounds(self.reference_scores)
        return {**out, "stop_met": met, "stop_step": self.stop["step"] if met else None,
                "stop_s": self.stop["seconds"] if met else None,
                "stop_result": (f"met at step {self.stop['step']} after {self.stop['seconds']:.1f} s" if met
                                else f"not met within {cap} steps"),
                "stop_target": self.criterion.target,
                "stop_bounds": {k: f"{op} {b:.6g}" for k, (op, b) in bounds.items()},
                "stop_reference": {k: self.reference_scores[k] for k in bounds}}
