"""Validation before compute: every config value that can be wrong is checked before any data or model work,
each failure a ConfigError naming the key (``Runner.check`` and the ``i2iu`` entry point call `check_config`).

Three kinds of checks: numbers are finite and in range (rules by key name, `RULES`); names that become paths are
safe (`runs.check_run_names`); files the config names exist, and the class split is consistent with the source
(without loading any image).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from .data.prepare import check_split_config, config_kwargs
from .errors import ConfigError
from .metrics.validation_curve import stop_criterion
from .runs import check_run_names, semantic_config
from .unlearning.methods import CONSTRUCTIONS


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)


def _ratio_range(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_number(lambda x: 0 <= x <= 1)(x) for x in v) and v[0] <= v[1]


# (test on a leaf key name, test on its value, what is expected); the first rule whose name test matches applies.
# A null value is not checked here (a stage that needs the value says so).
RULES: list[tuple[Callable[[str], bool], Callable[[Any], bool], str]] = [
    (lambda k: k == "val_every", _int_at_least(1), "an integer >= 1 (steps between validations), or null"),
    (lambda k: k == "val_per_class", _int_at_least(2), "an integer >= 2 (FID needs two images)"),
    (lambda k: k == "warmup_steps", _int_at_least(0), "an integer >= 0"),
    (lambda k: k.endswith("steps") and k != "num_sanity_val_steps", _int_at_least(1), "an integer >= 1"),
    (lambda k: k.endswith("batch_size") or k == "accumulate_grad_batches", _int_at_least(1), "an integer >= 1"),
    (lambda k: k in ("rounds", "is_splits", "grid_images", "check_samples", "substitute_pool", "samples",
                     "image_size", "channels", "shard_size", "patch_size", "eval_limit") or k.endswith("_timesteps"),
     _int_at_least(1), "an integer >= 1"),
    (lambda k: k == "num_workers", _int_at_least(0), "an integer >= 0"),
    (lambda k: k == "seed" or k.endswith("_seed"), _int_at_least(0), "an integer >= 0"),
    (lambda k: k == "lr" or k.endswith("_lr"), _number(lambda v: v > 0), "a number > 0"),
    (lambda k: k == "epochs" or k.endswith("_epochs"), _number(lambda v: v > 0), "a number > 0"),
    (lambda k: k in ("alpha", "weight_decay", "gradient_clip_val"), _number(lambda v: v >= 0), "a number >= 0"),
    (lambda k: k.endswith("_share"), _number(lambda v: 0 <= v <= 1), "a number in [0, 1]"),
    (lambda k: k == "mask_ratio", _ratio_range, "[low, high] with 0 <= low <= high <= 1"),
    (lambda k: k == "construction", lambda v: v in CONSTRUCTIONS, f"one of {list(CONSTRUCTIONS)}"),
]
NOT_VALUES = ("hydra", "run_hash_exclude", "sizes")  # nodes that hold no run values (sizes: read through the keys)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in NOT_VALUES:
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) or (isinstance(value, list) and key != "mask_ratio"):
                yield from _leaves(value, path)
            else:
                yield path, value
    elif isinstance(node, list):
        for i, value in enumerate(node):
            path = f"{prefix}[{i}]"
            yield from _leaves(value, path) if isinstance(value, (dict, list)) else [(path, value)]


def check_values(cfg: DictConfig) -> None:
    """Every number of the run's config is finite, and in range where `RULES` name its key."""
    for path, value in _leaves(semantic_config(cfg)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value}: use a finite number")
        if value is None:
            continue
        leaf = path.rsplit(".", 1)[-1]
        for matches, valid, expected in RULES:
            if matches(leaf):
                if not valid(value):
                    raise ConfigError(f"{path}={value!r}: use {expected}")
                break


def check_files(cfg: DictConfig) -> None:
    """Every weights file the model config names exists (the metrics' files: `metrics.models.check_metrics_config`)."""
    for key in ("pretrained", "pretrained_tokenizer"):
        value = cfg.model.get(key)
        if value is not None and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"model.{key}={value}: no such file or folder (set it to a local weights file, or null "
                              "to train the model here)")


def check_data(cfg: DictConfig) -> None:
    """The class (or item) split against the source's class list and the size settings, without loading images."""
    source = instantiate(cfg.data.source)
    try:
        check_split_config(source, **config_kwargs(cfg.data))
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith("data.") else f"data: {message}") from None


def check_config(cfg: DictConfig) -> None:
    """All of the above, cheapest first: names, numbers, the stop criterion, files, data split."""
    check_run_names(cfg)
    check_values(cfg)
    stop_criterion(cfg.method)  # method.stop_at: its keys, and method.val_every where it is checked
    check_files(cfg)
    check_data(cfg)

