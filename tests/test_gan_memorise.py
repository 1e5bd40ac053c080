"""GAN reference training options: forget_repeat (memorisation of the forget items by the original) and the
patience rule (train until the validation FID stops improving)."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_cfg, prepared_runner, tiny_overrides

from i2i_unlearning import cli, gan_runner
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.runs import run_dir


def _cfg(tmp, method="original", extra=()):
    return compose_cfg(tiny_overrides(tmp, "gan", method, extra=["data=synthetic_items", *extra]))


# ---- forget_repeat ----------------------------------------------------------------------------------------
def test_forget_repeat_enlarges_the_originals_forget_rows_only(shared_tmp, tmp_path):
    plain = prepared_runner(_cfg(shared_tmp), tmp_path / "a")
    repeated = prepared_runner(_cfg(shared_tmp, extra=["+model.train.forget_repeat=3"]), tmp_path / "b")
    forget = set(plain.data["forget_train"][2])
    n_forget, n_retain = len(forget), len(plain.data["retain_train"][2])
    images, keys = repeated.training_images("original")
    assert len(images) == len(keys) == 3 * n_forget + n_retain
    assert sum(k in forget for k in keys) == 3 * n_forget
    for k in forget:  # every copy is the image itself
        rows = images[[i for i, key in enumerate(keys) if key == k]]
        assert len(rows) == 3 and torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])
    assert len(plain.training_images("original")[0]) == n_forget + n_retain
    # the original is another model; the retrain model (no forget image) is the same cached model
    assert repeated.reference_key("original") != plain.reference_key("original")
    assert repeated.reference_key("retrain") == plain.reference_key("retrain")
    assert torch.equal(repeated.training_images("retrain")[0], plain.training_images("retrain")[0])
    # forget_repeat=1 is the plain recipe, same cache
    once = prepared_runner(_cfg(shared_tmp, extra=["+model.train.forget_repeat=1"]), tmp_path / "c")
    assert once.reference_key("original") == plain.reference_key("original")


def test_forget_repeat_is_recorded_in_the_originals_meta(shared_tmp):
    cfg = _cfg(shared_tmp, extra=["+model.train.forget_repeat=4"])
    cli.main(cfg)
    models = json.loads((run_dir(cfg) / "metrics.json").read_text())["models"]
    assert models["original"]["forget_repeat"] == 4 and models["original"]["forget_rows"] == 4 * 8
    assert models["retrain"]["forget_rows"] == 0
    assert models["original"]["images"] == models["retrain"]["images"] + 4 * 8


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "abc", "true"])
def test_bad_forget_repeat_fails_fast_naming_the_key(shared_tmp, tmp_path, value):
    runner = gan_runner.GANRunner(_cfg(shared_tmp, extra=[f"+model.train.forget_repeat={value}"]), tmp_path, "t")
    with pytest.raises(ConfigError, match=r"model\.train\.forget_repeat"):
        runner.check()


@pytest.mark.parametrize(("key", "value"), [("patience", "0"), ("patience", "2.5"), ("val_samples", "1"),
                                            ("val_images", "x")])
def test_bad_patience_options_fail_fast_naming_the_key(shared_tmp, tmp_path, key, value):
    extra = [f"+model.train.{key}={value}"] + (["+model.train.patience=2"] if key != "patience" else [])
    runner = gan_runner.GANRunner(_cfg(shared_tmp, extra=extra), tmp_path, "t")
    with pytest.raises(ConfigError, match=rf"model\.train\.{key}"):
        runner.check()


# ---- patience ---------------------------------------------------------------------------------------------
class _Model:
    def sample(self, n, generator):
        return torch.zeros(n, 1, 32, 32)

    def state_dict(self):
        return {"w": torch.tensor([float(self.step)])}


def _drive(rule, fids, monkeypatch):
    """Run ``rule`` over scripted validation FIDs, one per epoch; returns the batches trained when it stopped."""
    it = iter(fids)
    monkeypatch.setattr(gan_runner, "sample_scores", lambda *a: {"fid": next(it), "is": 1.0})
    model, trainer = _Model(), SimpleNamespace(global_step=0, optimizers=[0, 0], should_stop=False)
    for position in range(1, rule.steps + 1):
        trainer.global_step, model.step = 2 * position, position
        rule.on_train_batch_end(trainer, model)
        if trainer.should_stop:
            return position
    return rule.steps


def _rule(patience, epochs=6, per_epoch=5):
    return gan_runner.ValidationFID(None, torch.zeros(4, 1, 32, 32), 4, 0, per_epoch, epochs * per_epoch,
                                    patience, 2)


def test_patience_stops_after_p_epochs_without_improvement_and_keeps_the_best(monkeypatch):
    rule = _rule(patience=2)
    stopped = _drive(rule, [50.0, 40.0, 45.0, 41.0, 30.0, 20.0], monkeypatch)
    assert stopped == 20  # best at epoch 2, epochs 3 and 4 no better
    record = rule.record()
    assert [p["fid"] for p in record["val_fid_curve"]] == [50.0, 40.0, 45.0, 41.0]
    assert record["best_epoch"] == 2 and record["epochs_run"] == 4 and record["converged"] is True
    assert float(rule.best_state["w"]) == 10  # the weights after epoch 2
    # still improving at the cap: not converged, last epoch kept
    rule = _rule(patience=2)
    assert _drive(rule, [50.0, 40.0, 35.0, 30.0, 25.0, 20.0], monkeypatch) == 30
    assert rule.record()["converged"] is False and rule.record()["best_epoch"] == 6


def test_patience_state_survives_a_resume(monkeypatch):
    rule = _rule(patience=2)
    _drive(rule, [50.0, 40.0, 45.0, 41.0], monkeypatch)
    resumed = _rule(patience=2)
    resumed.load_state_dict(rule.state_dict())
    assert resumed.record() == rule.record() and torch.equal(resumed.best_state["w"], rule.best_state["w"])


def test_patience_run_stops_early_and_records_the_curve(shared_tmp):
    cap = 8
    cfg = _cfg(shared_tmp, extra=[f"model.train.epochs={cap}", "model.train.lr=0.02", "+model.train.patience=1",
                                  "+model.train.val_images=32", "+model.train.val_samples=32"])
    cli.main(cfg)
    models = json.loads((run_dir(cfg) / "metrics.json").read_text())["models"]
    for kind in ("original", "retrain"):
        meta = models[kind]
        curve = meta["val_fid_curve"]
        assert len(curve) >= 2 and all(p["fid"] >= 0 for p in curve)
        assert meta["best_val_fid"] == min(p["fid"] for p in curve)
        assert meta["converged"] is True and meta["epochs_run"] < cap  # the rule stopped it before the cap
        assert curve[-1]["fid"] > meta["best_val_fid"] and meta["epochs_run"] == meta["best_epoch"] + 1
        assert meta["val_images"] == 32
    # the held-out validation images are not trained on: retrain sees 32 images fewer than the retain split has
    assert models["retrain"]["images"] == 184 - 32


def test_patience_reference_resumes_with_its_curve(tmp_path, monkeypatch):
    """Killed after its first validation, a patience reference resumes to the same weights and the same curve."""
    from i2i_unlearning.families.gan import DCGAN

    class Killed(RuntimeError):
        pass

    def train(root, kill_at=None):
        cfg = _cfg(root, extra=["model.train.epochs=3", "model.train.lr=0.02", "+model.train.patience=5",
                                "+model.train.val_images=32", "+model.train.val_samples=16",
                                "callbacks.model_checkpoint.every_n_train_steps=2"])
        runner = prepared_runner(cfg, root / "run")
        runner.nets = runner.scoring_nets()
        if kill_at is not None:
            original, armed = DCGAN.training_step, {"on": True}

            def dying(self, batch, batch_idx):
                if armed["on"] and self.trainer.global_step == kill_at:
                    armed["on"] = False
                    raise Killed
                return original(self, batch, batch_idx)

            with monkeypatch.context() as m:
                m.setattr(DCGAN, "training_step", dying)
                with pytest.raises(Killed):
                    runner.reference("retrain")
            assert list((root / "cache" / "models").glob("*/resume/last.ckpt"))
        model, meta = runner.reference("retrain")
        return model.state_dict(), meta

    ref, ref_meta = train(tmp_path / "a")
    per_epoch = ref_meta["val_fid_curve"][0]["step"]
    w, meta = train(tmp_path / "b", kill_at=2 * (per_epoch + 2))  # batch 12 of 30: before the middle
    assert meta["attempts"] == 2 and len(meta["val_fid_curve"]) == len(ref_meta["val_fid_curve"]) == 3
    assert meta["val_fid_curve"] == ref_meta["val_fid_curve"]
    assert all(torch.equal(ref[k], w[k]) for k in ref)
