"""(2) unlearning until it reaches the retrain model, against retraining from scratch on the retain classes
with the original's recipe.

* References: the bench trains its own original and retrain models with the family's recipe, shortened
  (``bench.original``; the same recipe for both, the retrain on the retain classes only).
* Criterion (``bench.unlearn``): on ``eval_images`` held-out images per split, the student's forget FID reaches
  ``forget_fid_x`` x the ``target`` model's (default the retrain model's: "within a tolerance of retraining")
  while its retain FID stays at most ``retain_fid_x`` x the target's: `StopCriterion`, the rule of
  ``method.stop_at``. When the target is the retrain model and retraining does not raise forget FID above the
  original's on these images, there is nothing to reach: the ratio is n/a and says so.
* Unlearning: the family's ``ours`` config with the bench's recipe over it (``bench.unlearn.method``, picked by
  `recipe_search`) from the bench original, through ``UnlearnModule`` on the real shard loader with the
  runner's Trainer; every ``check_every`` steps the student restores the held-out images and the criterion is
  checked; the Trainer stops once it holds. ``unlearn_s`` is the whole unlearning run's wall clock (loader and
  Trainer set-up, the steps with their loading) less the checks' time, reported apart; ``steps_s`` is the
  steps alone, timed by a callback.
* Retraining: the bench retrain's measured training time per step (Lightning loop, loading, checkpoints) times the
  steps of the recipe on N retained images, ceil(epochs x N / batch), plus the family's stage before training (the
  VQ-GAN tokenizer: its measured time scaled to the recipe's steps): "extrapolated from k measured steps". Where
  the bench trains with a smaller batch than the recipe (``bench.original.batch_size``), its step time is scaled by
  the ratio of a recipe-batch training step to a bench-batch one, both timed side by side in (1), capped at the
  ratio of the batch sizes (timing noise cannot inflate retraining).
* The ratio at each retained-data size N, and a projection to the paper's setting from the per-image costs
  measured in (1) and the image counts of the paper's recipes (``bench.projection``).
"""

from __future__ import annotations

import json
import math
import time

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .. import runner
from ..errors import ConfigError
from ..families.base import Family
from ..metrics.evaluate import SplitScorer
from ..metrics.validation_curve import TARGETS, StopCriterion
from ..training import make_trainer
from ..unlearning.module import UnlearnModule
from .common import ratio, sync


@torch.no_grad()
def split_fid(cfg: DictConfig, dm, net, model: Family, split: str, n: int, device) -> float:
    """FID of the model's restorations of the first ``n`` eval images of ``split`` (seeded)."""
    scorer = SplitScorer(net)
    gen = torch.Generator().manual_seed(cfg.seed)
    for b in dm.eval_batches(f"{split}_eval", cfg.task, batch_size=cfg.metrics.eval_batch_size, limit=n):
        x, m = b["image"].to(device), b["mask"].to(device)
        scorer.score(model.restore(x, m, generator=gen).cpu(), b["image"], b["label"])
    return float(scorer.compute()["fid"])


class _Criterion(L.Callback):
    """Every ``every`` steps (and at the last), the student restores the held-out images and the criterion is
    checked; the Trainer stops once it holds. Step time is the wall clock between checks (loading included),
    check time is kept apart. Checks run on a forked global RNG, so how often they run does not change the
    unlearning's trajectory."""

    def __init__(self, every: int, max_steps: int, score, met, device) -> None:
        self.every, self.max_steps, self.score, self.met, self.device = every, max_steps, score, met, device
        self.step_s = self.check_s = 0.0
        self.checks: list[dict] = []
        self.met_at: int | None = None

    def on_train_start(self, trainer, module) -> None:
        sync(self.device)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, *args) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.step_s += now - self._t
        step = trainer.global_step
        if step % self.every == 0 or step == self.max_steps:
            module.student.eval()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                fid = self.score(module.student)  # draws nothing from the training's random stream
            module.student.train()
            self.checks.append({"step": step, "steps_s": self.step_s, **fid})
            if self.met(fid):
                self.met_at = step
                trainer.should_stop = True
            self.check_s += time.perf_counter() - now
        self._t = time.perf_counter()


def _fids(cfg: DictConfig, dm, net, model: Family, n: int, device) -> dict[str, float]:
    return {f"{s}_fid": split_fid(cfg, dm, net, model, s, n, device) for s in ("forget", "retain")}


def unlearning_method(cfg: DictConfig):
    """The method of (2): the family's ``ours`` config with the bench's recipe over it (``bench.unlearn.method``,
    method keys such as alpha and lr, null = the config's own); a key the method does not have is a ConfigError
    naming it."""
    recipe = {k: v for k, v in (cfg.bench.unlearn.get("method") or {}).items() if v is not None}
    unknown = [k for k in recipe if k not in cfg.method]
    if unknown:
        raise ConfigError(f"bench.unlearn.method.{unknown[0]}: method {cfg.method.name} has no such key; "
                          f"use some of {sorted(cfg.method)}")
    cfg = cfg.copy()  # set in the whole config, so interpolations such as the optimizer's ${method.lr} follow
    for key, value in recipe.items():
        OmegaConf.update(cfg, f"method.{key}", value)
    return instantiate(cfg.method)


def unlearn_to_criterion(cfg: DictConfig, data_dir, refs: dict[str, Family], net, device, perf: dict) -> dict:
    """``ours`` from the bench original through the runner's Trainer until the criterion holds (or the cap)."""
    b = cfg.bench.unlearn
    if b.target not in TARGETS:
        raise ConfigError(f"bench.unlearn.target={b.target!r}: use one of {list(TARGETS)}")
    method = unlearning_method(cfg)
    n, max_steps, every = int(b.eval_images), int(b.max_steps), int(b.check_every)
    patch = refs["original"].mask_patch
    eval_dm = runner.datamodule(cfg, data_dir, {"retain": ["retain_train"]}, 1, 1, cfg.seed, patch)
    base = {name: _fids(cfg, eval_dm, net, model.to(device).eval(), n, device) for name, model in refs.items()}
    reference = base[b.target]
    rule = StopCriterion(b.target, {"forget_fid": float(b.forget_fid_x), "retain_fid": float(b.retain_fid_x)})
    bounds = rule.bounds(reference)
    gap = base["retrain"]["forget_fid"] - base["original"]["forget_fid"]
    described = (f"forget FID {bounds['forget_fid'][0]} {b.forget_fid_x}x the {b.target} model's "
                 f"({bounds['forget_fid'][1]:.2f}) and retain FID <= {b.retain_fid_x}x its "
                 f"{reference['retain_fid']:.2f}, on {n} eval images per split, checked every {every} steps")
    out = {"method": method.name, "batch_size": method.batch_size, "alpha": method.alpha, "lr": method.lr,
           "criterion": described, "target": str(b.target), "references": base}
    if b.target == "retrain" and gap <= 0:  # nothing to reach: a met criterion would mean nothing
        return {**out, "criterion_met": False, "steps": 0, "unlearn_s": None, "steps_s": None, "check_s": 0.0,
                "checks": [],
                "why_not_met": f"retraining does not raise forget FID on these images (original "
                               f"{base['original']['forget_fid']:.2f}, retrain {base['retrain']['forget_fid']:.2f}): "
                               "nothing to forget on this split"}

    def score(student: Family) -> dict:
        fid = _fids(cfg, eval_dm, net, student, n, device)
        return {**fid, "forget_fid_x": fid["forget_fid"] / base["original"]["forget_fid"],
                "retain_fid_x": fid["retain_fid"] / base["original"]["retain_fid"],
                "forget_gap_share": (fid["forget_fid"] - base["original"]["forget_fid"]) / gap if gap else None}

    criterion = _Criterion(every, max_steps, score, device=device, met=lambda f: rule.met(f, reference))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as the runner's unlearning: the same trajectory
    sync(device)                                                # whatever ran before in this process
    t0 = time.perf_counter()
    streams = {"retain": [method.retain_split], "forget": ["forget_train"]}
    sizes = {"retain": method.batch_size, "forget": method.forget_batch_size}
    dm = runner.datamodule(cfg, data_dir, streams, sizes, max_steps, cfg.seed, patch)
    settings = runner.unlearn_settings(method)
    trainer = make_trainer(cfg, max_steps, extra_callbacks=[criterion, *settings.pop("extra_callbacks", [])],
                           **settings)
    trainer.fit(UnlearnModule(refs["original"], method, **perf), dm)
    sync(device)
    unlearn_s = time.perf_counter() - t0 - criterion.check_s
    met_at = criterion.met_at
    last = criterion.checks[-1] if criterion.checks else {}
    return {**out, "criterion_met": met_at is not None, "steps": met_at or max_steps, "unlearn_s": unlearn_s,
            "steps_s": criterion.step_s, "check_s": criterion.check_s, "checks": criterion.checks,
            "why_not_met": None if met_at is not None else
            f"not met within {max_steps} steps: forget FID {last.get('forget_fid', float('nan')):.2f}, retain FID "
            f"{last.get('retain_fid', float('nan')):.2f} at the last check"}


def retrain_cost(cfg: DictConfig, recipe: dict, meta: dict, cached: bool, retain_sizes: dict,
                 cost: dict | None) -> dict:
    """Retraining time per retained-data size, from the bench retrain's recorded cost per step (``meta``)."""
    pre_s = float(meta.get("pre_train_s") or 0.0)
    k, bench_batch = int(meta["steps"]), int(meta.get("batch_size") or recipe["batch_size"])
    step_s = (float(meta["train_s"]) - pre_s) / k
    scale = None
    if bench_batch != int(recipe["batch_size"]):  # a recipe step = a bench step x the step-time ratio of (1)
        kinds = (cost or {}).get("kinds", {})
        if "train[recipe batch]" not in kinds or kinds.get("train", {}).get("images") != bench_batch:
            raise ValueError(f"the bench references train {bench_batch}-image steps, the recipe "
                             f"{recipe['batch_size']}: "
                             "extrapolating needs both step times from (1); set bench.original.batch_size=null")
        # capped at proportional: a larger batch costs at most proportionally more (no smaller
        # per-image efficiency), so timing noise cannot inflate the retrain estimate
        scale = min(kinds["train[recipe batch]"]["median_s"] / kinds["train"]["median_s"],
                    int(recipe["batch_size"]) / bench_batch)
        step_s *= scale
    pre_full = 0.0
    if recipe.get("tokenizer_steps"):
        bench_tok = int(cfg.bench.original.tokenizer_steps)  # what the bench retrain's stage ran
        pre_full = pre_s / bench_tok * int(recipe["tokenizer_steps"]) if bench_tok else 0.0
    sizes = {}
    for name, n in retain_sizes.items():
        steps = max(1, math.ceil(float(recipe["epochs"]) * n / int(recipe["batch_size"])))
        sizes[name] = {"retain_images": n, "steps": steps, "retrain_s": steps * step_s + pre_full}
    source = "the cached retrain's recorded training time" if cached else "the retrain trained in this process"
    return {"source": source,
            "measured_steps": k, "batch_size": int(recipe["batch_size"]), "epochs": float(recipe["epochs"]),
            "s_per_step": step_s, "pre_train_s_measured": pre_s, "pre_train_s_recipe": pre_full,
            "recipe_tokenizer_steps": recipe.get("tokenizer_steps"),
            "bench_batch": bench_batch, "recipe_step_x_bench_step": scale,
            "how": f"extrapolated from {k} measured steps" + (
                "" if scale is None else f" of {bench_batch} images x{scale:.2f} (a {recipe['batch_size']}-image "
                                         "step's time over a bench step's, measured in (1), at most "
                                         f"{int(recipe['batch_size']) / bench_batch:.2f})"), "sizes": sizes}


def measure(cfg: DictConfig, data_dir, refs: dict[str, Family], meta: dict, cached: bool, recipe: dict, net,
            device, perf: dict, cost: dict | None) -> dict:
    """Unlearning to the criterion from ``refs["original"]`` against retraining (``meta``: the bench retrain's
    record, its measured training time), at each retained-data size."""
    b = cfg.bench.unlearn
    manifest_n = json.loads((data_dir / "manifest.json").read_text())["splits"]["retain_train"]["count"]
    sizes = {"bench": int(manifest_n), **{str(k): int(v) for k, v in b.retain_sizes.items()}}
    unlearn = unlearn_to_criterion(cfg, data_dir, refs, net, device, perf)
    retrain = retrain_cost(cfg, recipe, meta, cached, sizes, cost)
    growth = {name: {**s, "unlearn_s": unlearn["unlearn_s"],
                     "x": ratio(s["retrain_s"], unlearn["unlearn_s"]) if unlearn["unlearn_s"] else None}
              for name, s in retrain["sizes"].items()}
    headline = growth[str(b.headline)]
    proj = cfg.bench.projection.get(cfg.model.name)
    projection = {"x": None, "why_na": None}
    if proj is None:
        projection["why_na"] = f"no paper recipe for {cfg.model.name} in bench.projection"
    elif cost is None:
        projection["why_na"] = "needs the per-image costs of measurement (1)"
    else:
        x_img = cost["kinds"]["ours"]["x_train_per_image"]
        projection = {"x": float(proj.retrain_images) / float(proj.unlearn_images) / x_img,
                      "setting": proj.setting, "retrain_images": int(proj.retrain_images),
                      "unlearn_images": int(proj.unlearn_images), "ours_x_train_per_image": x_img,
                      "how": "projection: (retrain images x training cost per image) / (unlearning images x ours' "
                             "cost per image), per-image costs as measured here in (1)", "why_na": None}
    return {"unlearn": unlearn, "retrain": retrain, "growth": growth, "headline_size": str(b.headline),
            "x": headline["x"], "criterion_met": unlearn["criterion_met"], "projection": projection}
