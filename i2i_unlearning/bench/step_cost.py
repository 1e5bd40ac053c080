"""(1) cost per image of each method's step against the family's plain training step, and (5) the
peak memory of those steps, on the same model, the same real batches and in the same process.

A step is what the runner's Trainer (``training.make_trainer``) does per batch, timed by a callback:
the loss, backward, gradient clipping at ``trainer.gradient_clip_val``, the optimiser step. The
unlearning steps are ``UnlearnModule.training_step`` (with the ``perf`` fast paths) on a retain and
a forget batch of ``method.batch_size`` each; the training step is the family's own ``training_step``
(``task_loss``) on those same retain and forget
images under the same masks, as one batch (the two streams share each step's mask shape), so the
step kinds differ in what they compute and in nothing they are fed. Cost per image = median seconds
per step / images the step consumes (retain and forget together; finetune: retain only).
"""

from __future__ import annotations

import copy
import itertools

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from .. import runner
from ..data.degrade import eval_mask
from ..families.base import Family
from ..training import make_trainer
from ..unlearning.methods import UnlearningMethod
from ..unlearning.module import UnlearnModule
from .common import PeakMemory, StepTimer, interleaved_medians, ratio, to_device

# variants of ours that show what the fast paths buy (name -> (perf overrides, fixed mask))
VARIANTS = {
    "ours[teacher unbatched]": ({"batch_teacher": False}, False),
    "ours[fixed mask]": ({}, True),
    "ours[fixed mask, teacher cache]": ({"teacher_cache": True}, True),
}


def _pool(cfg: DictConfig, data_dir, streams: dict, batch_size: int, n: int, patch: int, device) -> list[dict]:
    """``n`` real batches of the shard loader (decoded, degraded), held in memory on ``device``."""
    dm = runner.datamodule(cfg, data_dir, streams, batch_size, n, cfg.seed, patch)
    batches = [b for b, _, _ in itertools.islice(iter(dm.train_dataloader()), n)]
    return [{k: to_device(v, device) for k, v in b.items()} for b in batches]


def _fixed(pool: list[dict], mask: torch.Tensor) -> list[dict]:
    """The same batches under the eval task's fixed mask for every item (a fixed degradation)."""
    out = []
    for b in pool:
        out.append({k: {**v, "mask": mask.to(v["image"].device).expand_as(v["mask"]).clone()} for k, v in b.items()})
    return out


def _widen(pool: list[dict], n: int) -> list[dict]:
    """Training batches of ``n`` images: each pool batch's images followed by the next ones', under its
    own masks repeated (one hidden-patch count per batch, as MAE needs)."""
    images = torch.cat([x["train"]["image"] for x in pool])
    out = []
    for i, x in enumerate(pool):
        image, mask = x["train"]["image"], x["train"]["mask"]
        rows = (torch.arange(n) + i * image.shape[0]) % images.shape[0]
        out.append({"train": {"image": images[rows], "mask": mask[torch.arange(n) % mask.shape[0]]}})
    return out


class _Fits:
    """One kind of step through the real Trainer (``training.make_trainer``, the run's precision and
    clipping): ``__call__(n)`` fits ``module`` for one untimed step (its optimiser's state is made there)
    plus ``n`` timed steps on the cycled pool, and returns the timed steps' seconds."""

    def __init__(self, cfg: DictConfig, module: L.LightningModule, pool: list[dict], images: int, device):
        self.cfg, self.module, self.pool, self.images, self.device = cfg, module, pool, images, device
        self.offset = 0

    def __call__(self, n: int) -> list[float]:
        timer = StepTimer(self.device)
        batches = [self.pool[(self.offset + i) % len(self.pool)] for i in range(n + 1)]
        self.offset += n + 1
        trainer = make_trainer(self.cfg, max_steps=n + 1, callbacks=[timer])
        trainer.fit(self.module, DataLoader(batches, batch_size=None))
        return timer.seconds[1:]


def measure(cfg: DictConfig, data_dir, original: Family, methods: dict[str, UnlearningMethod], device,
            perf: dict) -> dict:
    """Median step times, cost per image relative to the training step, and peak memory per kind."""
    b = cfg.bench.cost
    patch = original.mask_patch
    batch = int(methods["ours"].batch_size)
    train_batch = 2 * batch
    pool = _pool(cfg, data_dir, {"retain": ["retain_train"], "forget": ["forget_train"]}, batch, b.pool, patch, device)
    train_pool = [{"train": {k: torch.cat([x["retain"][k], x["forget"][k]]) for k in ("image", "mask")}}
                  for x in pool]
    model = copy.deepcopy(original).train()
    model.train_cfg["steps"] = 10**6  # the schedule stays at its peak lr
    runners = {"train": _Fits(cfg, model, train_pool, train_batch, device)}
    recipe_batch, bench_batch = int(cfg.model.train.batch_size), cfg.bench.original.get("batch_size")
    if bench_batch and int(bench_batch) != recipe_batch:  # the bench original's steps are not the recipe's:
        # time the recipe's step too, which retraining is extrapolated in (2)
        runners["train[recipe batch]"] = _Fits(cfg, model, _widen(train_pool, recipe_batch), recipe_batch, device)
    stateless = original.sample_state(pool[0]["retain"]["image"][:1], pool[0]["retain"]["mask"][:1]) is None
    fixed_pool = _fixed(pool, eval_mask(cfg.task, original.image_size, patch)) if stateless else None
    kinds = {name: (method, {}, False) for name, method in methods.items()}
    for name, (over, fixed) in VARIANTS.items():
        if fixed and not stateless:
            continue
        kinds[name] = (methods["ours"], over, fixed)
    modules = {}
    for name, (method, over, fixed) in kinds.items():
        module = modules[name] = UnlearnModule(original, method, **{**perf, **over})
        batches = fixed_pool if fixed else pool
        if not method.needs_forget:
            batches = [{"retain": x["retain"]} for x in batches]
        runners[name] = _Fits(cfg, module, batches, batch * (2 if method.needs_forget else 1), device)
    times = interleaved_medians(runners, warmup=b.warmup, repeats=b.repeats, steps=b.steps)
    memory = {}
    for name, run in runners.items():
        with PeakMemory(device) as peak:
            run(1)
        memory[name] = peak.mib
    train_per_image = times["train"]["median_s"] / train_batch
    out = {"batch_size": batch, "train_batch": train_batch, "kinds": {}, "memory_method": peak.method,
           "skipped": {} if stateless else {
               name: "diffusion's teacher input carries a random timestep and noise per step: no exact cache"
               for name, (_, fixed) in VARIANTS.items() if fixed}}
    for name, run in runners.items():
        t = times[name]
        out["kinds"][name] = {
            **t, "images": run.images, "s_per_image": t["median_s"] / run.images,
            "x_train_per_image": ratio(t["median_s"] / run.images, train_per_image),
            "x_train_per_step": ratio(t["median_s"], times["train"]["median_s"]),
            "peak_mib": memory[name], "x_train_memory": ratio(memory[name], memory["train"]),
        }
    for name, module in modules.items():
        if module.frozen.cache is not None:
            out["kinds"][name]["cache_hits"] = module.frozen.cache.hits
            out["kinds"][name]["cache_misses"] = module.frozen.cache.misses
    return out
