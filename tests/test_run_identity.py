"""Run identity: every trainer setting that changes results is part of the run hash and of the cached reference
models' keys; only the keys of ``run_hash_exclude`` (where or how a run executes) are left out."""

import json

import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.runner import build_runner
from i2i_unlearning.runs import config_hash, run_dir

EXCLUDED = ["trainer.devices=2", "trainer.num_nodes=2", "trainer.strategy=ddp_spawn", "trainer.accelerator=gpu",
            "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false", "logger=csv",
            "callbacks.model_checkpoint.every_n_train_steps=7", "metrics.eval_batch_size=3", "paths.weights_dir=w"]
RESULT_CHANGING = ["trainer.gradient_clip_val=0.001", "trainer.precision=bf16-mixed",
                   "+trainer.accumulate_grad_batches=2", "+trainer.deterministic=true", "+trainer.benchmark=true"]


def _cfg(tmp, *extra, model="mae"):
    return compose_cfg(tiny_overrides(tmp, model, "ours" if model != "gan" else "finetune", extra=list(extra)))


def _reference_key(tmp, cfg, kind="original"):
    runner = build_runner(cfg, tmp / "run", "x")
    if cfg.model.name == "gan":  # what GANRunner.reference_key reads: the training images and the manifest
        runner.manifest = {"image_size": 32}
        runner.data = {s: (torch.zeros(1, 1, 32, 32), torch.zeros(1), [f"{s}-0"])
                       for s in ("forget_train", "retain_train")}
    else:  # I2IRunner.reference_key reads the prepared data's manifest
        runner.data_dir = tmp / "data"
        runner.data_dir.mkdir(exist_ok=True)
        (runner.data_dir / "manifest.json").write_text(json.dumps({"config_hash": "d"}))
    return runner.reference_key(kind)


@pytest.mark.parametrize("override", EXCLUDED)
def test_an_excluded_key_reuses_the_finished_run(tmp_path, override):
    base = _cfg(tmp_path)
    run = run_dir(base)
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "config_hash": config_hash(base)}))
    other = _cfg(tmp_path, override)
    assert run_dir(other) == run
    cli.main(other)  # skipped: nothing is written
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]
    assert _reference_key(tmp_path, other) == _reference_key(tmp_path, base)


@pytest.mark.parametrize("override", RESULT_CHANGING)
def test_a_trainer_setting_that_changes_results_makes_a_new_run_and_reference(tmp_path, override):
    base, other = _cfg(tmp_path), _cfg(tmp_path, override)
    assert config_hash(other) != config_hash(base) and run_dir(other) != run_dir(base)
    for kind in ("original", "retrain"):
        assert _reference_key(tmp_path, other, kind) != _reference_key(tmp_path, base, kind)


def test_gan_reference_key_follows_precision_not_clipping(tmp_path):
    """The GAN's trainer never clips (manual optimisation), so only settings it uses key its references."""
    base = _cfg(tmp_path, model="gan")
    assert _reference_key(tmp_path, _cfg(tmp_path, "trainer.precision=bf16-mixed", model="gan")) \
        != _reference_key(tmp_path, base)
    assert _reference_key(tmp_path, _cfg(tmp_path, "trainer.gradient_clip_val=0.001", model="gan")) \
        == _reference_key(tmp_path, base)
    assert _reference_key(tmp_path, _cfg(tmp_path, "trainer.devices=4", model="gan")) == _reference_key(tmp_path, base)
