"""Run directories keyed by a hash of the config that matters, and atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that change where or how a run executes, not what it computes.
NON_SEMANTIC_KEYS = ("trainer", "logger", "paths", "hydra", "resume", "perf", "metrics.eval_batch_size",
                     "metrics.tsne_points")

# Keys added after runs were recorded, left out of the hash while they hold the default that means
# "as before", so existing run dirs and caches keep their names.
OMITTED_AT_DEFAULT = {"model.pretrained": None, "model.pretrained_tokenizer": None, "metrics.features": "default",
                      "metrics.embedding": "features", "metrics.inception_weights": None,
                      "metrics.clip_weights": None, "metrics.clip_model": "ViT-H-14"}


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hex digest of a canonical JSON encoding of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def semantic_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys that do not change results."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_SEMANTIC_KEYS:
        node, *rest = key.split(".")
        if not rest:
            c.pop(node, None)
        elif isinstance(c.get(node), dict):
            c[node].pop(rest[0], None)
    for key, default in OMITTED_AT_DEFAULT.items():
        node, leaf = key.split(".")
        if isinstance(c.get(node), dict) and leaf in c[node] and c[node][leaf] == default:
            c[node].pop(leaf)
    return c


def config_hash(cfg: DictConfig) -> str:
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
