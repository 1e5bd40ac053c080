"""Shared fixtures: the real Hydra config, composed and shrunk to tiny sizes."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from i2i_unlearning.runner import build_runner
from i2i_unlearning.unlearning.module import UnlearnModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))

# GAN methods count rounds and stage steps instead of `steps`.
TINY_GAN_METHOD = ["method.rounds=2", "method.unlearn_steps=3", "method.learn_steps=3", "method.batch_size=8",
                   "method.substitute_pool=64", "method.check_samples=32", "method.latent_steps=5"]
TINY_METHOD = {"cascaded": TINY_GAN_METHOD, "fake_label": TINY_GAN_METHOD}


def tiny_overrides(tmp: Path, model: str = "mae", method: str = "ours", extra=(), logger: str = "none",
                   runs: str = "runs") -> list[str]:
    return [
        "data=synthetic", f"model={model}", f"method={method}", f"logger={logger}",
        f"paths.output_dir={tmp / runs}", f"paths.cache_dir={tmp / 'cache'}",
        "model.train.epochs=0.5", "model.train.batch_size=16", "++model.train.warmup_steps=1",
        "metrics.feature_net.epochs=1", "metrics.is_splits=2", "metrics.grid_images=4",
        *TINY_METHOD.get(method, ["method.steps=3", "method.batch_size=8"] if method not in ("original", "retrain")
                         else []),
        "model.size=tiny", *extra,
    ]


def compose_cfg(overrides: list[str]):
    """The real config as ``i2iu`` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """One cache for the session: data shards, feature net and original models are reused."""
    return tmp_path_factory.mktemp("i2iu")


def run_method_steps(model, method, forget, retain, steps=3, lr=3e-3) -> UnlearnModule:
    """A few plain optimiser steps of ``method``'s loss from ``model`` (no Trainer, no data)."""
    module = UnlearnModule(model, method)
    opt = torch.optim.Adam([p for p in module.student.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = method.loss(module.student, module.teacher, forget, retain)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module


def prepared_runner(cfg, run_dir: Path):
    """The config's runner after its check and prepare stages (data ready, nothing trained)."""
    runner = build_runner(cfg, run_dir, "test")
    runner.check()
    runner.data_dir = runner.prepare()
    return runner


def plain_fit():
    """``fit(module, data)`` with the default Trainer config, not resumable (stages trained in tests)."""
    from i2i_unlearning.training import fitter

    return fitter(compose_cfg(["logger=none"]), gradient_clip_val=None)
