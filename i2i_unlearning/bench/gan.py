"""The GAN's unlearn-vs-retrain ratio: cascaded unlearning to its own criterion against retraining to convergence.

`measure_gan(overrides)` runs, through the ordinary CLI cell (`cli.main`, so every stage, cache and record is
the one `i2iu` uses), on MNIST with the `gan_demo` recipe, for class (digit 3) and item (64 images) unlearning:

* the original and the retrain model, both trained with the same patience rule (`model.train.patience`:
  epochs until the validation FID has not improved for P epochs, capped at ``model.train.epochs``;
  `gan_runner.GANRunner.train_reference`); the retrain model's wall-clock training time is measured
  (its ``train_s``, every attempt summed), not extrapolated;
* the cascade from the original, round after round until its own criterion holds, at most ``method.rounds``
  rounds; its ``unlearn_s`` is measured in the same way. Class: the forgotten-class share of its samples at most
  ``bench.gan.share_x`` x the retrain model's own share (the classifier assigns some of any model's samples to
  the forgotten class, so a fixed bound such as 0.01 can be out of reach of retraining itself); item: D's AUC
  on the forget images against retained training images <= ``method.stop_auc``.

x = retrain_s / unlearn_s. The paper (Sun et al. 2023, abstract) states "up to" 185x on MNIST and 284x on
CIFAR-10; it does not say whether for item or class unlearning, so both settings here are compared to 185x.
"""

from __future__ import annotations

import json
import logging
import time

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from .. import cli
from ..errors import ConfigError
from ..runs import run_dir

log = logging.getLogger("i2iu")
PAPER_X = {"mnist": 185.0, "cifar10": 284.0}  # "up to", retraining vs cascaded unlearning (abstract)


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _cell(overrides: list[str]) -> dict:
    """Run one CLI cell (skipped when an identical run finished) and return its metrics.json."""
    cfg = _compose(overrides)
    cli.main(cfg)
    result = json.loads((run_dir(cfg) / "metrics.json").read_text())
    if result.get("status") != "ok":
        raise RuntimeError(f"{cfg.method.name} on {cfg.data.name}: {result.get('status')}: {result.get('error')}")
    return result


def measure_setting(overrides: list[str], setting: str, bench: DictConfig) -> dict:
    """Original and retrain (patience rule), then the cascade to its criterion, for ``setting`` (class | item)."""
    def cascade_only(o: str) -> bool:  # method.* keys are the cascade's options
        return o.lstrip("+~").startswith("method.")

    base = [*bench.recipe, *bench.settings[setting], f"paths.output_dir={bench.out_dir}/runs",
            *(o for o in overrides if not cascade_only(o))]
    cascade_cell = [*base, *bench.cascade, *(o for o in overrides if cascade_only(o))]
    cfg = _compose(cascade_cell)
    if "GANRunner" not in str(cfg.model.runner.get("_target_")):
        raise ConfigError(f"model={cfg.model.name}: measure_gan needs model=gan")
    if cfg.model.train.get("patience") is None:
        raise ConfigError("model.train.patience=null: measure_gan times retraining to convergence; set a patience")
    t0 = time.perf_counter()
    reference = _cell([*base, "method=retrain"])  # trains (or loads) the original and the retrain model
    if setting == "class":  # reach the retrain model's own forgotten-class share
        target = float(bench.share_x) * reference["metrics"]["forget_class_share"]
        cascade_cell.append(f"method.stop_share={max(target, 1e-6)}")
        cfg = _compose(cascade_cell)
    cascade = _cell(cascade_cell)
    wall = time.perf_counter() - t0
    retrain, original = reference["models"]["retrain"], reference["models"]["original"]
    method = cfg.method
    values = cascade.get("criterion") or []
    bound = method.stop_share if setting == "class" else method.stop_auc
    retrain_s, unlearn_s = float(retrain["train_s"]), float(cascade["unlearn_s"])
    return {
        "retrain_s": retrain_s, "unlearn_s": unlearn_s, "x": retrain_s / max(unlearn_s, 1e-9),
        "criterion": "forgotten-class share" if setting == "class" else "D's forget AUC vs retained images",
        "criterion_bound": float(bound), "criterion_values": values, "rounds": len(values),
        "rounds_cap": int(method.rounds), "criterion_met": bool(values) and values[-1] <= bound,
        "retrain_converged": bool(retrain.get("converged")), "retrain_epochs": retrain.get("epochs_run"),
        "retrain_best_epoch": retrain.get("best_epoch"), "retrain_val_fid_curve": retrain.get("val_fid_curve"),
        "original_converged": bool(original.get("converged")), "original_epochs": original.get("epochs_run"),
        "original_train_s": float(original["train_s"]), "epochs_cap": cfg.model.train.epochs,
        "patience": cfg.model.train.patience, "metrics": cascade["metrics"],
        "retrain_metrics": reference["metrics"],
        "wall_s": wall,
    }


def measure_gan(overrides: list[str], bench: DictConfig) -> dict:
    """{"class": {...}, "item": {...}, "paper_x": ...}: per setting retrain_s, unlearn_s, x = retrain_s /
    unlearn_s, criterion_met, retrain_converged, retrain_epochs and the records behind them (`measure_setting`).
    ``bench`` is ``bench.gan`` of conf/bench.yaml (recipe, cascade, settings, share_x, out_dir); ``overrides``
    are Hydra overrides of the run config (bench-only keys, ``bench.*`` / ``bench_size``, are dropped)."""
    own = [o for o in overrides if not o.lstrip("+~").startswith(("bench.", "bench_size"))]
    t0 = time.perf_counter()
    out: dict = {}
    for setting in bench.settings:
        log.info("bench: GAN %s unlearning", setting)
        out[setting] = measure_setting(own, setting, bench)
    out["paper_x"] = PAPER_X
    out["paper_note"] = ("Sun et al. 2023 (abstract): up to 185x on MNIST and 284x on CIFAR-10; item or class is "
                         "not stated.")
    out["wall_s"] = time.perf_counter() - t0
    return out
