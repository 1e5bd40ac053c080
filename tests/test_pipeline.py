"""End to end through the real Hydra config: every family x every method, tiny sizes, CPU."""

import json

import numpy as np
import pytest
import torch
from conftest import METHODS, MODELS, ROOT, compose_cfg, prepared_runner, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.gan_runner import GANRunner
from i2i_unlearning.report.summary import write_summary
from i2i_unlearning.runner import build_runner
from i2i_unlearning.runs import config_hash, run_dir

REQUIRED = ["retain_fid", "retain_is", "retain_cos", "forget_fid", "forget_is", "forget_cos",
            "retain_class_acc", "forget_class_acc"]
GAN_REQUIRED = ["retain_fid", "retain_is", "forget_fid", "forget_class_share", "downstream_acc", "retrain_s"]


def _kind(model: str, method: str) -> str | None:
    """Which runner variant runs (model, method), else None (e.g. cascaded on MAE)."""
    runner = build_runner(compose_cfg(["data=synthetic", f"model={model}", f"method={method}"]), ROOT, "x")
    try:
        runner.check()
    except ConfigError:
        return None
    return "gan" if isinstance(runner, GANRunner) else "i2i"


# The palette backbone is the diffusion family on another network: the walk runs its references and `ours`;
# tests/test_released_palette.py runs every other method's loss and step on it.
BACKBONE_VARIANTS = {"palette": {"original", "retrain", "finetune", "ours"}}
PAIRS = [(mo, me, k) for mo in MODELS for me in METHODS
         if me in BACKBONE_VARIANTS.get(mo, {me}) and (k := _kind(mo, me))]
AUDIT = [f"{split}_{name}" for split in ("retain", "forget")
         for name in ("mia_auc", "mia_auc_err", "mia_auc_emb", "kl", "mi", "mi_nce")]


@pytest.mark.parametrize(("model", "method", "kind"), PAIRS)
def test_contract_every_family_runs_every_method(shared_tmp, model, method, kind):
    cfg = compose_cfg(tiny_overrides(shared_tmp, model, method))
    cli.main(cfg)
    run = run_dir(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["method"] == method and metrics["family"] == model
    for key in GAN_REQUIRED if kind == "gan" else REQUIRED + AUDIT:
        assert key in metrics["metrics"] and metrics["metrics"][key] == metrics["metrics"][key]  # not NaN
    for name in ("config.yaml", "checkpoint.pt", "grid.png"):
        assert (run / name).exists(), name
    if kind != "gan":  # the t-SNE input of i2iu-report
        emb = np.load(run / "embeddings.npz")
        assert set(emb.files) == {"retain_output", "retain_truth", "forget_output", "forget_truth"}
        assert emb["forget_output"].shape == emb["forget_truth"].shape and emb["forget_output"].shape[0] > 1


def test_every_model_pairs_with_its_methods_only():
    pairs = {(mo, me) for mo, me, _ in PAIRS}
    for model in MODELS:  # every family runs the references and something else
        assert {(model, "original"), (model, "retrain"), (model, "finetune")} <= pairs
    assert ("mae", "cascaded") not in pairs and ("gan", "ours") not in pairs


@pytest.mark.parametrize(("model", "method"), [("mae", "cascaded"), ("gan", "ours")])
def test_incompatible_pair_fails_fast_naming_both(shared_tmp, model, method):
    cfg = compose_cfg(tiny_overrides(shared_tmp, model, method))
    with pytest.raises(ConfigError, match=f"method={method}.*model={model}"):
        build_runner(cfg, shared_tmp / "never", "x").execute()


def test_report_has_a_row_per_run(shared_tmp):
    for method in ("original", "ours"):
        cli.main(compose_cfg(tiny_overrides(shared_tmp, "mae", method)))
    csv_path, md_path = write_summary(shared_tmp / "runs")
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:5] == ["family", "method", "dataset", "seed", "status"]
    assert "ours" in md_path.read_text()


def test_finished_run_is_skipped_and_not_rewritten(shared_tmp):
    cfg = compose_cfg(tiny_overrides(shared_tmp, "mae", "original"))
    cli.main(cfg)
    f = run_dir(cfg) / "metrics.json"
    stamp = f.stat().st_mtime_ns
    cli.main(cfg)
    assert f.stat().st_mtime_ns == stamp


def test_run_dir_ignores_logging_and_device_settings(shared_tmp):
    a = compose_cfg(tiny_overrides(shared_tmp))
    b = compose_cfg(tiny_overrides(shared_tmp, logger="csv", extra=["trainer.log_every_n_steps=1"]))
    c = compose_cfg(tiny_overrides(shared_tmp, extra=["method.alpha=0.5"]))
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_same_seed_same_weights_other_seed_differs(shared_tmp):
    def weights(seed, attempt):
        cfg = compose_cfg(tiny_overrides(shared_tmp, extra=[f"seed={seed}"]))
        runner = prepared_runner(cfg, shared_tmp / f"same-seed-{seed}-{attempt}")
        runner.load_references()
        return runner.unlearn()[0].state_dict()

    a, b, c = weights(0, 0), weights(0, 1), weights(1, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # control: the check can fail


def test_mismatched_sizes_fail_before_any_work(shared_tmp):
    cfg = compose_cfg(tiny_overrides(shared_tmp, extra=["model.image_size=28"]))
    with pytest.raises(ConfigError, match="model.image_size=28"):
        build_runner(cfg, shared_tmp / "never", "x").check()
    cfg = compose_cfg(tiny_overrides(shared_tmp, extra=["task=center_tenth"]))
    with pytest.raises(ConfigError, match="center_tenth"):
        build_runner(cfg, shared_tmp / "never", "x").check()


def test_unknown_class_fails_and_is_recorded_as_failed_row(shared_tmp):
    cfg = compose_cfg(tiny_overrides(shared_tmp, extra=["data.forget_classes=[class_9]"]))
    with pytest.raises(ConfigError, match="class_9"):
        cli.main(cfg)
    m = json.loads((run_dir(cfg) / "metrics.json").read_text())
    assert m["status"] == "failed" and "class_9" in m["error"]


def test_wandb_logs_offline_into_the_run_dir(shared_tmp):
    cfg = compose_cfg(tiny_overrides(shared_tmp, "mae", "ours", logger="wandb", runs="wandb_runs"))
    cli.main(cfg)
    run = run_dir(cfg)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run was written"
    assert any(offline[0].glob("*.wandb"))
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"


def test_unreachable_wandb_falls_back_to_offline(shared_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # and no login: online W&B cannot start
    monkeypatch.setenv("HOME", str(shared_tmp / "home"))  # no ~/.netrc either
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg(tiny_overrides(shared_tmp, "mae", "original", logger="wandb", runs="wandb_down",
                                     extra=["logger.mode=online"]))
    cli.main(cfg)
    run = run_dir(cfg)
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"
    assert list((run / "wandb").glob("offline-run-*"))


def test_nothing_is_written_outside_the_configured_paths(shared_tmp, tmp_path, monkeypatch):
    """logger=none: no lightning_logs/ (or anything else) in the working directory."""
    monkeypatch.chdir(tmp_path)
    for model, method in (("mae", "ours"), ("gan", "finetune")):
        cfg = compose_cfg(tiny_overrides(shared_tmp, model, method, runs="cwd_runs"))
        cli.main(cfg)
        assert json.loads((run_dir(cfg) / "metrics.json").read_text())["status"] == "ok"
    assert list(tmp_path.iterdir()) == []


def test_a_key_given_on_the_command_line_wins_over_the_size(shared_tmp):
    cfg = compose_cfg(tiny_overrides(shared_tmp, "mae", extra=["model.depth=2"]))
    assert cfg.model.depth == 2 and cfg.model.embed_dim == 32  # the override, and the rest of model.size=tiny
    with pytest.raises(ConfigError, match="model.size='huge'.*tiny"):
        build_runner(compose_cfg(tiny_overrides(shared_tmp, extra=["model.size=huge"])), shared_tmp / "never", "x")
