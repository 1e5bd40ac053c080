"""Run directories keyed by a hash of the config that matters (``run_hash_exclude`` in conf/config.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .hashing import stable_hash
from .names import check_name, check_seed


def _drop(node: dict, path: list[str]) -> None:
    head, *rest = path
    if not rest:
        node.pop(head, None)
    elif isinstance(node.get(head), dict):
        _drop(node[head], rest)


def semantic_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys of ``cfg.run_hash_exclude`` (dotted paths, ``node`` or
    ``node.leaf``...): those change where or how a run executes, not what it computes."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in cfg.get("run_hash_exclude") or []:
        _drop(c, key.split("."))
    return c


def trainer_identity(cfg: DictConfig) -> dict:
    """The trainer settings that change results (``cfg.trainer`` less its ``run_hash_exclude`` keys): part of
    every cached model's key that the trainer trains."""
    return semantic_config(cfg).get("trainer") or {}


def config_hash(cfg: DictConfig) -> str:
    """The hash that names a run dir and tells a finished run of the same config."""
    return stable_hash(semantic_config(cfg))


def check_run_names(cfg: DictConfig) -> None:
    """The names and seed that become path components of a run (its dir, its cached models and data), checked
    before any directory is made (ConfigError naming the key)."""
    for key in ("model.name", "method.name", "data.name"):
        check_name(OmegaConf.select(cfg, key), key)
    if OmegaConf.select(cfg, "data.source.name") is not None:
        check_name(cfg.data.source.name, "data.source.name")
    check_seed(cfg.seed, "seed")


def run_dir(cfg: DictConfig) -> Path:
    """<output_dir>/<family>-<method>-<dataset>-s<seed>-<hash> (names checked: `check_run_names`)."""
    check_run_names(cfg)
    name = f"{cfg.model.name}-{cfg.method.name}-{cfg.data.name}-s{cfg.seed}-{config_hash(cfg)[:8]}"
    return Path(cfg.paths.output_dir) / name


def finished(run: Path, chash: str) -> dict | None:
    """The metrics of a finished ok run with the same config hash, else None."""
    f = run / "metrics.json"
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return m if m.get("status") == "ok" and m.get("config_hash") == chash else None
