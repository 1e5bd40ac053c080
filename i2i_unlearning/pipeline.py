"""One run, stage by stage: prepare -> original / retrain (cached) -> unlearn -> evaluate.

Every stage reads the composed Hydra config; expensive stages are cached under
``paths.cache_dir`` by a hash of the config they depend on, so a sweep trains the
original and retrain models once and every cell reuses them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import zlib
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import checkpointing, distributed, gan_pipeline
from .atomic import torch_save, write_atomic, write_json, write_text
from .data.datamodule import ForgetRetainDataModule
from .data.degrade import fill
from .data.prepare import config_kwargs, prepare
from .errors import ConfigError
from .families.base import Family, StageContext
from .metrics.audit import membership_audit, sample_scores
from .metrics.evaluate import SplitScorer, class_acc
from .metrics.features import load_or_train_feature_net, tensor_batches
from .metrics.models import feature_models
from .report.figures import save_grid
from .runs import stable_hash
from .unlearning.methods import UnlearningMethod
from .unlearning.module import UnlearnModule, compile_hooks, to_channels_last
from .weights import load_weights

log = logging.getLogger("i2iu")
TRAIN_SPLITS = ("forget_train", "retain_train", "proxy_train")
STREAM_SPLITS = {"original": list(TRAIN_SPLITS), "retrain": ["retain_train"]}


# ---- building blocks ----------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Cheap consistency checks, before any data or training work."""
    if cfg.model.image_size != cfg.data.image_size:
        raise ConfigError(
            f"model.image_size={cfg.model.image_size} differs from data.image_size={cfg.data.image_size}"
        )
    if cfg.model.channels != cfg.data.channels:
        raise ConfigError(f"model.channels={cfg.model.channels} differs from data.channels={cfg.data.channels}")
    from .data.degrade import task_mask_fn
    from .metrics.models import check_metrics_config

    check_metrics_config(cfg.metrics)  # weights files of paper metrics: fail before any work
    paper_metrics = {k: cfg.metrics[k] for k, default in (("features", "default"), ("embedding", "features"))
                     if cfg.metrics.get(k, default) != default}
    if paper_metrics and gan_pipeline.model_kind(cfg.model) == "gan":
        raise ConfigError(
            f"{', '.join(f'metrics.{k}={v}' for k, v in paper_metrics.items())}: the GAN run path scores with "
            f"the data set's own feature network only; drop these for model={cfg.model.name}"
        )
    for task in [cfg.task, *cfg.extra_tasks]:
        try:
            task_mask_fn(task)
        except ConfigError as exc:
            raise ConfigError(f"task={task!r}: {exc}") from None


def prepare_data(cfg: DictConfig) -> Path:
    """Shards + manifest for the configured class split (cached by its hash)."""
    return prepare(instantiate(cfg.data.source), Path(cfg.paths.cache_dir) / "data", **config_kwargs(cfg.data))


def datamodule(cfg: DictConfig, data_dir: Path, streams: dict, batch_size: int, steps: int, seed: int,
               patch: int) -> ForgetRetainDataModule:
    return ForgetRetainDataModule(
        data_dir, streams=streams, batch_size=batch_size, epoch_batches=steps,
        num_workers=cfg.data.num_workers, patch=patch, mask_ratio=tuple(cfg.data.mask_ratio),
        mask_kinds=tuple(cfg.data.mask_kinds), seed=seed, fixed_task=cfg.data.get("train_task"),
        shared_mask_shape=bool(cfg.data.get("shared_mask_shape", False)),
    )


def perf_options(cfg: DictConfig) -> dict:
    """The fast-path switches of ``cfg.perf`` (conf/config.yaml; README "Performance")."""
    p = cfg.get("perf") or {}
    return {"batch_teacher": bool(p.get("batch_teacher", True)), "teacher_cache": bool(p.get("teacher_cache", False)),
            "channels_last": bool(p.get("channels_last", False)), "compile": bool(p.get("compile", False))}


def trainer(cfg: DictConfig, max_steps: int, logger=False, root: Path | None = None,
            resume_dir: Path | None = None) -> L.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` for ``max_steps`` optimiser steps; with ``resume_dir``
    it checkpoints every ``resume.every_n_steps`` steps there (see checkpointing.py)."""
    extra = checkpointing.callbacks(resume_dir, cfg.resume.every_n_steps) if resume_dir is not None else []
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True), max_steps=max_steps, max_epochs=-1,
        logger=logger, enable_checkpointing=False, enable_model_summary=False, callbacks=extra,
        enable_progress_bar=sys.stderr.isatty(), default_root_dir=str(root) if root else None,
    )


def split_tensors(dm: ForgetRetainDataModule, splits: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of ``splits`` in memory (small data sets: feature-net training)."""
    xs, ys = [], []
    for s in splits:
        for b in dm.eval_batches(s, "center_half", batch_size=1024):
            xs.append(b["image"])
            ys.append(b["label"])
    return torch.cat(xs), torch.cat(ys)


def feature_net(cfg: DictConfig, data_dir: Path, dm: ForgetRetainDataModule):
    """The default feature network, trained once on all training classes and cached with the data."""
    x_train, y_train = split_tensors(dm, list(TRAIN_SPLITS))
    x_test, y_test = split_tensors(dm, ["forget_eval", "retain_eval", "proxy_eval"])
    train_batches, test_batches = tensor_batches(x_train, y_train, x_test, y_test, seed=0)
    fcfg = cfg.metrics.feature_net
    return load_or_train_feature_net(
        data_dir, key=stable_hash({"epochs": fcfg.epochs, "lr": fcfg.lr}, 8),
        train_batches=train_batches, test_batches=test_batches, channels=dm.channels,
        num_classes=dm.num_classes, image_size=dm.image_size, epochs=fcfg.epochs, lr=fcfg.lr, seed=0,
    )


def stage_context(cfg: DictConfig, data_dir: Path, kind: str, patch: int, workdir: Path, net) -> StageContext:
    """Data access for a family's pre-training stages, on the splits of ``kind``."""
    rec = cfg.model.train

    def train_batches(n: int):
        dm = datamodule(cfg, data_dir, {"train": STREAM_SPLITS[kind]}, rec.batch_size, n, rec.seed, patch)
        for batch, _, _ in iter(dm.train_dataloader()):
            yield batch["train"]

    eval_dm = datamodule(cfg, data_dir, {"train": STREAM_SPLITS[kind]}, 1, 1, rec.seed, patch)
    return StageContext(
        train_batches=train_batches,
        eval_batches=lambda split: eval_dm.eval_batches(split, cfg.task, batch_size=cfg.metrics.eval_batch_size),
        workdir=workdir, feature_net=net, seed=rec.seed,
    )


def model_cache_path(cfg: DictConfig, data_dir: Path, kind: str) -> Path:
    """Where ``trained_model`` caches the ``kind`` model of this config (its .json beside it)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("pretrained", None)  # never part of the key: retrain is trained either way
    if model_cfg.get("pretrained_tokenizer", 0) is None:  # unset: the key it always had
        del model_cfg["pretrained_tokenizer"]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    degradation = {k: OmegaConf.to_container(cfg.data)[k] for k in ("mask_ratio", "mask_kinds", "num_workers")}
    if cfg.data.get("train_task"):  # keys of models trained on random masks stay as they were
        degradation["train_task"] = cfg.data.train_task
    key = stable_hash({"data": manifest["config_hash"], "degradation": degradation, "model": model_cfg,
                       "kind": kind, "precision": cfg.trainer.precision})
    return Path(cfg.paths.cache_dir) / "models" / f"{cfg.model.name}-{kind}-{key}.pt"


def trained_model(cfg: DictConfig, data_dir: Path, kind: str, net=None) -> tuple[Family, dict]:
    """The family trained on all classes (``original``) or on retain only (``retrain``), cached; with
    ``model.pretrained`` set, the original is loaded from that file instead (the retrain is trained)."""
    if cfg.model.get("pretrained") is not None and kind == "original":
        return pretrained_model(cfg, cfg.model.pretrained)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    path = model_cache_path(cfg, data_dir, kind)
    meta_path = path.with_suffix(".json")
    rec = cfg.model.train
    L.seed_everything(rec.seed, workers=True, verbose=False)
    model: Family = instantiate(cfg.model, _convert_="all")  # plain containers: checkpoints load weights_only
    if path.exists() and meta_path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), json.loads(meta_path.read_text())
    n_images = sum(manifest["splits"][s]["count"] for s in STREAM_SPLITS[kind])
    steps = max(1, math.ceil(rec.epochs * n_images / rec.batch_size))
    log.info("training the %s %s model: %g epochs of %d images = %d steps of %d (cached as %s)",
             kind, cfg.model.name, rec.epochs, n_images, steps, rec.batch_size, path.name)
    model.train_cfg["steps"] = steps  # the lr schedule spans the whole run
    dm = datamodule(cfg, data_dir, {"train": STREAM_SPLITS[kind]}, rec.batch_size, steps, rec.seed,
                    model.mask_patch)
    perf = perf_options(cfg)
    if perf["channels_last"]:
        to_channels_last(model)
    if perf["compile"]:
        compile_hooks(model)
    t0 = time.perf_counter()
    pre = model.pre_train(stage_context(cfg, data_dir, kind, model.mask_patch, path.with_suffix(""), net))
    pre_train_s = time.perf_counter() - t0
    resume_dir = path.with_suffix("") / "resume"
    tr = trainer(cfg, steps, root=path.parent, resume_dir=resume_dir)
    checkpointing.fit_resumable(tr, model, dm, resume_dir)
    meta = {"kind": kind, "train_s": time.perf_counter() - t0, "pre_train_s": pre_train_s, "pre_train": pre,
            "steps": steps, "images": n_images,
            "epochs": rec.epochs, "batch_size": rec.batch_size, "splits": STREAM_SPLITS[kind],
            "final_loss": float(tr.callback_metrics.get("train/loss", float("nan")))}
    if tr.global_rank == 0:
        torch_save(path, model.state_dict())
        write_json(meta_path, meta)
    return model.eval(), meta


def pretrained_model(cfg: DictConfig, path: str) -> tuple[Family, dict]:
    """The original model loaded from ``model.pretrained`` (a local weights file, see weights.py), not trained."""
    model: Family = instantiate(cfg.model, _convert_="all")
    info = load_weights(model, path, what="model.pretrained")
    log.info("original %s model: %d tensors loaded from %s", cfg.model.name, info["tensors"], info["path"])
    return model.eval(), {"kind": "original", "train_s": 0.0, "pre_train": {}, "pretrained": info}


def unlearn(cfg: DictConfig, data_dir: Path, start: Family, method: UnlearningMethod, logger,
            resume_dir: Path) -> tuple[Family, float]:
    """Run ``method`` from ``start`` (resuming from ``resume_dir`` if an earlier attempt was cut off);
    returns the unlearned family and the wall-clock seconds of this attempt."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    perf = perf_options(cfg)
    module = UnlearnModule(start, method, **perf)
    streams = {"retain": [method.retain_split]}
    if method.needs_forget:
        streams["forget"] = ["forget_train"]
    dm = datamodule(cfg, data_dir, streams, method.batch_size, method.steps, cfg.seed, start.mask_patch)
    t0 = time.perf_counter()
    checkpointing.fit_resumable(trainer(cfg, method.steps, logger=logger, resume_dir=resume_dir), module, dm,
                                resume_dir)
    return module.student.eval(), time.perf_counter() - t0


def batch_seed(*place) -> int:
    """A seed of one eval batch from its place (run seed, task, split, batch index): its outputs do not
    depend on which rank makes them or on the batches before it."""
    return zlib.crc32("/".join(map(str, place)).encode())


@contextmanager
def seeded(seed: int, device: torch.device):
    """Global RNG (CPU and ``device``) seeded for a block and restored after it (e.g. ``sample_state`` draws)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def member_scores(cfg: DictConfig, dm: ForgetRetainDataModule, model: Family, original: Family, split: str,
                  task: str, n: int, device: torch.device) -> torch.Tensor:
    """Membership scores (``audit.sample_scores``) of the first ``n`` images of a training split."""
    def scores(i: int, b: dict) -> torch.Tensor:
        seed = batch_seed(cfg.seed, "members", task, split, i)
        x, m = b["image"].to(device), b["mask"].to(device)
        with seeded(seed, device):
            return sample_scores(model, original, x, m, model.restore(x, m, generator=_generator(seed, device)))

    batches = dm.eval_batches(split, task, batch_size=cfg.metrics.eval_batch_size, limit=n)
    return torch.cat(list(distributed.ordered_map(scores, batches)))


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def evaluate(cfg: DictConfig, dm: ForgetRetainDataModule, model: Family, original: Family, net,
             device: torch.device | None = None, embed_net=None) -> tuple[dict, dict, dict, dict]:
    """Restore the eval images of each split and score outputs against their ground truth.

    Returns (metrics, floors, grid rows, embeddings): embeddings are the feature-network embeddings of
    the first ``metrics.tsne_points`` outputs and ground truths per split (the report's t-SNE). Floors:
    class accuracy of the degraded input with the hole filled grey / with noise, the level the table is
    read against. With ``metrics.audit``: KL / MI per split and task, and on the headline task the
    membership audit, <split>_train images (members of the original, as many as eval images) against
    <split>_eval. Under DDP (joined ranks) the batches are shared out over the ranks (distributed.py);
    every batch has a generator and RNG seed of its own, so the result does not depend on the rank count.
    """
    device = device or torch.device("cpu")
    model, original, net = model.to(device), original.to(device), net.to(device)
    if embed_net is not None:
        embed_net = embed_net.to(device)
    metrics, floors, grid, embeddings = {}, {}, {}, {}
    k = cfg.metrics.grid_images
    audit = bool(cfg.metrics.get("audit", False))

    def record(task: str, split: str, scorer: SplitScorer, i: int, b: dict) -> dict:
        """Everything evaluation needs of eval batch ``i``, as small CPU tensors (made on any rank)."""
        seed = batch_seed(cfg.seed, task, split, i)
        x, m = b["image"].to(device), b["mask"].to(device)
        with seeded(seed, device):  # fills with noise and `sample_state` draws from the global RNG
            out = model.restore(x, m, generator=_generator(seed, device))
            rec = {"features": scorer.features(out, x), "labels": b["label"]}
            if task != cfg.task:
                return rec
            if audit:
                rec["nonmembers"] = sample_scores(model, original, x, m, out)
            rec["grey"] = class_acc(net, fill(x, m, "grey"), b["label"]) * len(x)
            rec["noise"] = class_acc(net, fill(x, m, "noise"), b["label"]) * len(x)
            if i == 0:
                rec["grid"] = {
                    "ground truth": x[:k], "input": fill(x[:k], m[:k], "grey"),
                    "original": original.restore(x[:k], m[:k], generator=_generator(seed, device)),
                    cfg.method.name: out[:k],
                }
                rec["grid"] = {name: v.cpu() for name, v in rec["grid"].items()}
        return rec

    for task in [cfg.task, *cfg.extra_tasks]:
        headline = task == cfg.task
        prefix = "" if headline else f"{task}_"
        for split in ("retain", "forget"):
            scorer = SplitScorer(net, device=device, is_splits=cfg.metrics.is_splits, audit=audit,
                                 keep_embeddings=cfg.metrics.get("tsne_points", 0) if headline else 0,
                                 embed_net=embed_net)
            grey_hits = noise_hits = n = 0
            nonmembers = []
            batches = dm.eval_batches(f"{split}_eval", task, batch_size=cfg.metrics.eval_batch_size,
                                      limit=cfg.metrics.eval_limit)
            for rec in distributed.ordered_map(partial(record, task, split, scorer), batches):
                scorer.add(rec["features"], rec["labels"])
                if headline:
                    grey_hits, noise_hits = grey_hits + rec["grey"], noise_hits + rec["noise"]
                    n += len(rec["labels"])
                    nonmembers += [rec["nonmembers"]] if "nonmembers" in rec else []
                    grid.update({f"{split}: {name}": v for name, v in rec.get("grid", {}).items()})
            for name, value in scorer.compute().items():
                metrics[f"{prefix}{split}_{name}"] = float(value)
            embeddings.update({f"{split}_{name}": v.numpy() for name, v in scorer.embeddings().items()})
            if nonmembers:
                nonmembers = torch.cat(nonmembers)
                members = member_scores(cfg, dm, model, original, f"{split}_train", task, len(nonmembers), device)
                for name, value in membership_audit(members, nonmembers, seed=cfg.seed).items():
                    metrics[f"{split}_{name}"] = value
            if headline:
                floors[f"{split}_class_acc_grey"] = grey_hits / max(n, 1)
                floors[f"{split}_class_acc_noise"] = noise_hits / max(n, 1)
    return metrics, floors, grid, embeddings


def evaluate_on(device: torch.device, cfg: DictConfig, dm: ForgetRetainDataModule, model: Family,
                original: Family, net, embed_net=None) -> tuple[dict, dict, dict, dict]:
    """``evaluate`` on ``device`` (a rank's entry point for ``distributed.launch``); results on the CPU."""
    metrics, floors, grid, embeddings = evaluate(cfg, dm, model, original, net, device=device, embed_net=embed_net)
    return metrics, floors, {k: v.cpu() for k, v in grid.items()}, embeddings


# ---- the run ------------------------------------------------------------------------------------
def run(cfg: DictConfig, run: Path, chash: str, logger=None) -> dict:
    """Execute one configured run into ``run`` and return its metrics.json content."""
    check_config(cfg)
    if gan_pipeline.check_pairing(cfg) == "gan":  # a GAN is not an image-to-image model: its own run path
        return gan_pipeline.run(cfg, run, chash, logger)
    method: UnlearningMethod = instantiate(cfg.method)
    patch = instantiate(cfg.model).mask_patch  # a model config that cannot work fails here, before data work
    data_dir = prepare_data(cfg)
    eval_dm = datamodule(cfg, data_dir, {"retain": ["retain_train"]}, 1, 1, cfg.seed, patch)
    net, embed_net, net_info = feature_models(cfg.metrics, lambda: feature_net(cfg, data_dir, eval_dm))
    original, original_meta = trained_model(cfg, data_dir, "original", net)
    start, start_meta = (original, original_meta) if method.start_from == "original" else \
        trained_model(cfg, data_dir, method.start_from, net)

    if method.trains:
        log.info("unlearning: %s on %s for %d steps", method.name, cfg.model.name, method.steps)
        model, unlearn_s = unlearn(cfg, data_dir, start, method, logger, run / "resume")
    else:
        model = start
        unlearn_s = start_meta["train_s"] if method.start_from == "retrain" else 0.0

    log.info("evaluating %s on %s", method.name, cfg.task)
    metrics, floors, grid, embeddings = distributed.launch(cfg.trainer, evaluate_on, cfg, eval_dm, model,
                                                           original, net, embed_net)
    save_grid(run / "grid.png", grid)
    if embeddings:
        def save_npz(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, **embeddings)

        write_atomic(run / "embeddings.npz", save_npz)
    torch_save(run / "checkpoint.pt", model.state_dict())
    return {
        "family": cfg.model.name, "method": method.name, "dataset": cfg.data.name, "seed": cfg.seed,
        "status": "ok", "error": None, "task": cfg.task, "unlearn_s": unlearn_s,
        "metrics": metrics, "floors": floors,
        "feature_net_test_acc": net_info.get("test_acc"),
        "original_train_s": original_meta["train_s"], "config_hash": chash,
        **{f"{method.start_from}_{k}": v for k, v in start_meta.get("pre_train", {}).items()},
    }


def write_config(cfg: DictConfig, run: Path) -> None:
    write_text(run / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
