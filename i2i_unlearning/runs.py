"""Run directories keyed by a hash of the config that matters (``run_hash_exclude`` in conf/config.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .hashing import stable_hash


def semantic_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys of ``cfg.run_hash_exclude`` (``node`` or ``node.leaf``):
    those change where or how a run executes, not what it computes."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in cfg.get("run_hash_exclude") or []:
        node, *rest = key.split(".")
        if not rest:
            c.pop(node, None)
        elif isinstance(c.get(node), dict):
            c[node].pop(rest[0], None)
    return c


def config_hash(cfg: DictConfig) -> str:
    """The hash that names a run dir and tells a finished run of the same config."""
    return stable_hash(semantic_config(cfg))


def run_dir(cfg: DictConfig) -> Path:
    """<output_dir>/<family>-<method>-<dataset>-s<seed>-<hash>."""
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
