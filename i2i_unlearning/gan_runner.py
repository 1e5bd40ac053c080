"""The GAN variant of the stage runner (``runner: {_target_: i2i_unlearning.gan_runner.GANRunner}`` in
conf/model/gan.yaml): an unconditional DCGAN, original and retrain trained on images in memory, unlearned
by a GAN method (unlearning/cascaded.py), by finetuning on retain images, or not at all (the references);
scored on generated samples.

A GAN is not an image-to-image model (no masks, no restore): only data loading, the unlearning call and
the metrics differ from `runner.I2IRunner`; every other stage is `runner.Runner`'s.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .data.prepare import load_manifest
from .data.shards import read_shard, verify_shards
from .errors import ConfigError
from .families.gan import DCGAN, BatchStream, StreamData
from .hashing import stable_hash
from .metrics.evaluate import BatchFeatures, InceptionScoreStream, fid_metric
from .metrics.features import tensor_batches, train_feature_net
from .report.figures import save_grid
from .runner import MODEL_META_KEYS, SINGLE_PROCESS_FP32, Runner, forget_repeat
from .runs import trainer_identity
from .training import fitter
from .unlearning.cascaded import GANContext, auc, forgotten_share, retain_stream

log = logging.getLogger("i2iu")
EVAL_SPLITS = ("forget_train", "retain_train", "forget_eval", "retain_eval")


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


def gan_fitter(cfg: DictConfig, ckpt_dir: Path | None = None, callbacks: tuple[L.Callback, ...] = ()):
    """A function (model, BatchStream) -> None: one pass over the stream with the Trainer of ``cfg`` (and
    ``callbacks``); resumable from ``ckpt_dir`` when one is given (the stream restarts after the last batch
    trained, stateful callbacks from their checkpointed state)."""
    # manual optimisation (two optimisers): Lightning cannot clip, and its step count is per optimiser
    fit = fitter(cfg, ckpt_dir=ckpt_dir, gradient_clip_val=None, extra_callbacks=tuple(callbacks))

    def fit_stream(model: DCGAN, stream: BatchStream) -> None:
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        fit(model, StreamData(stream))

    return fit_stream


def train_options(rec: DictConfig) -> dict:
    """The reference-training options beyond the fixed recipe, checked (ConfigError naming the key):
    ``forget_repeat`` (1), ``patience`` (None = fixed epochs), ``val_samples`` (500), ``val_images`` (500)."""
    def integer(key: str, default, low: int, allow_none: bool = False):
        value = rec.get(key, default)
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"model.train.{key}={value!r}: need an integer >= {low}"
                              + (" or null" if allow_none else ""))
        return value

    return {"forget_repeat": forget_repeat(rec), "patience": integer("patience", None, 1, True),
            "val_samples": integer("val_samples", 500, 2), "val_images": integer("val_images", 500, 2)}


class ValidationFID(L.Callback):
    """The patience rule of reference training: after every epoch (every ``per_epoch`` batches, and after
    the last batch) the feature-net FID of ``samples`` generated images (fixed latent codes) against the
    held-out ``val_images``; stops the fit once it has not improved for ``patience`` epochs. Its state (the
    curve, the best epoch and its weights) travels in the resume checkpoint, so a resumed fit goes on with
    the same curve. ``best_state`` holds the best epoch's weights once the fit ends."""

    def __init__(self, net, val_images: torch.Tensor, samples: int, seed: int, per_epoch: int, steps: int,
                 patience: int, is_splits: int):
        self.net, self.val_images, self.samples, self.seed = net, val_images, samples, seed
        self.per_epoch, self.steps, self.patience, self.is_splits = per_epoch, steps, patience, is_splits
        self.curve: list[dict] = []
        self.best_state: dict | None = None

    @property
    def best(self) -> dict | None:
        return min(self.curve, key=lambda p: p["fid"]) if self.curve else None

    def stale(self) -> int:
        """Validations since the best one (the epochs without improvement)."""
        best = self.best
        return 0 if best is None else len(self.curve) - 1 - self.curve.index(best)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DCGAN, *args) -> None:
        position = trainer.global_step // len(trainer.optimizers)  # batches trained (StreamData's position)
        if position % self.per_epoch and position < self.steps:
            return
        samples = pl_module.sample(self.samples, torch.Generator().manual_seed(self.seed))
        fid = sample_scores(self.net, samples, self.val_images, self.is_splits)["fid"]
        self.curve.append({"epoch": round(position / self.per_epoch, 4), "step": position, "fid": fid})
        if self.best is self.curve[-1]:
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        log.info("validation FID after %g epochs: %.2f (best %.2f at %g)", self.curve[-1]["epoch"], fid,
                 self.best["fid"], self.best["epoch"])
        if self.stale() >= self.patience:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"curve": copy.deepcopy(self.curve), "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.curve, self.best_state = list(state_dict["curve"]), state_dict["best_state"]

    def record(self) -> dict:
        """What the reference's meta records of the rule."""
        best = self.best
        return {"patience": self.patience, "epochs_run": self.curve[-1]["epoch"], "steps_run": self.curve[-1]["step"],
                "best_epoch": best["epoch"], "best_val_fid": best["fid"], "val_fid_curve": self.curve,
                "converged": self.stale() >= self.patience, "kept": "best"}


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
    fid, inception = fid_metric(features), InceptionScoreStream(features.num_classes(), is_splits)
    for i in range(0, len(reference), 512):
        fid.update(reference[i:i + 512], real=True)
    for i in range(0, len(samples), 512):
        batch = samples[i:i + 512]
        fid.update(batch, real=False)
        inception.update(features(batch)[1])  # the feature pass FID just made, reused
    return {"fid": max(float(fid.compute()), 0.0), "is": inception.compute()}


def downstream_acc(cfg: DictConfig, samples: torch.Tensor, labels: torch.Tensor, test_x: torch.Tensor,
                   test_y: torch.Tensor, num_classes: int) -> float:
    """Accuracy on real images of a small classifier trained only on generated samples (feature-net labels)."""
    train_batches, test_batches = tensor_batches(samples, labels, test_x, test_y, seed=cfg.seed)
    _, acc = train_feature_net(train_batches, test_batches, channels=samples.shape[1], num_classes=num_classes,
                               image_size=samples.shape[-1], epochs=cfg.model.eval.downstream_epochs, seed=cfg.seed,
                               fit=fitter(cfg, **SINGLE_PROCESS_FP32))
    return acc


class GANRunner(Runner):
    """DCGAN runs: class or item unlearning (``data.forget_kind``), images held in memory."""

    def accepts(self, method) -> str | None:
        if getattr(method, "trains", True) and not callable(getattr(method, "run", None)) \
                and not getattr(method, "family_training", False):
            return ("it is an image-to-image method; GAN models run cascaded, fake_label, original, retrain, "
                    "finetune")
        paper = [f"metrics.{k}={self.cfg.metrics[k]}" for k, default in
                 (("features", "default"), ("embedding", "features")) if self.cfg.metrics.get(k, default) != default]
        if paper:
            raise ConfigError(f"{', '.join(paper)}: GAN runs score with the data set's own feature network only; "
                              f"drop these for model={self.cfg.model.name}")
        return None

    def check(self) -> None:
        super().check()
        self.options = train_options(self.cfg.model.train)

    def prepare(self) -> Path:
        """The splits in memory; with ``model.train.patience`` set, ``model.train.val_images`` retain training
        images (a fixed seeded draw, seed 0 over the sorted keys) are held out as the validation set of the
        patience rule: neither reference, nor any unlearning method, trains on them, and the evaluation
        (eval images) never sees them."""
        data_dir = super().prepare()
        self.manifest = load_manifest(data_dir)
        self.data = {s: load_split(data_dir, self.manifest, s) for s in EVAL_SPLITS}
        names = self.manifest["class_names"]
        self.forget_classes = [names.index(c) for c in self.manifest["forget_classes"]]
        self.val_images = None
        if getattr(self, "options", None) is None:
            self.options = train_options(self.cfg.model.train)
        if self.options["patience"] is not None:
            x, y, keys = self.data["retain_train"]
            n = self.options["val_images"]
            if n >= len(keys):
                raise ConfigError(f"model.train.val_images={n}: only {len(keys)} retain training images; hold out "
                                  "fewer")
            order = sorted(range(len(keys)), key=keys.__getitem__)
            held = sorted(order[i] for i in torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))[:n])
            kept = sorted(set(range(len(keys))) - set(held))
            self.val_images = x[held]
            self.data["retain_train"] = (x[kept], y[kept], [keys[i] for i in kept])
        return data_dir

    def needs_references(self) -> list[str]:
        """Both references: retrain is scored beside every method (item unlearning's MIA AUC)."""
        return ["original", "retrain"]

    def training_images(self, kind: str) -> tuple[torch.Tensor, list[str]]:
        """The images (sorted by key) and keys a ``kind`` reference learns from. The original holds each forget
        image ``model.train.forget_repeat`` times (memorisation: batches draw from these rows, so it sees each
        forget image that many times as often as a retain image; an epoch counts every row)."""
        splits = ["forget_train", "retain_train"] if kind == "original" else ["retain_train"]
        repeat = train_options(self.cfg.model.train)["forget_repeat"]
        images = torch.cat([self.data[s][0].repeat_interleave(repeat if s == "forget_train" else 1, dim=0)
                            for s in splits])
        keys = [k for s in splits for k in self.data[s][2] for _ in range(repeat if s == "forget_train" else 1)]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        return images[order], [keys[i] for i in order]

    def reference_key(self, kind: str) -> str:
        # What it learns from (source, image size, the sorted keys of its training images: class and item
        # unlearning on one data set share the original), the model config and the kind.
        _, keys = self.training_images(kind)
        source = instantiate(self.cfg.data.source)
        model = {k: v for k, v in OmegaConf.to_container(self.cfg.model, resolve=True).items()
                 if k not in ("eval", "pretrained", *MODEL_META_KEYS)}
        # options at their default, and forget_repeat for the retrain model (it never sees a forget image), leave
        # the key as it was before the options existed: existing caches stay valid, retrain is shared
        opts = train_options(self.cfg.model.train)
        drop = {"forget_repeat"} if kind != "original" or opts["forget_repeat"] == 1 else set()
        if opts["patience"] is None:
            drop |= {"patience", "val_samples", "val_images"}
        model["train"] = {k: v for k, v in model["train"].items() if k not in drop}
        return stable_hash({"source": [source.name, source.settings()], "image_size": self.manifest["image_size"],
                            "images": stable_hash(keys, 16), "kind": kind, "model": model,
                            "trainer": {k: v for k, v in trainer_identity(self.cfg).items()
                                        if k != "gradient_clip_val"}})  # gan_fitter never clips

    def train_reference(self, model: DCGAN, kind: str, workdir: Path) -> dict:
        """``model.train.epochs`` epochs of the training images (`training_images`: forget images repeated
        ``forget_repeat`` times for the original), batches drawn with replacement. With ``model.train.patience``
        P the epochs are a cap, in whole epochs of ceil(images / batch_size) batches: after each epoch the
        validation FID (`ValidationFID`: ``val_samples`` samples against the held-out images of `prepare`, the
        same for original and retrain) is computed, training stops once it has not improved for P epochs, and
        the best epoch's weights are kept. A relaunch resumes the fit with the rule's state."""
        rec, opts = self.cfg.model.train, train_options(self.cfg.model.train)
        images, keys = self.training_images(kind)
        per_epoch = max(1, math.ceil(len(images) / rec.batch_size))  # batches of one epoch
        steps = max(1, math.ceil(rec.epochs * (per_epoch if opts["patience"] is not None else
                                               len(images) / rec.batch_size)))
        log.info("training the %s %s GAN: %g epochs of %d images = %d steps of %d (cached as %s.pt)",
                 kind, self.cfg.model.name, rec.epochs, len(images), steps, rec.batch_size, workdir.name)
        rule = None
        if opts["patience"] is not None:
            rule = ValidationFID(self.nets[0], self.val_images, opts["val_samples"], rec.seed + 7, per_epoch, steps,
                                 opts["patience"], self.cfg.metrics.is_splits)
        gan_fitter(self.cfg, workdir / "resume", callbacks=(rule,) if rule else ())(
            model, retain_stream(images, keys, rec.batch_size, steps, rec.seed))
        forget = set(self.data["forget_train"][2])
        meta = {"steps": steps, "images": len(images), "epochs": rec.epochs, "batch_size": rec.batch_size,
                "lr": rec.lr, "forget_repeat": opts["forget_repeat"] if kind == "original" else 0,
                "forget_rows": sum(k in forget for k in keys)}
        if rule is not None:
            model.load_state_dict(rule.best_state)
            meta.update(rule.record(), val_images=len(self.val_images), val_samples=opts["val_samples"])
            log.info("%s: %s after %g epochs (best %g, validation FID %.2f)", kind,
                     "converged" if meta["converged"] else "hit the epoch cap", meta["epochs_run"],
                     meta["best_epoch"], meta["best_val_fid"])
        return meta

    def unlearn(self) -> tuple[DCGAN, float, dict]:
        cfg, method = self.cfg, self.method
        original, retrain_meta = self.refs["original"][0], self.refs["retrain"][1]
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        t0 = time.perf_counter()
        info: dict = {}
        forget, retain = self.data["forget_train"], self.data["retain_train"]
        if not method.trains:  # a reference: the retrain model's cost is its training time
            model = self.start_model()[0]
        elif callable(getattr(method, "run", None)):  # a GAN method
            ctx = GANContext(forget=forget[0], forget_keys=forget[2], retain=retain[0], retain_keys=retain[2],
                             forget_classes=self.forget_classes, classify=classifier(self.nets[0]),
                             fit=gan_fitter(cfg), seed=cfg.seed)
            model, info = method.run(original, ctx)
        else:  # finetune: the GAN's own training steps on retain images
            model = copy.deepcopy(original).train()
            model.train_cfg["lr"] = method.lr
            gan_fitter(cfg, self.run_dir / "resume")(model, retain_stream(retain[0], retain[2], method.batch_size,
                                                                          method.steps, cfg.seed))
            model = model.eval()
        unlearn_s = time.perf_counter() - t0 if method.trains else \
            retrain_meta["train_s"] if method.start_from == "retrain" else 0.0
        return model, unlearn_s, {"unlearning": {k: v for k, v in info.items() if not isinstance(v, list)},
                                  "criterion": info.get("criterion")}

    def evaluate(self, model: DCGAN) -> tuple[dict, dict, dict]:
        """Generated samples against real images: FID / IS against retain (and forget) eval images, the
        share of samples of a forgotten class or the discriminator's MIA AUC (item unlearning), and the
        accuracy of a classifier trained on samples."""
        cfg, ev, data, net = self.cfg, self.cfg.model.eval, self.data, self.nets[0]
        retrain, retrain_meta = self.refs["retrain"]
        limit = cfg.metrics.eval_limit
        samples = model.sample(ev.samples, torch.Generator().manual_seed(cfg.seed))
        classify = classifier(net)
        retain_eval = data["retain_eval"][0][:limit]
        scores = sample_scores(net, samples, retain_eval, cfg.metrics.is_splits)
        metrics = {"retain_fid": scores["fid"], "retain_is": scores["is"]}
        if self.forget_classes:
            metrics["forget_class_share"] = forgotten_share(samples, classify, self.forget_classes)
            forget_eval = data["forget_eval"][0][:limit]
            if len(forget_eval) >= 2:
                metrics["forget_fid"] = sample_scores(net, samples, forget_eval, cfg.metrics.is_splits)["fid"]
        else:  # item unlearning: can D tell the forget images from images it never saw?
            forget = data["forget_train"][0]
            metrics["mia_auc"] = auc(model.score(forget), model.score(retain_eval))
            metrics["retrain_mia_auc"] = auc(retrain.score(forget), retrain.score(retain_eval))
            metrics["forget_mia_auc"] = metrics["mia_auc"]  # the report's name: its retrain-gap shares read it
        test_x, test_y = data["retain_eval"][0][:limit], data["retain_eval"][1][:limit]
        metrics["downstream_acc"] = downstream_acc(cfg, samples, classify(samples), test_x, test_y,
                                                   len(self.manifest["class_names"]))
        return metrics, {}, {"forget_kind": self.manifest.get("forget_kind", "class"),
                             "models": {"original": self.refs["original"][1], "retrain": retrain_meta}}

    def write(self, model, unlearn_s: float, metrics: dict, floors: dict, info: dict) -> dict:
        metrics["unlearn_s"] = unlearn_s
        metrics["retrain_s"] = self.refs["retrain"][1]["train_s"]
        if self.method.trains:
            metrics["speedup"] = metrics["retrain_s"] / max(unlearn_s, 1e-9)
        save_grid(self.run_dir / "grid.png", self.grid(model))
        return super().write(model, unlearn_s, metrics, floors, info)

    def grid(self, model: DCGAN) -> dict[str, torch.Tensor]:
        """Samples of the original and the unlearned generator from the same latent codes."""
        k = self.cfg.metrics.grid_images

        def z() -> torch.Generator:  # the same latent codes before and after
            return torch.Generator().manual_seed(self.cfg.seed + 17)

        return {"original": self.refs["original"][0].sample(k, z()), self.method.name: model.sample(k, z())}
