"""Validation during unlearning (validation.csv every method.val_every steps) and unlearning to a criterion
(method.stop_at): tiny MAE runs on the synthetic data, its eval split capped to leave test images for validation."""

import csv
import json
import math

import pytest
import torch
from conftest import compose_cfg, prepared_runner, tiny_overrides
from test_resume import Killed, _kill_at

from i2i_unlearning import cli
from i2i_unlearning.data.prepare import load_manifest
from i2i_unlearning.data.shards import read_shard
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.metrics.validation_curve import COLUMNS
from i2i_unlearning.runs import run_dir
from i2i_unlearning.unlearning.module import UnlearnModule

VAL = ["data.eval_per_class=12", "+data.val_per_class=4"]  # 16 test images per class: 12 eval + 4 validation


def _cfg(tmp, *extra, runs="runs", logger="none"):
    return compose_cfg(tiny_overrides(tmp, "mae", "ours", runs=runs, logger=logger, extra=[*VAL, *extra]))


def _keys(data_dir, split):
    manifest = load_manifest(data_dir)
    return {k for shard in manifest["splits"][split]["shards"] for k in read_shard(data_dir / shard["name"], 1)[0]}


def test_validation_split_is_disjoint_from_the_eval_images(shared_tmp):
    cfg = _cfg(shared_tmp, "+method.val_every=2")
    runner = prepared_runner(cfg, shared_tmp / "prep")
    assert runner.val_dir == runner.data_dir.with_name(f"{runner.data_dir.name}-val4")
    manifest = load_manifest(runner.val_dir)
    for role in ("forget", "retain"):
        assert set(manifest["splits"][f"{role}_val"]["classes"].values()) == {4}
        val, ev = _keys(runner.val_dir, f"{role}_val"), _keys(runner.data_dir, f"{role}_eval")
        assert len(val) == 4 * len(manifest[f"{role}_classes"]) and len(ev) == 12 * len(manifest[f"{role}_classes"])
        assert not val & ev  # test images: validation takes those the eval split left


def _run(cfg):
    cli.main(cfg)
    run = run_dir(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok", metrics.get("error")
    rows = list(csv.DictReader((run / "validation.csv").open())) if (run / "validation.csv").exists() else None
    return run, metrics, rows


def test_curve_rows_at_step_zero_every_n_and_the_last_step(shared_tmp):
    run, m, rows = _run(_cfg(shared_tmp, "method.steps=5", "+method.val_every=2", logger="csv"))
    assert tuple(rows[0]) == COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]
    assert all(math.isfinite(float(r[k])) for r in rows for k in COLUMNS)
    assert [float(r["seconds"]) for r in rows] == sorted(float(r["seconds"]) for r in rows)
    assert m["val_every"] == 2 and m["val_checks"] == 4 and m["unlearn_steps"] == 5 and "stop_met" not in m
    assert 0 < m["val_s"] and 0 < m["unlearn_s"]
    logged = [r for f in run.glob("logs/*/metrics.csv") for r in csv.DictReader(f.open()) if r.get("val/forget_fid")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4, 5]  # the run's logger got each check at its step
    assert [float(r["val/retain_cos"]) for r in logged] == [float(r["retain_cos"]) for r in rows]
    # validation draws from forked generators: the weights are those of the same run without it
    plain, _, none = _run(_cfg(shared_tmp, "method.steps=5"))
    assert none is None
    w, ref = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run, plain))
    assert all(torch.equal(w[k], ref[k]) for k in ref)


def test_stop_when_met_records_the_step(shared_tmp):
    # easy on this tiny model: the first steps of `ours` at this lr lower retain FID by more than 5%
    _, m, rows = _run(_cfg(shared_tmp, "method.steps=12", "method.lr=0.01", "+method.val_every=2",
                           "+method.stop_at={target: original, forget_cos_x: 1.01, retain_fid_x: 0.95}"))
    assert m["stop_met"] is True and 0 < m["stop_step"] < 12 and m["unlearn_steps"] == m["stop_step"]
    assert int(rows[-1]["step"]) == m["stop_step"] and m["stop_s"] == float(rows[-1]["seconds"])
    assert m["stop_result"].startswith(f"met at step {m['stop_step']}")
    assert m["stop_reference"]["retain_fid"] == float(rows[0]["retain_fid"])  # target original = step 0
    assert float(rows[-1]["retain_fid"]) <= 0.95 * float(rows[0]["retain_fid"])


def test_unmet_criterion_runs_to_the_cap_against_retrain(shared_tmp):
    _, m, rows = _run(_cfg(shared_tmp, "method.steps=4", "+method.val_every=2",
                           "+method.stop_at={target: retrain, forget_fid_x: 100}"))
    assert m["stop_met"] is False and m["stop_step"] is None and m["stop_s"] is None
    assert m["stop_result"] == "not met within 4 steps" and m["unlearn_steps"] == 4
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    # the bound reads the retrain model's validation scores, not the original's (step 0)
    assert m["stop_target"] == "retrain" and m["stop_reference"]["forget_fid"] != float(rows[0]["forget_fid"])


@pytest.mark.parametrize(("extra", "key"), [
    (["+method.stop_at={forget_fid_x: 1.3}"], "method.val_every"),
    (["+method.val_every=2", "+method.stop_at={forget_fidx: 1.3}"], "method.stop_at.forget_fidx"),
    (["+method.val_every=2", "+method.stop_at={retain_fid_x: 1.1}"], "method.stop_at sets no forget target"),
    (["+method.val_every=2", "+method.stop_at={target: oracle, forget_fid_x: 1.3}"], "method.stop_at.target"),
    (["+method.val_every=0"], "method.val_every=0"),
    (["+method.val_every=2", "+data.val_per_class=1"], "data.val_per_class=1"),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path, extra, key):
    cfg = compose_cfg(tiny_overrides(tmp_path, "mae", "ours", extra=extra))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cli.main(cfg)
    assert not (tmp_path / "cache").exists()  # before any data or model work


def test_validation_needs_spare_test_images_and_a_training_method(shared_tmp):
    with pytest.raises(ConfigError, match=r"data\.val_per_class=4: class class_0 has 16 test images"):
        cli.main(compose_cfg(tiny_overrides(shared_tmp, "mae", "ours", extra=["+method.val_every=2",
                                                                               "+data.val_per_class=4"])))
    with pytest.raises(ConfigError, match=r"method\.val_every=2: method=original .* no unlearning stage"):
        cli.main(compose_cfg(tiny_overrides(shared_tmp, "mae", "original", extra=[*VAL, "+method.val_every=2"])))


def test_resumed_curve_keeps_its_rows_once(shared_tmp, monkeypatch):
    """Killed after 5 steps (rows of steps 0, 2, 4 written; the checkpoint of step 3) and relaunched: the run
    resumes at step 3 (no check there), redoes the check of step 4, and its rows equal an uninterrupted run's,
    none twice."""
    extra = ["method.steps=6", "+method.val_every=2", "callbacks.model_checkpoint.every_n_train_steps=3"]
    _, _, ref = _run(_cfg(shared_tmp, *extra, runs="val_ref"))
    cfg = _cfg(shared_tmp, *extra, runs="val_killed")
    with monkeypatch.context() as m:
        _kill_at(m, UnlearnModule, 5)
        with pytest.raises(Killed):
            cli.main(cfg)
    assert [int(r["step"]) for r in csv.DictReader((run_dir(cfg) / "validation.csv").open())] == [0, 2, 4]
    assert (run_dir(cfg) / "resume" / "last.ckpt").is_file()
    _, m, rows = _run(cfg)
    assert m["unlearn_attempts"] == 2
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in ref]
