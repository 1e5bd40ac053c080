"""Kill a stage mid-training and relaunch it: the result equals an uninterrupted run, bit for bit (CPU)."""

import json

import pytest
import torch
from conftest import compose_cfg, prepared_runner, tiny_overrides

from i2i_unlearning import cli, training
from i2i_unlearning.families.base import Family
from i2i_unlearning.runs import run_dir
from i2i_unlearning.unlearning.module import UnlearnModule


class Killed(RuntimeError):
    """Stands in for a node failure / SLURM preemption."""


def _kill_at(monkeypatch, cls, step: int):
    """Make ``cls.training_step`` die when the trainer reaches global step ``step`` (once)."""
    original = cls.training_step
    state = {"armed": True}

    def dying(self, batch, batch_idx):
        if state["armed"] and self.trainer.global_step == step:
            state["armed"] = False
            raise Killed(f"killed at step {step}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(cls, "training_step", dying)


def _run(tmp, runs, extra=()):
    cfg = compose_cfg(tiny_overrides(tmp, "mae", "ours", runs=runs, extra=[
        "method.steps=6", "callbacks.model_checkpoint.every_n_train_steps=2", "method.noise=uniform", *extra]))
    cli.main(cfg)
    run = run_dir(cfg)
    return run, torch.load(run / "checkpoint.pt", weights_only=True), json.loads((run / "metrics.json").read_text())


def _killed_then_resumed(tmp, monkeypatch, runs):
    with monkeypatch.context() as m:
        _kill_at(m, UnlearnModule, 5)
        with pytest.raises(Killed):
            _run(tmp, runs)
    cfg_run = next((tmp / runs).glob("mae-ours-*"))
    assert (cfg_run / "resume" / "last.ckpt").is_file()  # the step-4 checkpoint survived the crash
    assert json.loads((cfg_run / "metrics.json").read_text())["status"] == "failed"
    return _run(tmp, runs)


def test_unlearning_resumes_bit_exact(shared_tmp, monkeypatch):
    _, ref_w, ref_m = _run(shared_tmp, "resume_ref")
    run, w, m = _killed_then_resumed(shared_tmp, monkeypatch, "resume_killed")
    assert not (run / "resume").exists()  # cleaned up once the stage finished
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)
    assert m["metrics"] == ref_m["metrics"]

    # control: without the restored random state the noise images differ, and so do the weights
    monkeypatch.setattr(training.RngState, "on_train_batch_start", lambda *a: None)
    _, w2, _ = _killed_then_resumed(shared_tmp, monkeypatch, "resume_no_rng")
    assert any(not torch.equal(ref_w[k], w2[k]) for k in ref_w)


def test_original_training_resumes_bit_exact(tmp_path, monkeypatch):
    def train(root, kill):
        extra = ["model.train.epochs=1", "callbacks.model_checkpoint.every_n_train_steps=2"]
        cfg = compose_cfg(tiny_overrides(root, "mae", "original", extra=extra))
        runner = prepared_runner(cfg, root / "run")
        if kill:
            with monkeypatch.context() as m:
                _kill_at(m, Family, 3)
                with pytest.raises(Killed):
                    runner.reference("original")
            assert list((root / "cache" / "models").glob("*/resume/last.ckpt"))
        model, meta = runner.reference("original")
        return model.state_dict(), meta

    ref, meta = train(tmp_path / "a", kill=False)
    assert meta["steps"] >= 4
    got, _ = train(tmp_path / "b", kill=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def _stage_resumes_bit_exact(tmp_path, monkeypatch, model, extra, stage, run, control, kill_step=5):
    """A stage killed at step ``kill_step`` (checkpoints every 2) and relaunched ends with the weights of an
    uninterrupted run, and leaves no checkpoint behind; with ``control`` patched in (what resume restores,
    dropped) it does not."""
    def train(root, kill, patch=None):
        extra_ = [*extra, "callbacks.model_checkpoint.every_n_train_steps=2"]
        runner = prepared_runner(compose_cfg(tiny_overrides(root, model, "original", extra=extra_)), root / "run")
        with monkeypatch.context() as m:
            if patch:
                m.setattr(*patch)
            if kill:
                with monkeypatch.context() as k:
                    _kill_at(k, stage, kill_step)
                    with pytest.raises(Killed):
                        run(runner)
                assert list(root.rglob("*resume/last.ckpt"))
            weights = run(runner)
        assert not list(root.rglob("*resume/last.ckpt"))  # removed once the stage ended
        return weights

    ref = train(tmp_path / "a", kill=False)
    got = train(tmp_path / "b", kill=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    other = train(tmp_path / "c", kill=True, patch=control)  # control: the check can fail
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_feature_network_resumes_bit_exact(tmp_path, monkeypatch):
    """The feature network trains as a LightningModule; its shift generator's state is in the checkpoint."""
    from i2i_unlearning.metrics.features import FeatureNetTraining

    _stage_resumes_bit_exact(tmp_path, monkeypatch, "mae", ["metrics.feature_net.epochs=3"],  # 6 steps
                             FeatureNetTraining, lambda runner: runner.scoring_nets()[0].state_dict(),
                             control=(FeatureNetTraining, "on_load_checkpoint", lambda self, ckpt: None))


def test_vq_tokenizer_resumes_bit_exact(tmp_path, monkeypatch):
    """The VQ tokenizer stage trains as a LightningModule and resumes where its data stream stopped."""
    from i2i_unlearning.data.datamodule import ForgetRetainDataModule
    from i2i_unlearning.families.vqgan import TokenizerTraining

    extra = ["model.train.tokenizer_steps=6", "model.train.epochs=0.1"]
    _stage_resumes_bit_exact(tmp_path, monkeypatch, "vqgan", extra, TokenizerTraining,
                             lambda runner: runner.reference("original")[0].tokenizer.state_dict(),
                             control=(ForgetRetainDataModule, "load_state_dict", lambda self, state: None))


@pytest.mark.slow
def test_gan_reference_resumes_bit_exact(tmp_path, monkeypatch):
    """The DCGAN trains as a LightningModule (manual optimisation, two optimiser steps per batch) and its
    batch stream restarts after the last batch trained."""
    from i2i_unlearning.families.gan import DCGAN, StreamData

    _stage_resumes_bit_exact(tmp_path, monkeypatch, "gan", ["model.train.epochs=0.6"], DCGAN,  # 6 batches
                             lambda runner: runner.reference("original")[0].state_dict(),
                             control=(StreamData, "load_state_dict", lambda self, state: None),
                             kill_step=6)  # two optimiser steps a batch: killed in the 4th batch
