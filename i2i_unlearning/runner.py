"""The one stage runner: check -> prepare -> references (original, retrain; cached) -> unlearn -> evaluate
-> write, for every family.

`Runner` holds the stages every run shares; a variant fills the ones that differ (data loading, the
unlearning call, the metrics). The variant is chosen by ``model.runner._target_`` in the model config:
`I2IRunner` (here) for image-to-image families, `gan_runner.GANRunner` for the GAN. Expensive stages are
cached under ``paths.cache_dir`` by a hash of the config they depend on, so a sweep trains the original
and retrain models once and every cell reuses them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .atomic import locked, torch_save, write_atomic, write_json, write_text
from .attempts import StageClock
from .data.datamodule import ForgetRetainDataModule
from .data.prepare import VAL_PER_CLASS, check_split_config, config_kwargs, load_manifest, prepare, prepare_validation
from .errors import ConfigError
from .families.base import Family, StageContext
from .hashing import stable_hash
from .metrics.evaluate import SplitScorer
from .metrics.features import load_or_train_feature_net, tensor_batches
from .metrics.models import check_metrics_config, feature_models
from .metrics.restoration import RestorationEvaluation, logged_scores
from .metrics.validation_curve import ValidationCurve, stop_criterion
from .report.figures import save_grid
from .results import RunResult
from .runs import trainer_identity
from .training import fit_resumable, fitter, make_trainer
from .unlearning.module import UnlearnModule, compile_hooks, to_channels_last
from .weights import load_trusted, load_weights

log = logging.getLogger("i2iu")
TRAIN_SPLITS = ("forget_train", "retain_train", "proxy_train")
STREAM_SPLITS = {"original": list(TRAIN_SPLITS), "retrain": ["retain_train"]}
MODEL_META_KEYS = ("runner", "size", "sizes")  # model config keys the runner reads; not family arguments
METHOD_META_KEYS = ("val_every", "stop_at")  # method config keys the runner reads (validation_curve.py); not arguments
# Trainer settings of the feature network (the measuring instrument: small, trained once, in memory): its own
# recipe in one process, in fp32 and unclipped, whatever the trainer config says
SINGLE_PROCESS_FP32 = {"strategy": "auto", "devices": 1, "num_nodes": 1, "precision": "32-true",
                       "gradient_clip_val": None}
# evaluation: each rank reads its own share of the eval plan (no sampler); scores in float32 whatever the recipe;
# no_grad rather than inference_mode (the feature pass is shared by tensor version, which inference tensors lack)
EVAL_SETTINGS = {"use_distributed_sampler": False, "precision": "32-true", "inference_mode": False}


# ---- config -----------------------------------------------------------------------------------
def check_size(cfg: DictConfig) -> DictConfig:
    """``model.size`` names one of ``model.sizes`` (the keys a size sets read ``model.sizes.<size>``, so a key
    given on the command line still wins); ConfigError naming the choices otherwise."""
    size, sizes = cfg.model.get("size", "default"), cfg.model.get("sizes") or {}
    if sizes and size not in sizes:
        raise ConfigError(f"model.size={size!r}: model={cfg.model.name} has sizes {list(sizes)}")
    return cfg


def forget_repeat(train: DictConfig) -> int:
    """``model.train.forget_repeat`` of the recipe ``train`` (default 1): how many times as often as a retain image
    the original model sees each forget training image (the memorisation setting, every family); ConfigError
    naming the key unless an int >= 1."""
    value = train.get("forget_repeat", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"model.train.forget_repeat={value!r}: use an integer >= 1 (1: every training image "
                          "equally often)")
    return value


def build_family(model_cfg: DictConfig) -> Any:
    """The model of ``model_cfg`` (its ``_target_``), without the keys only the runner reads."""
    node = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k not in MODEL_META_KEYS}
    # plain containers, nested nodes left as data (the recipe's optimiser is built in configure_optimizers):
    # hyper-parameters in checkpoints then load with weights_only
    return instantiate(node, _convert_="all", _recursive_=False)


def build_method(method_cfg: DictConfig) -> Any:
    """The unlearning method of ``method_cfg`` (its ``_target_``), without the keys only the runner reads."""
    node = OmegaConf.to_container(method_cfg, resolve=True)
    return instantiate({k: v for k, v in node.items() if k not in METHOD_META_KEYS})


def build_runner(cfg: DictConfig, run_dir: Path, chash: str, logger=None) -> Runner:
    """The runner variant the model config names (``model.runner._target_``)."""
    node = cfg.model.get("runner")
    if node is None or "_target_" not in node:
        raise ConfigError(f"model={cfg.model.name} names no runner: add `runner: {{_target_: "
                          "i2i_unlearning.runner.I2IRunner}` to its config (conf/model/<name>.yaml)")
    return get_class(node["_target_"])(check_size(cfg), run_dir, chash, logger)


def perf_options(cfg: DictConfig) -> dict:
    """The fast-path switches of ``cfg.perf`` (conf/config.yaml; docs/performance.md)."""
    p = cfg.get("perf") or {}
    return {"batch_teacher": bool(p.get("batch_teacher", True)), "teacher_cache": bool(p.get("teacher_cache", False)),
            "channels_last": bool(p.get("channels_last", False)), "compile": bool(p.get("compile", False))}


# ---- data -------------------------------------------------------------------------------------
def prepare_data(cfg: DictConfig) -> Path:
    """Shards + manifest for the configured class or item split (cached by its hash)."""
    return prepare(instantiate(cfg.data.source), Path(cfg.paths.cache_dir) / "data", **config_kwargs(cfg.data))


def prepare_validation_data(cfg: DictConfig) -> Path:
    """The validation split beside the data dir (``data.val_per_class`` images per forget / retain class)."""
    return prepare_validation(instantiate(cfg.data.source), Path(cfg.paths.cache_dir) / "data",
                              cfg.data.get("val_per_class", VAL_PER_CLASS), **config_kwargs(cfg.data))


def datamodule(cfg: DictConfig, data_dir: Path, streams: dict, batch_size: int, steps: int, seed: int,
               patch: int) -> ForgetRetainDataModule:
    """Training streams (``streams``: name -> splits) of ``steps`` batches, masked on the fly."""
    return ForgetRetainDataModule(
        data_dir, streams=streams, batch_size=batch_size, epoch_batches=steps,
        num_workers=cfg.data.num_workers, patch=patch, mask_ratio=tuple(cfg.data.mask_ratio),
        mask_kinds=tuple(cfg.data.mask_kinds), seed=seed, fixed_task=cfg.data.get("train_task"),
        shared_mask_shape=bool(cfg.data.get("shared_mask_shape", False)),
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
    key = stable_hash({"epochs": fcfg.epochs, "lr": fcfg.lr}, 8)
    fit = fitter(cfg, ckpt_dir=data_dir / f"feature_net-{key}-resume", **SINGLE_PROCESS_FP32)
    return load_or_train_feature_net(
        data_dir, key=key, train_batches=train_batches, test_batches=test_batches, channels=dm.channels,
        num_classes=dm.num_classes, image_size=dm.image_size, epochs=fcfg.epochs, lr=fcfg.lr, seed=0, fit=fit,
    )


# ---- the stages ---------------------------------------------------------------------------------
class Runner:
    """One run into ``run_dir``: `execute` calls the stages in order and returns the metrics.json content.

    Shared here: the config check, data preparation, the scoring networks, the cached reference models
    (original loaded from ``model.pretrained`` or trained, retrain trained; both with the same recipe and
    resumable), and writing the run dir. A variant implements `accepts`, `reference_key`,
    `train_reference`, `unlearn` and `evaluate` (which writes the run's grid.png). A variant with
    ``validates = True`` runs ``method.val_every`` / ``method.stop_at`` (validation_curve.py).
    """

    validates = False

    def __init__(self, cfg: DictConfig, run_dir: Path, chash: str, logger=None):
        self.cfg, self.run_dir, self.chash, self.logger = check_size(cfg), Path(run_dir), chash, logger
        self.method = None
        self.mask_patch = 1
        self.data_dir: Path | None = None
        self.eval_dm: ForgetRetainDataModule | None = None
        self.nets: tuple = (None, None, {})
        self.refs: dict[str, tuple[Any, dict]] = {}

    # -- the run
    def execute(self) -> dict:
        """check -> prepare -> references -> unlearn -> evaluate -> write."""
        self.check()
        self.data_dir = self.prepare()
        self.nets = self.scoring_nets()
        self.load_references()
        model, unlearn_s, info = self.unlearn()
        log.info("evaluating %s on %s", self.method.name, self.cfg.model.name)
        metrics, floors, extra = self.evaluate(model)
        return self.write(model, unlearn_s, metrics, floors, {**info, **extra})

    # -- check
    def check(self) -> None:
        """Cheap consistency checks, before any data or training work (ConfigError naming the key)."""
        cfg = self.cfg
        if cfg.model.image_size != cfg.data.image_size:
            raise ConfigError(
                f"model.image_size={cfg.model.image_size} differs from data.image_size={cfg.data.image_size}"
            )
        if cfg.model.channels != cfg.data.channels:
            raise ConfigError(f"model.channels={cfg.model.channels} differs from data.channels={cfg.data.channels}")
        check_metrics_config(cfg.metrics)  # weights files of paper metrics: fail before any work
        self.method = build_method(cfg.method)
        problem = self.accepts(self.method)
        if problem:
            raise ConfigError(f"method={cfg.method.name} cannot run on model={cfg.model.name}: {problem}")
        stop_criterion(cfg.method)
        if cfg.method.get("val_every") is not None and not (self.validates and self.method.trains):
            raise ConfigError(f"method.val_every={cfg.method.val_every}: method={cfg.method.name} on "
                              f"model={cfg.model.name} has no unlearning stage to validate; drop method.val_every "
                              "and method.stop_at")
        # a model config that cannot work fails here, before data work
        self.mask_patch = getattr(build_family(cfg.model), "mask_patch", 1)

    def accepts(self, method) -> str | None:
        """None when this variant can run ``method``, else why not (with what to choose instead)."""
        raise NotImplementedError

    # -- prepare
    def prepare(self) -> Path:
        """Shards + manifest of the configured split (cached by its hash)."""
        return prepare_data(self.cfg)

    def scoring_nets(self) -> tuple:
        """(feature net, embedding net or None, info): ``metrics.features`` / ``metrics.embedding``. The
        eval data module (``self.eval_dm``) is the one evaluation reads too."""
        self.eval_dm = datamodule(self.cfg, self.data_dir, {"retain": ["retain_train"]}, 1, 1, self.cfg.seed,
                                  self.mask_patch)
        return feature_models(self.cfg.metrics, lambda: feature_net(self.cfg, self.data_dir, self.eval_dm))

    # -- references
    def load_references(self) -> None:
        """The reference models this run needs (``original`` always; ``needs_references``)."""
        for kind in self.needs_references():
            self.refs[kind] = self.reference(kind)

    def needs_references(self) -> list[str]:
        """The reference models this variant loads: the original, the model the method starts from, and the
        target of the stop criterion (``method.stop_at.target``)."""
        criterion = stop_criterion(self.cfg.method)
        return list(dict.fromkeys(["original", self.method.start_from, *([criterion.target] if criterion else [])]))

    def reference(self, kind: str) -> tuple[Any, dict]:
        """The family trained on all training images (``original``) or on retain only (``retrain``), cached;
        with ``model.pretrained`` set, the original is loaded from that file instead."""
        cfg, rec = self.cfg, self.cfg.model.train
        L.seed_everything(rec.seed, workers=True, verbose=False)
        model = build_family(cfg.model)
        if kind == "original" and cfg.model.get("pretrained") is not None:
            info = load_weights(model, cfg.model.pretrained, what="model.pretrained")
            log.info("original %s model: %d tensors loaded from %s", cfg.model.name, info["tensors"], info["path"])
            return model.eval(), {"kind": kind, "train_s": 0.0, "pre_train": {}, "pretrained": info}
        path = self.reference_path(kind)
        with locked(path.with_suffix(".lock"), f"the {kind} model {path.name}"):  # trained once, others wait
            return self._cached_reference(model, kind, path)

    def _cached_reference(self, model, kind: str, path: Path) -> tuple[Any, dict]:
        """The ``kind`` reference from its cache file ``path``, trained and cached first when it is missing."""
        meta_path = path.with_suffix(".json")
        if path.exists() and meta_path.exists():
            model.load_state_dict(load_trusted(path, f"Delete it and {meta_path.name} beside it: the {kind} model "
                                                     "is trained again on the next run."))
            return model.eval(), json.loads(meta_path.read_text())
        with StageClock(path.with_suffix(""), "train") as clock:  # the seconds of every attempt, summed
            meta = self.train_reference(model, kind, path.with_suffix(""))
        meta = {"kind": kind, "train_s": clock.total, "attempts": len(clock.seconds), **meta}
        if rank_zero_only.rank == 0:
            torch_save(path, model.state_dict())
            write_json(meta_path, meta)
        return model.eval(), meta

    def reference_path(self, kind: str) -> Path:
        """Where the ``kind`` reference model is cached (its record beside it, as .json)."""
        return Path(self.cfg.paths.cache_dir) / "models" / f"{self.cfg.model.name}-{kind}-{self.reference_key(kind)}.pt"

    def reference_key(self, kind: str) -> str:
        """The cache key of the ``kind`` reference model: everything its training depends on."""
        raise NotImplementedError

    def train_reference(self, model, kind: str, workdir: Path) -> dict:
        """Train ``model`` in place as the ``kind`` reference (checkpoints under ``workdir``); returns what
        to record with it (steps, images, recipe)."""
        raise NotImplementedError

    def start_model(self) -> tuple[Any, dict]:
        """The model the method starts from (``method.start_from``) and its record."""
        return self.refs[self.method.start_from]

    # -- unlearn / evaluate (variants)
    def unlearn(self) -> tuple[Any, float, dict]:
        """(the unlearned model, wall-clock seconds of unlearning, what to record of it)."""
        raise NotImplementedError

    def evaluate(self, model) -> tuple[dict, dict, dict]:
        """(metrics, floors, more to record): the variant's scores of ``model``."""
        raise NotImplementedError

    # -- write
    def write(self, model, unlearn_s: float, metrics: dict, floors: dict, info: dict) -> dict:
        """checkpoint.pt into the run dir; returns the metrics.json content."""
        torch_save(self.run_dir / "checkpoint.pt", model.state_dict())
        original_meta = self.refs["original"][1]
        return RunResult(
            family=self.cfg.model.name, method=self.method.name, dataset=self.cfg.data.name, seed=self.cfg.seed,
            status="ok", config_hash=self.chash, unlearn_s=unlearn_s, metrics=metrics, floors=floors,
            feature_net_test_acc=self.nets[2].get("test_acc"), original_train_s=original_meta["train_s"],
            extra=info,
        ).to_json()


class I2IRunner(Runner):
    """Image-to-image families (MAE, VQ-GAN, diffusion): masked training streams, `UnlearnModule`
    for every method with a loss, restoration metrics over the eval splits; validation curves and unlearning
    to a criterion (``method.val_every``, ``method.stop_at``) on a validation split beside the data."""

    validates = True
    val_dir: Path | None = None

    def prepare(self) -> Path:
        data_dir = super().prepare()
        if self.cfg.method.get("val_every") is not None:
            self.val_dir = prepare_validation_data(self.cfg)
        return data_dir

    def accepts(self, method) -> str | None:
        if not callable(getattr(method, "loss", None)):
            return ("it has no loss over (forget, retain) batches; image-to-image models run original, "
                    "retrain, finetune, ours, ours_proxy, max_loss, noisy_label, retain_label, random_encoder")
        forget_repeat(self.cfg.model.train)
        if self.cfg.data.get("forget_kind", "class") == "item":
            problem = self.item_problem(method)
            if problem:
                return problem
        for task in [self.cfg.task, *self.cfg.extra_tasks]:
            from .data.degrade import task_mask_fn

            try:
                task_mask_fn(task)
            except ConfigError as exc:
                raise ConfigError(f"task={task!r}: {exc}") from None
        return None

    def item_problem(self, method) -> str | None:
        """None when item unlearning (``data.forget_kind=item``) can run ``method`` with this data config, else
        why not. The retain-set-free variant and proxy classes stand other classes in for the retained ones,
        which item unlearning does not have (every class is retained), and the validation split holds
        held-out images of forgotten classes."""
        data = self.cfg.data
        if method.retain_split != "retain_train":
            return (f"method.retain_split={method.retain_split}: with data.forget_kind=item (data={data.name}) every "
                    "class is retained, so no proxy classes stand in for the retain set; use a method on "
                    "retain_train (e.g. method=ours)")
        if self.cfg.method.get("val_every") is not None:
            return (f"method.val_every={self.cfg.method.val_every}: the validation split holds held-out images of "
                    f"forgotten classes, which data.forget_kind=item (data={data.name}) has none of; drop "
                    "method.val_every and method.stop_at")
        _, classes, _ = check_split_config(instantiate(data.source), **config_kwargs(data))
        if classes["proxy"]:
            return (f"data.proxy_classes: with data.forget_kind=item the original trains on every training image "
                    f"and retrain on all but the forget items, so proxy classes {classes['proxy']} (trained by the "
                    "original only) would differ between them; set data.proxy_classes=[] or list every class in "
                    "data.retain_classes")
        return None

    def reference_splits(self, kind: str) -> list[str]:
        """The splits of the ``kind`` reference's training stream (`STREAM_SPLITS`). The original lists
        ``forget_train`` ``model.train.forget_repeat`` times: the stream draws shards uniformly with replacement,
        so each forget image comes up that many times as often as a retain image."""
        splits = list(STREAM_SPLITS[kind])
        if kind == "original":
            repeat = forget_repeat(self.cfg.model.train)
            splits = [part for split in splits for part in ([split] * repeat if split == "forget_train" else [split])]
        return splits

    def reference_key(self, kind: str) -> str:
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        model_cfg.pop("pretrained", None)  # never part of the key: retrain is trained either way
        train = model_cfg.get("train") or {}
        if kind != "original" or train.get("forget_repeat", 1) == 1:  # the original's only; 1 is the default
            train.pop("forget_repeat", None)
        manifest = json.loads((self.data_dir / "manifest.json").read_text())
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        degradation = {k: data.get(k) for k in ("mask_ratio", "mask_kinds", "num_workers", "train_task")}
        return stable_hash({"data": manifest["config_hash"], "degradation": degradation, "model": model_cfg,
                            "kind": kind, "trainer": trainer_identity(self.cfg)})

    def train_reference(self, model: Family, kind: str, workdir: Path) -> dict:
        cfg, rec = self.cfg, self.cfg.model.train
        manifest = json.loads((self.data_dir / "manifest.json").read_text())
        splits = self.reference_splits(kind)
        # an epoch is one pass of the stream: every retain image once, every forget image forget_repeat times
        n_images = sum(manifest["splits"][s]["count"] for s in splits)
        steps = max(1, math.ceil(rec.epochs * n_images / rec.batch_size))
        log.info("training the %s %s model: %g epochs of %d images = %d steps of %d (cached as %s.pt)",
                 kind, cfg.model.name, rec.epochs, n_images, steps, rec.batch_size, workdir.name)
        model.train_cfg["steps"] = steps  # the lr schedule spans the whole run
        dm = datamodule(cfg, self.data_dir, {"train": splits}, rec.batch_size, steps, rec.seed, model.mask_patch)
        perf = perf_options(cfg)
        if perf["channels_last"]:
            to_channels_last(model)
        if perf["compile"]:
            compile_hooks(model)
        t0 = time.perf_counter()
        pre = model.pre_train(self.stage_context(kind, model.mask_patch, workdir))
        pre_train_s = time.perf_counter() - t0
        tr = make_trainer(cfg, steps, ckpt_dir=workdir / "resume", root=workdir)
        fit_resumable(tr, model, dm, workdir / "resume")
        return {"pre_train_s": pre_train_s, "pre_train": pre, "steps": steps, "images": n_images,
                "epochs": rec.epochs, "batch_size": rec.batch_size, "splits": splits,
                **({"forget_repeat": splits.count("forget_train")} if kind == "original" else {}),
                "final_loss": float(tr.callback_metrics.get("train/loss", float("nan")))}

    def stage_context(self, kind: str, patch: int, workdir: Path) -> StageContext:
        """Data and training for a family's pre-training stages, on the splits of ``kind``: each stage trains
        with the run's Trainer (fp32, no clipping: a stage keeps its own recipe), resumable under ``workdir``."""
        cfg, rec = self.cfg, self.cfg.model.train

        def train_data(steps: int, batch_size: int) -> ForgetRetainDataModule:
            return datamodule(cfg, self.data_dir, {"train": self.reference_splits(kind)}, batch_size, steps,
                              rec.seed, patch)

        def fit(module: L.LightningModule, data: ForgetRetainDataModule, name: str) -> None:
            fitter(cfg, ckpt_dir=workdir / f"{name}-resume", gradient_clip_val=None, precision="32-true")(module, data)

        eval_dm = datamodule(cfg, self.data_dir, {"train": STREAM_SPLITS[kind]}, 1, 1, rec.seed, patch)
        return StageContext(
            train_data=train_data, fit=fit,
            eval_batches=lambda split: eval_dm.eval_batches(split, cfg.task, batch_size=cfg.metrics.eval_batch_size),
            workdir=workdir, seed=rec.seed,
            scorer=(lambda: SplitScorer(self.nets[0])) if self.nets[0] is not None else None,
        )

    def unlearn(self) -> tuple[Family, float, dict]:
        start, start_meta = self.start_model()
        method, cfg = self.method, self.cfg
        info = {f"{method.start_from}_{k}": v for k, v in start_meta.get("pre_train", {}).items()}
        if not method.trains:  # a reference: its cost is its training time
            return start, start_meta["train_s"] if method.start_from == "retrain" else 0.0, info
        counts = {split: info["count"] for split, info in load_manifest(self.data_dir)["splits"].items()}
        method.set_epochs(counts["forget_train"], counts[method.retain_split])
        log.info("unlearning: %s on %s for %d steps", method.name, cfg.model.name, method.steps)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        module = UnlearnModule(start, method, **perf_options(cfg))
        streams, sizes = {"retain": [method.retain_split]}, {"retain": method.batch_size}
        if method.needs_forget:
            streams["forget"], sizes["forget"] = ["forget_train"], method.forget_batch_size
        dm = datamodule(cfg, self.data_dir, streams, sizes, method.steps, cfg.seed, start.mask_patch)
        ckpt_dir = self.run_dir / "resume"
        settings, curve = unlearn_settings(method), self.validation_curve(start.mask_patch)
        callbacks = [*settings.pop("extra_callbacks", []), *([curve] if curve else [])]
        trainer = make_trainer(cfg, method.steps, logger=self.logger, ckpt_dir=ckpt_dir, root=self.run_dir,
                               extra_callbacks=callbacks, **settings)
        with StageClock(self.run_dir, "unlearn") as clock:  # unlearn_s: the seconds of every attempt, summed
            fit_resumable(trainer, module, dm, ckpt_dir)
        info = {**info, "unlearn_attempts": len(clock.seconds)}
        if curve is None:
            return module.student.eval(), clock.total, info
        record = {**curve.record(method.steps), "unlearn_steps": trainer.global_step}
        if "stop_result" in record:
            log.info("stop criterion (target %s): %s", record["stop_target"], record["stop_result"])
        return module.student.eval(), clock.total - curve.val_s, {**info, **record}

    def validation_curve(self, patch: int) -> ValidationCurve | None:
        """The unlearning stage's `ValidationCurve` (None without ``method.val_every``): validation.csv in the
        run dir, and the stop criterion against its target reference model."""
        cfg = self.cfg
        if cfg.method.get("val_every") is None:
            return None
        criterion = stop_criterion(cfg.method)
        dm = datamodule(cfg, self.val_dir, {"retain": ["retain_val"]}, 1, 1, cfg.seed, patch)
        return ValidationCurve(dm, self.nets[0], cfg.task, cfg.method.val_every, self.run_dir / "validation.csv",
                               cfg.seed, cfg.metrics.eval_batch_size, criterion,
                               self.refs[criterion.target][0] if criterion else None)

    def evaluate(self, model: Family) -> tuple[dict, dict, dict]:
        cfg, (net, embed_net, _) = self.cfg, self.nets
        metrics, floors = run_evaluation(cfg, self.eval_dm, model, self.refs["original"][0], net, embed_net,
                                         root=self.run_dir, artefacts=partial(write_eval_artefacts, self.run_dir))
        return metrics, floors, {"task": cfg.task}


def unlearn_settings(method) -> dict:
    """Trainer settings of a method's own recipe: its gradient clipping (unlearning steps only; the trainer
    config's value applies otherwise) and an EMA of the weights (``method.ema_decay``), which then is the result."""
    settings: dict[str, Any] = {}
    if method.gradient_clip_val is not None:
        settings["gradient_clip_val"] = float(method.gradient_clip_val)
    if method.ema_decay is not None:
        settings["extra_callbacks"] = [EMAWeightAveraging(decay=float(method.ema_decay))]
    return settings


def run_evaluation(cfg: DictConfig, dm: ForgetRetainDataModule, model: Family, original: Family, net,
                   embed_net=None, root: Path | None = None, artefacts=None, **trainer) -> tuple[dict, dict]:
    """(metrics, floors) of ``model``: ``trainer.test`` of `RestorationEvaluation` with the Trainer of
    ``cfg`` (``trainer`` replaces its settings); ``artefacts(grid, embeddings)`` is called on rank 0."""
    module = RestorationEvaluation(cfg, dm, model, original, net, embed_net, artefacts=artefacts)
    tester = make_trainer(cfg, logger=False, root=root, **{**EVAL_SETTINGS, **trainer})
    return logged_scores(tester.test(module, verbose=False))


def write_eval_artefacts(run_dir: Path, grid: dict[str, torch.Tensor], embeddings: dict) -> None:
    """grid.png and, when there are any, the t-SNE embeddings.npz of an evaluation (called on rank 0)."""
    save_grid(run_dir / "grid.png", grid)
    if embeddings:
        def save_npz(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, **embeddings)

        write_atomic(run_dir / "embeddings.npz", save_npz)


def write_config(cfg: DictConfig, run: Path) -> None:
    """The resolved config of a run, as ``config.yaml`` in its run dir."""
    write_text(run / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
