"""Optimiser and schedule builders for the unlearning recipes (``method.optimizer`` / ``method.scheduler``).

The paper presets name these as ``_partial_`` config nodes, so a recipe of the public code (docs/reproduce.md)
is config, not code: AdamW without weight decay on biases and norm weights, and a warm-up + cosine schedule
whose warm-up is given in epochs of the run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import ConfigError
from ..families.base import warmup_cosine


def adamw_no_decay_on_vectors(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                              betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW whose weight decay skips 1-d tensors (biases, norm weights, embeddings' scalars), as timm's
    ``add_weight_decay`` does for ViTs: two parameter groups."""
    params = list(params)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=float(lr), betas=tuple(betas))


def epoch_warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, epochs: float,
                        warmup_epochs: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine` with the warm-up given as ``warmup_epochs`` of a run of ``epochs`` epochs in
    ``total_steps`` steps (linear warm-up, then a half-cosine to zero at the last step)."""
    if not 0 <= warmup_epochs <= epochs:
        raise ConfigError(f"method.scheduler.warmup_epochs={warmup_epochs}: use a value in [0, epochs={epochs}]")
    return warmup_cosine(optimizer, total_steps, round(total_steps * warmup_epochs / epochs))
