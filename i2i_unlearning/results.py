"""The metrics.json schema: one `RunResult` per run dir, written in one place (`write_result`).

``metrics`` holds the scores (``<split>_<metric>``, ``<task>_<split>_<metric>``), ``floors`` the levels
they are read against; ``extra`` holds what a runner variant records besides (the task, the start
model's pre-training figures, the GAN's reference models and criterion; with ``method.val_every`` the
validation curve's ``val_every``, ``val_checks``, ``val_s``, ``unlearn_steps`` and, with ``method.stop_at``,
``stop_met``, ``stop_step``, ``stop_s``, ``stop_result``: metrics/validation_curve.py) and is written at the
top level.
The report (report/summary.py) reads these files back into one table.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .atomic import write_json

STATUSES = ("ok", "failed", "interrupted")  # the report adds "incomplete": config.yaml, no metrics.json


@dataclass
class RunResult:
    """One run's outcome: identity, status, timings and scores."""

    family: str
    method: str
    dataset: str
    seed: int
    status: str
    config_hash: str
    error: str | None = None
    unlearn_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)
    feature_net_test_acc: float | None = None
    original_train_s: float | None = None
    traceback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r}: use one of {STATUSES}")

    @classmethod
    def failed(cls, cfg: DictConfig, chash: str, exc: BaseException) -> RunResult:
        """The row of a run that raised ``exc``: its error and traceback, no scores."""
        return cls(family=cfg.model.name, method=cfg.method.name, dataset=cfg.data.name, seed=cfg.seed,
                   status="failed", config_hash=chash, error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc())

    @classmethod
    def interrupted(cls, cfg: DictConfig, chash: str, exc: BaseException) -> RunResult:
        """The row of a run a signal stopped (``errors.Interrupted``): where it stopped; a relaunch resumes it."""
        return cls(family=cfg.model.name, method=cfg.method.name, dataset=cfg.data.name, seed=cfg.seed,
                   status="interrupted", config_hash=chash, error=f"interrupted by {exc}",
                   extra={"stage": getattr(exc, "stage", None), "step": getattr(exc, "step", None)})

    def to_json(self) -> dict[str, Any]:
        """The metrics.json object: the fields, with ``extra`` at the top level and unset optionals dropped."""
        data = asdict(self)
        extra = data.pop("extra")
        if data["traceback"] is None:
            del data["traceback"]
        return {**data, **extra}


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    """``run_dir/metrics.json`` (atomically)."""
    write_json(Path(run_dir) / "metrics.json", result)
