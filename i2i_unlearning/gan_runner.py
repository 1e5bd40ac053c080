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
from .runner import MODEL_META_KEYS, SINGLE_PROCESS_FP32, Runner
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


def gan_fitter(cfg: DictConfig, ckpt_dir: Path | None = None):
    """A function (model, BatchStream) -> None: one pass over the stream with the Trainer of ``cfg``;
    resumable from ``ckpt_dir`` when one is given (the stream restarts after the last batch trained)."""
    # manual optimisation (two optimisers): Lightning cannot clip, and its step count is per optimiser
    fit = fitter(cfg, ckpt_dir=ckpt_dir, gradient_clip_val=None)

    def fit_stream(model: DCGAN, stream: BatchStream) -> None:
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        fit(model, StreamData(stream))

    return fit_stream


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

    def prepare(self) -> Path:
        data_dir = super().prepare()
        self.manifest = load_manifest(data_dir)
        self.data = {s: load_split(data_dir, self.manifest, s) for s in EVAL_SPLITS}
        names = self.manifest["class_names"]
        self.forget_classes = [names.index(c) for c in self.manifest["forget_classes"]]
        return data_dir

    def needs_references(self) -> list[str]:
        """Both references: retrain is scored beside every method (item unlearning's MIA AUC)."""
        return ["original", "retrain"]

    def training_images(self, kind: str) -> tuple[torch.Tensor, list[str]]:
        """The images (sorted by key) and keys a ``kind`` reference learns from."""
        splits = ["forget_train", "retain_train"] if kind == "original" else ["retain_train"]
        images = torch.cat([self.data[s][0] for s in splits])
        keys = [k for s in splits for k in self.data[s][2]]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        return images[order], [keys[i] for i in order]

    def reference_key(self, kind: str) -> str:
        # What it learns from (source, image size, the sorted keys of its training images: class and item
        # unlearning on one data set share the original), the model config and the kind.
        _, keys = self.training_images(kind)
        source = instantiate(self.cfg.data.source)
        model = {k: v for k, v in OmegaConf.to_container(self.cfg.model, resolve=True).items()
                 if k not in ("eval", "pretrained", *MODEL_META_KEYS)}
        return stable_hash({"source": [source.name, source.settings()], "image_size": self.manifest["image_size"],
                            "images": stable_hash(keys, 16), "kind": kind, "model": model,
                            "trainer": {k: v for k, v in trainer_identity(self.cfg).items()
                                        if k != "gradient_clip_val"}})  # gan_fitter never clips

    def train_reference(self, model: DCGAN, kind: str, workdir: Path) -> dict:
        rec = self.cfg.model.train
        images, keys = self.training_images(kind)
        steps = max(1, math.ceil(rec.epochs * len(images) / rec.batch_size))
        log.info("training the %s %s GAN: %g epochs of %d images = %d steps of %d (cached as %s.pt)",
                 kind, self.cfg.model.name, rec.epochs, len(images), steps, rec.batch_size, workdir.name)
        gan_fitter(self.cfg, workdir / "resume")(model, retain_stream(images, keys, rec.batch_size, steps, rec.seed))
        return {"steps": steps, "images": len(images), "epochs": rec.epochs, "batch_size": rec.batch_size,
                "lr": rec.lr}

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
