"""The GAN run path (model configs with ``kind: gan``): prepare -> original / retrain DCGAN (cached) ->
unlearn (cascaded, fake_label, finetune) -> evaluate generated samples -> run dir.

A GAN is not an image-to-image model (no masks, no restore), so `pipeline.run` hands such configs here.
`check_pairing` keeps image-to-image methods off GAN models and GAN methods off image-to-image models.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from .atomic import torch_save, write_json
from .data.prepare import config_kwargs, load_manifest, prepare
from .data.shards import read_shard, verify_shards
from .errors import ConfigError
from .families.gan import DCGAN, BatchStream
from .metrics.evaluate import BatchFeatures, InceptionScoreStream, fid_metric
from .metrics.features import tensor_batches, train_feature_net
from .report.figures import save_grid
from .runs import stable_hash
from .unlearning.cascaded import GANContext, GANMethod, auc, forgotten_share, retain_stream
from .unlearning.methods import Finetune, Reference
from .weights import load_weights

log = logging.getLogger("i2iu")


# ---- which method runs on which model ---------------------------------------------------------
def model_kind(model_cfg) -> str:
    """``gan`` for model configs that say ``kind: gan``, else ``i2i`` (image-to-image families)."""
    return str(model_cfg.get("kind", "i2i"))


def method_kinds(method) -> set[str]:
    """Model kinds a method instance runs on: GAN methods on GANs; original/retrain/finetune on both."""
    if isinstance(method, GANMethod):
        return {"gan"}
    return {"i2i", "gan"} if type(method) in (Reference, Finetune) else {"i2i"}


def check_pairing(cfg: DictConfig, method=None) -> str:
    """The model kind, after checking the method can run on it (ConfigError naming both otherwise)."""
    method = instantiate(cfg.method) if method is None else method
    kind = model_kind(cfg.model)
    if kind not in method_kinds(method):
        what = "a GAN-only method" if isinstance(method, GANMethod) else "an image-to-image method"
        raise ConfigError(
            f"method={cfg.method.name} is {what} and model={cfg.model.name} is a {kind} model: they cannot be "
            f"paired; choose a method for {kind} models ({'cascaded, fake_label, ' if kind == 'gan' else ''}"
            "original, retrain, finetune, ...)"
        )
    if kind == "i2i" and cfg.data.get("forget_kind", "class") != "class":
        raise ConfigError(
            f"data.forget_kind={cfg.data.forget_kind} (data={cfg.data.name}) is for GAN models only; "
            f"model={cfg.model.name} unlearns classes (use data.forget_kind=class)"
        )
    return kind


# ---- data ---------------------------------------------------------------------------------------
def prepare_gan_data(cfg: DictConfig) -> Path:
    """Shards + manifest for the configured class or item split (cached by its hash)."""
    d = cfg.data
    kind = d.get("forget_kind", "class")
    items = d.get("forget_items")
    return prepare(
        instantiate(d.source), Path(cfg.paths.cache_dir) / "data", **config_kwargs(d), forget_kind=kind,
        forget_items=None if items is None else list(items),
        forget_item_count=d.get("forget_item_count") if kind == "item" and items is None else None,
    )


def load_split(data_dir: Path, manifest: dict, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A split in memory: images (N, C, H, W) float in [0, 1], labels (N,), keys (shard keys)."""
    verify_shards(data_dir, manifest, [split])
    c, s = manifest["channels"], manifest["image_size"]
    xs, ys, keys = [torch.zeros(0, c, s, s)], [torch.zeros(0, dtype=torch.int64)], []
    for shard in manifest["splits"][split]["shards"]:
        k, images, labels = read_shard(data_dir / shard["name"], c)
        xs.append(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
        ys.append(torch.from_numpy(labels))
        keys += k
    return torch.cat(xs), torch.cat(ys), keys


# ---- training -------------------------------------------------------------------------------------
def fitter(cfg: DictConfig):
    """A function (model, BatchStream) -> None that trains with a Lightning Trainer from ``cfg.trainer``."""
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    settings["gradient_clip_val"] = None  # manual optimisation (two optimisers): Lightning cannot clip

    def fit(model: DCGAN, stream: BatchStream) -> None:
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        tr = L.Trainer(**settings, max_epochs=1, logger=False, enable_checkpointing=False,
                       enable_model_summary=False, enable_progress_bar=sys.stderr.isatty())
        tr.fit(model, DataLoader(stream, batch_size=None))

    return fit


def trained_gan(cfg: DictConfig, data_dir: Path, kind: str, images: torch.Tensor, keys: list[str]) -> tuple[DCGAN, dict]:
    """The DCGAN trained on all training images (``original``) or retain only (``retrain``), cached.

    Keyed by what it learns from (the source, the image size and the sorted keys of its training
    images, so class and item unlearning on one data set share the original), the model config and
    the kind. Both use the same recipe (``model.train``); the training wall-clock time is recorded.
    """
    if cfg.model.get("pretrained") is not None and kind == "original":  # loaded, not trained
        L.seed_everything(cfg.model.train.seed, workers=True, verbose=False)
        model = instantiate(cfg.model)
        info = load_weights(model, cfg.model.pretrained, what="model.pretrained")
        log.info("original DCGAN: %d tensors loaded from %s", info["tensors"], info["path"])
        return model.eval(), {"kind": kind, "train_s": 0.0, "pretrained": info}
    manifest = load_manifest(data_dir)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    images, keys = images[order], [keys[i] for i in order]
    source = instantiate(cfg.data.source)
    key = stable_hash({"source": [source.name, source.settings()], "image_size": manifest["image_size"],
                       "images": stable_hash(keys, 16), "kind": kind,
                       "model": {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                                 if k not in ("eval", "pretrained")},
                       "precision": cfg.trainer.precision})
    path = Path(cfg.paths.cache_dir) / "models" / f"{cfg.model.name}-{kind}-{key}.pt"
    meta_path = path.with_suffix(".json")
    rec = cfg.model.train
    L.seed_everything(rec.seed, workers=True, verbose=False)
    model: DCGAN = instantiate(cfg.model)
    if path.exists() and meta_path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), json.loads(meta_path.read_text())
    steps = max(1, math.ceil(rec.epochs * len(images) / rec.batch_size))
    log.info("training the %s %s GAN: %g epochs of %d images = %d steps of %d (cached as %s)",
             kind, cfg.model.name, rec.epochs, len(images), steps, rec.batch_size, path.name)
    t0 = time.perf_counter()
    fitter(cfg)(model, retain_stream(images, keys, rec.batch_size, steps, rec.seed))
    meta = {"kind": kind, "train_s": time.perf_counter() - t0, "steps": steps, "images": len(images),
            "epochs": rec.epochs, "batch_size": rec.batch_size, "lr": rec.lr}
    torch_save(path, model.state_dict())
    write_json(meta_path, meta)
    return model.eval(), meta


# ---- evaluation -----------------------------------------------------------------------------------
def classifier(net):
    """images -> the feature net's predicted class (batched, no grad)."""
    @torch.no_grad()
    def classify(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(images[i:i + 512]).argmax(dim=1) for i in range(0, len(images), 512)])
    return classify


@torch.no_grad()
def sample_scores(net, samples: torch.Tensor, reference: torch.Tensor, is_splits: int) -> dict:
    """FID of ``samples`` against ``reference`` images and IS of ``samples`` (the default feature net)."""
    features = BatchFeatures(net)
    fid, inception = fid_metric(features), InceptionScoreStream(is_splits)
    for i in range(0, len(reference), 512):
        fid.update(reference[i:i + 512], real=True)
    for i in range(0, len(samples), 512):
        batch = samples[i:i + 512]
        fid.update(batch, real=False)
        inception.update(features(batch)[1])  # the feature pass FID just made, reused
    return {"fid": max(float(fid.compute()), 0.0), "is": inception.compute()}


def downstream_acc(samples: torch.Tensor, labels: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, epochs: int, seed: int) -> float:
    """Accuracy on real images of a small classifier trained only on generated samples (feature-net labels)."""
    train_batches, test_batches = tensor_batches(samples, labels, test_x, test_y, seed=seed)
    _, acc = train_feature_net(train_batches, test_batches, channels=samples.shape[1], num_classes=num_classes,
                               image_size=samples.shape[-1], epochs=epochs, seed=seed)
    return acc


def evaluate_gan(cfg: DictConfig, model: DCGAN, retrain: DCGAN | None, net, data: dict, forget_classes: list[int],
                 num_classes: int) -> tuple[dict, torch.Tensor]:
    """The metrics of one GAN (module docstring of gan_pipeline; names follow the I2I ones) and its samples."""
    ev = cfg.model.eval
    limit = cfg.metrics.eval_limit
    samples = model.sample(ev.samples, torch.Generator().manual_seed(cfg.seed))
    classify = classifier(net)
    retain_eval = data["retain_eval"][0][:limit]
    scores = sample_scores(net, samples, retain_eval, cfg.metrics.is_splits)
    metrics = {"retain_fid": scores["fid"], "retain_is": scores["is"]}
    if forget_classes:
        metrics["forget_class_share"] = forgotten_share(samples, classify, forget_classes)
        forget_eval = data["forget_eval"][0][:limit]
        if len(forget_eval) >= 2:
            metrics["forget_fid"] = sample_scores(net, samples, forget_eval, cfg.metrics.is_splits)["fid"]
    else:  # item unlearning: can D tell the forget images from images it never saw?
        forget = data["forget_train"][0]
        metrics["mia_auc"] = auc(model.score(forget), model.score(retain_eval))
        if retrain is not None:
            metrics["retrain_mia_auc"] = auc(retrain.score(forget), retrain.score(retain_eval))
    test_x, test_y = data["retain_eval"][0][:limit], data["retain_eval"][1][:limit]
    metrics["downstream_acc"] = downstream_acc(samples, classify(samples), test_x, test_y, num_classes,
                                               ev.downstream_epochs, cfg.seed)
    return metrics, samples


# ---- the run ----------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_path: Path, chash: str, logger=None) -> dict:
    """Execute one GAN run into ``run_path`` and return its metrics.json content.

    ``logger`` gets the final metrics from the CLI; the GAN stages themselves train without step logging.
    """
    from .pipeline import (  # the shared feature-net stage (pipeline imports this module)
        datamodule,
        feature_net,
    )

    method = instantiate(cfg.method)
    check_pairing(cfg, method)
    data_dir = prepare_gan_data(cfg)
    manifest = load_manifest(data_dir)
    net, net_info = feature_net(cfg, data_dir, datamodule(cfg, data_dir, {"retain": ["retain_train"]}, 1, 1, 0, 1))
    data = {s: load_split(data_dir, manifest, s) for s in ("forget_train", "retain_train", "forget_eval", "retain_eval")}
    names = manifest["class_names"]
    forget_classes = [names.index(c) for c in manifest["forget_classes"]]
    all_x = torch.cat([data["forget_train"][0], data["retain_train"][0]])
    all_keys = data["forget_train"][2] + data["retain_train"][2]
    original, original_meta = trained_gan(cfg, data_dir, "original", all_x, all_keys)
    retrain, retrain_meta = trained_gan(cfg, data_dir, "retrain", data["retain_train"][0], data["retain_train"][2])

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    info: dict = {}
    t0 = time.perf_counter()
    if isinstance(method, GANMethod):
        ctx = GANContext(forget=data["forget_train"][0], forget_keys=data["forget_train"][2],
                         retain=data["retain_train"][0], retain_keys=data["retain_train"][2],
                         forget_classes=forget_classes, classify=classifier(net), fit=fitter(cfg), seed=cfg.seed)
        model, info = method.run(original, ctx)
        unlearn_s = time.perf_counter() - t0
    elif isinstance(method, Finetune):
        model = _finetune(cfg, original, method, data["retain_train"])
        unlearn_s = time.perf_counter() - t0
    else:  # Reference: original, or the retrain model (its cost is its training time)
        model = retrain if method.start_from == "retrain" else original
        unlearn_s = retrain_meta["train_s"] if method.start_from == "retrain" else 0.0

    log.info("evaluating %s on %s (%s unlearning)", method.name, cfg.model.name, manifest.get("forget_kind", "class"))
    metrics, samples = evaluate_gan(cfg, model, retrain, net, data, forget_classes, len(names))
    metrics["unlearn_s"] = unlearn_s
    metrics["retrain_s"] = retrain_meta["train_s"]
    if method.trains:
        metrics["speedup"] = retrain_meta["train_s"] / max(unlearn_s, 1e-9)
    k = cfg.metrics.grid_images
    def grid_z() -> torch.Generator:  # the same latent codes before and after
        return torch.Generator().manual_seed(cfg.seed + 17)

    save_grid(run_path / "grid.png", {"original": original.sample(k, grid_z()), method.name: model.sample(k, grid_z())})
    torch_save(run_path / "checkpoint.pt", model.state_dict())
    return {
        "family": cfg.model.name, "method": method.name, "dataset": cfg.data.name, "seed": cfg.seed,
        "status": "ok", "error": None, "forget_kind": manifest.get("forget_kind", "class"),
        "unlearn_s": unlearn_s, "metrics": metrics, "floors": {},
        "feature_net_test_acc": net_info.get("test_acc"), "original_train_s": original_meta["train_s"],
        "models": {"original": original_meta, "retrain": retrain_meta},  # the shared recipe and its wall-clock
        "config_hash": chash, "unlearning": {k: v for k, v in info.items() if not isinstance(v, list)},
        "criterion": info.get("criterion"),
    }


def _finetune(cfg: DictConfig, original: DCGAN, method: Finetune, retain: tuple) -> DCGAN:
    """The finetune baseline: ``method.steps`` ordinary GAN steps on retain images from the original."""
    model = copy.deepcopy(original).train()
    model.train_cfg["lr"] = method.lr
    fitter(cfg)(model, retain_stream(retain[0], retain[2], method.batch_size, method.steps, cfg.seed))
    return model.eval()
