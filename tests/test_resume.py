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


def test_feature_network_resumes_bit_exact(tmp_path, monkeypatch):
    """The feature network trains as a LightningModule: killed mid-run, it resumes from its checkpoint and
    ends with the weights of an uninterrupted run; without its shift generator's state it does not."""
    from i2i_unlearning.metrics.features import FeatureNetTraining

    def train(root, kill, restore_generator=True):
        extra = ["metrics.feature_net.epochs=3", "callbacks.model_checkpoint.every_n_train_steps=2"]  # 6 steps
        runner = prepared_runner(compose_cfg(tiny_overrides(root, "mae", "original", extra=extra)), root / "run")
        with monkeypatch.context() as m:
            if not restore_generator:
                m.setattr(FeatureNetTraining, "on_load_checkpoint", lambda self, ckpt: None)
            if kill:
                with monkeypatch.context() as k:
                    _kill_at(k, FeatureNetTraining, 5)
                    with pytest.raises(Killed):
                        runner.scoring_nets()
                assert list(runner.data_dir.glob("feature_net-*-resume/last.ckpt"))
            net = runner.scoring_nets()[0]
        assert not list(runner.data_dir.glob("feature_net-*-resume"))  # removed once trained
        return net.state_dict()

    ref = train(tmp_path / "a", kill=False)
    got = train(tmp_path / "b", kill=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    other = train(tmp_path / "c", kill=True, restore_generator=False)  # control: the check can fail
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_vq_tokenizer_resumes_bit_exact(tmp_path, monkeypatch):
    """The VQ tokenizer stage trains as a LightningModule: killed mid-run, it resumes where its data stream
    stopped; a resume that loses the stream position (the control) ends elsewhere."""
    from i2i_unlearning.data.datamodule import ForgetRetainDataModule
    from i2i_unlearning.families.vqgan import TokenizerTraining

    def train(root, kill, restore_stream=True):
        extra = ["model.train.tokenizer_steps=6", "model.train.epochs=0.1",
                 "callbacks.model_checkpoint.every_n_train_steps=2"]
        runner = prepared_runner(compose_cfg(tiny_overrides(root, "vqgan", "original", extra=extra)), root / "run")
        with monkeypatch.context() as m:
            if not restore_stream:
                m.setattr(ForgetRetainDataModule, "load_state_dict", lambda self, state: None)
            if kill:
                with monkeypatch.context() as k:
                    _kill_at(k, TokenizerTraining, 5)
                    with pytest.raises(Killed):
                        runner.reference("original")
                assert list((root / "cache" / "models").glob("*/tokenizer-resume/last.ckpt"))
            model, _ = runner.reference("original")
        return model.tokenizer.state_dict()

    ref = train(tmp_path / "a", kill=False)
    got = train(tmp_path / "b", kill=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    other = train(tmp_path / "c", kill=True, restore_stream=False)  # control: the check can fail
    assert any(not torch.equal(ref[k], other[k]) for k in ref)
