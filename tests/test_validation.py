"""Validation before compute: each bad config fails within seconds with a ConfigError naming the key, before any
data preparation or model work (no data dir, no cache, no trained model)."""

import json
import time

import pytest
from conftest import compose_cfg, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.runs import run_dir

# (override(s), text the error must name)
BAD = [
    (["method.batch_size=0"], "method.batch_size=0"),
    (["model.train.batch_size=0"], "model.train.batch_size=0"),
    (["method.steps=0"], "method.steps=0"),
    (["method.alpha=-1"], "method.alpha=-1"),
    (["method.alpha=nan"], "method.alpha=nan"),
    (["method.alpha=inf"], "method.alpha=inf"),
    (["method.lr=0"], "method.lr=0"),
    (["model.train.lr=-1e-3"], "model.train.lr=-0.001"),
    (["model.train.epochs=0"], "model.train.epochs=0"),
    (["model.train.warmup_steps=-1"], "model.train.warmup_steps=-1"),
    (["model.train.seed=-1"], "model.train.seed=-1"),
    (["method.weight_decay=-0.1"], "method.weight_decay=-0.1"),
    (["metrics.is_splits=0"], "metrics.is_splits=0"),
    (["metrics.grid_images=0"], "metrics.grid_images=0"),
    (["metrics.feature_net.epochs=0"], "metrics.feature_net.epochs=0"),
    (["data.shard_size=0"], "data.shard_size=0"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.mask_ratio=[0.9,0.1]"], "data.mask_ratio="),
    (["data.mask_ratio=[0.1,1.5]"], "data.mask_ratio="),
    (["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["seed=-1"], "seed=-1"),
    (["model.name=../x"], "model.name="),
    (["data.forget_classes=[class_9]"], "class_9"),
    (["data.retain_classes=[class_0]"], "forget_classes and retain_classes overlap"),
    (["data.retain_classes=[]"], "retain_classes is empty"),
    (["data.train_per_class=0"], "train_per_class=0"),
    (["data.image_size=16"], "image_size=16"),
    (["model.pretrained=/nonexistent/original.pt"], "model.pretrained=/nonexistent/original.pt"),
    (["metrics.features=inception", "metrics.inception_weights=/nonexistent/inception.pth"],
     "metrics.inception_weights"),
    (["model.image_size=28"], "model.image_size=28"),
    (["task=center_tenth"], "center_tenth"),
    (["model.size=huge"], "model.size='huge'"),
    (["method=cascaded"], "method=cascaded"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_config_fails_before_any_work_naming_the_key(tmp_path, overrides, names):
    method = overrides[0].split("=")[1] if overrides[0].startswith("method=") else "ours"
    cfg = compose_cfg(tiny_overrides(tmp_path, method=method, extra=overrides[method != "ours":]))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        cli.main(cfg)
    assert time.perf_counter() - t0 < 10
    assert names in str(exc.value)
    assert not (tmp_path / "cache").exists()  # no data dir, no feature net, no reference model
    runs = list((tmp_path / "runs").glob("*/metrics.json"))
    if runs:  # once the run dir exists, the failure is a row of the report
        assert json.loads(runs[0].read_text())["status"] == "failed"


def test_the_valid_tiny_config_passes_the_same_checks(tmp_path):
    """Control: the checks accept the config every end-to-end test runs."""
    from i2i_unlearning.runner import build_runner

    cfg = compose_cfg(tiny_overrides(tmp_path))
    build_runner(cfg, run_dir(cfg), "x").check()
    assert not (tmp_path / "cache").exists()
