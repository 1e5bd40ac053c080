"""End to end through the real Hydra config: every family x every method, tiny sizes, CPU."""

import json

import pytest
import torch
from conftest import METHODS, MODELS, compose_cfg, tiny_overrides

from i2i_unlearning import cli, pipeline
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.report.summary import write_summary
from i2i_unlearning.runs import config_hash, run_dir

REQUIRED = ["retain_fid", "retain_is", "retain_cos", "forget_fid", "forget_is", "forget_cos",
            "retain_class_acc", "forget_class_acc"]
AUDIT = [f"{split}_{name}" for split in ("retain", "forget")
         for name in ("mia_auc", "mia_auc_err", "mia_auc_emb", "kl", "mi", "mi_nce")]


def test_every_method_config_is_discovered():
    assert set(METHODS) >= {"original", "retrain", "finetune", "ours", "ours_proxy", "max_loss",
                            "noisy_label", "retain_label", "random_encoder"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_contract_every_family_runs_every_method(shared_tmp, model, method):
    cfg = compose_cfg(tiny_overrides(shared_tmp, model, method))
    cli.main(cfg)
    run = run_dir(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["method"] == method and metrics["family"] == model
    for key in REQUIRED + AUDIT:
        assert key in metrics["metrics"] and metrics["metrics"][key] == metrics["metrics"][key]  # not NaN
    for name in ("config.yaml", "checkpoint.pt", "grid.png"):
        assert (run / name).exists(), name


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
    def weights(seed):
        cfg = compose_cfg(tiny_overrides(shared_tmp, extra=[f"seed={seed}"]))
        data_dir = pipeline.prepare_data(cfg)
        original, _ = pipeline.trained_model(cfg, data_dir, "original")
        method = pipeline.instantiate(cfg.method)
        model, _ = pipeline.unlearn(cfg, data_dir, original, method, logger=None)
        return model.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # control: the check can fail


def test_mismatched_sizes_fail_before_any_work(shared_tmp):
    cfg = compose_cfg(tiny_overrides(shared_tmp, extra=["model.image_size=28"]))
    with pytest.raises(ConfigError, match="model.image_size=28"):
        pipeline.check_config(cfg)
    cfg = compose_cfg(tiny_overrides(shared_tmp, extra=["task=center_tenth"]))
    with pytest.raises(ConfigError, match="center_tenth"):
        pipeline.check_config(cfg)


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
