"""Item unlearning for image-to-image families and the memorisation setting (``model.train.forget_repeat``), tiny."""

import json
import math
from collections import Counter

import pytest
from conftest import compose_cfg, prepared_runner, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.metrics.restoration import AUDIT_STREAMS, data_split, stream_sizes
from i2i_unlearning.runner import build_runner, datamodule
from i2i_unlearning.runs import run_dir

REPEAT = 2


def item_overrides(tmp, method: str, extra=()) -> list[str]:
    """The tiny MAE overrides on ``data=synthetic_items`` (8 forget items, every class retained)."""
    return [o if o != "data=synthetic" else "data=synthetic_items" for o in tiny_overrides(tmp, "mae", method, extra)]


@pytest.mark.parametrize("method", ["original", "retrain", "ours"])
def test_item_mode_runs_and_scores_the_forget_items(shared_tmp, method):
    cfg = compose_cfg(item_overrides(shared_tmp, method, [f"+model.train.forget_repeat={REPEAT}"]))
    cli.main(cfg)
    result = json.loads((run_dir(cfg) / "metrics.json").read_text())
    assert result["status"] == "ok", result.get("error")
    runner = prepared_runner(cfg, shared_tmp / "never")
    splits = json.loads((runner.data_dir / "manifest.json").read_text())["splits"]
    assert splits["forget_eval"]["count"] == 0 and splits["forget_train"]["count"] == cfg.data.forget_item_count
    m = result["metrics"]
    # the forget scores are the forget training items' restorations; retain stays the held-out retain images
    assert m["forget_n"] == splits["forget_train"]["count"] and m["retain_n"] == splits["retain_eval"]["count"]
    for key in ("forget_fid", "forget_cos", "forget_mia_auc", "forget_mia_auc_err", "forget_mia_auc_emb",
                "retain_mia_auc"):
        assert key in m and math.isfinite(m[key]), key
    sizes = stream_sizes(cfg, datamodule(cfg, runner.data_dir, {"retain": ["retain_train"]}, 1, 1, 0, 4))
    assert data_split("eval", "forget", "item") == "forget_train"
    assert ("members", cfg.task, "forget") not in sizes  # the forget eval stream already is the members
    assert AUDIT_STREAMS["item"]["forget"] == (("eval", "forget"), ("eval", "retain"))
    if method == "original":  # each forget image REPEAT times per epoch; the step count follows
        meta = json.loads(runner.reference_path("original").with_suffix(".json").read_text())
        images = REPEAT * splits["forget_train"]["count"] + splits["retain_train"]["count"]
        assert meta["forget_repeat"] == REPEAT and meta["images"] == images
        assert meta["steps"] == math.ceil(cfg.model.train.epochs * images / cfg.model.train.batch_size)


def test_forget_repeat_keys_the_original_only(shared_tmp):
    base = prepared_runner(compose_cfg(item_overrides(shared_tmp, "ours")), shared_tmp / "never")
    one = prepared_runner(compose_cfg(item_overrides(shared_tmp, "ours", ["+model.train.forget_repeat=1"])),
                          shared_tmp / "never")
    four = prepared_runner(compose_cfg(item_overrides(shared_tmp, "ours", ["+model.train.forget_repeat=4"])),
                           shared_tmp / "never")
    assert four.reference_key("original") != base.reference_key("original") == one.reference_key("original")
    assert four.reference_key("retrain") == base.reference_key("retrain")
    assert four.reference_splits("original").count("forget_train") == 4
    assert four.reference_splits("retrain") == base.reference_splits("retrain") == ["retain_train"]
    assert base.reference_splits("original") == ["forget_train", "retain_train", "proxy_train"]


def test_forget_repeat_gives_each_forget_image_that_exposure(tmp_path):
    # the original's real stream; small shards: many shard draws, so the counts are close to their expectation
    ratios = {}
    for repeat in (1, 3):
        cfg = compose_cfg(item_overrides(tmp_path, "original", ["data.shard_size=8", "data.forget_item_count=32",
                                                                f"+model.train.forget_repeat={repeat}"]))
        runner = prepared_runner(cfg, tmp_path / "never")
        manifest = json.loads((runner.data_dir / "manifest.json").read_text())
        forget = {f"{k:07d}" for k in manifest["forget_items"]}
        dm = datamodule(cfg, runner.data_dir, {"train": runner.reference_splits("original")}, 16, 250, 0, 4)
        seen = Counter(key for batch in dm.train_dataloader() for key in batch[0]["train"]["key"])
        f = sum(seen[k] for k in forget) / len(forget)
        r = sum(n for k, n in seen.items() if k not in forget) / manifest["splits"]["retain_train"]["count"]
        ratios[repeat] = f / r
    assert 0.8 < ratios[1] < 1.25 and 2.4 < ratios[3] < 3.6, ratios


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "true", "many"])
def test_bad_forget_repeat_fails_fast_naming_the_key(shared_tmp, value):
    cfg = compose_cfg(item_overrides(shared_tmp, "original", [f"+model.train.forget_repeat={value}"]))
    with pytest.raises(ConfigError, match="model.train.forget_repeat"):
        build_runner(cfg, shared_tmp / "never", "x").check()


@pytest.mark.parametrize(("method", "extra", "key"), [
    ("ours_proxy", [], "method.retain_split=proxy_train"),
    ("ours", ["+method.val_every=2"], "method.val_every"),
    ("ours", ["data.retain_classes=[class_0,class_1,class_2]", "data.proxy_classes=null"], "data.proxy_classes"),
])
def test_what_item_mode_cannot_run_fails_fast(tmp_path, method, extra, key):
    cfg = compose_cfg(item_overrides(tmp_path, method, extra))
    with pytest.raises(ConfigError, match=f"method={method} cannot run.*{key}"):
        build_runner(cfg, tmp_path / "never", "x").check()
    assert not (tmp_path / "cache").exists()  # before any data work
