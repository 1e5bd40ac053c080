"""The generator-family interface every unlearning method is written against.

A family is an image-to-image model split into an encoder and a decoder. It is a
LightningModule trained on the I2I task (this is how the original and retrain models
are made) and it exposes the hooks the methods need:

* ``encoder_parameter_names()`` -- which parameters the encoder owns;
* ``embed(image, mask)``        -- the encoder's embedding(s) of the degraded image;
* ``target_of(image)``          -- the task's ground-truth target for an image;
* ``predict(image, mask)``      -- the model's prediction, in the same space as the target;
* ``task_loss(image, mask, target=None)`` -- its own training loss, optionally against a
  substituted target (a ``target_of`` or ``predict`` output of other images);
* ``restore(image, mask)``      -- the generated output image, known pixels kept;
* ``sample_state(image, mask)`` -- the randomness of one training input (a diffusion model's
  timestep and noise), or None for deterministic families. ``embed``, ``predict`` and
  ``task_loss`` take it as ``state=``, so a method can show student and teacher the same draw.

Hooks of the ``reference`` construction (the public code's losses, unlearning/methods.py):

* ``row_losses(image, mask, target=None)`` -- ``task_loss`` per row, each row reduced as the public
  code reduces a sample;
* ``raw_output(image, mask)``   -- the network's raw output over the whole image (``predict`` by default);
* ``noise_target(targets)``     -- random targets from N(mean, std^2) of a batch's targets;
* ``pure_noise_state(state)``   -- a state whose input holds pure noise in the hole (diffusion), or None.

Masks are float tensors (B,1,H,W) with 1 = missing pixel (to be generated), 0 = known.
Images are float tensors (B,C,H,W) in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from ..data.degrade import noise_image

Embedding = Tensor | list[Tensor]


@dataclass
class StageContext:
    """What the runner hands a family's pre-training stages (e.g. a VQ tokenizer)."""

    # (steps, batch size) -> a data module of that many training batches (stream "train") of the model's splits
    train_data: Callable[[int, int], L.LightningDataModule]
    # (module, data, name) -> trains ``module`` with the run's Trainer, resumable from a checkpoint dir of ``name``
    fit: Callable[[L.LightningModule, L.LightningDataModule, str], None]
    eval_batches: Callable[[str], Iterator[dict]]  # split name (e.g. "retain_eval") -> fixed eval batches
    workdir: Path  # where the stages may cache their own artifacts
    # a new scorer of restored images (update(outputs, truths, labels); compute() -> {"fid", ...}) for
    # quality records of a stage, or None when the run has no feature network yet
    scorer: Callable[[], Any] | None
    seed: int


class Family(L.LightningModule):
    """Base class of generator families; subclasses implement the hooks below."""

    mask_patch: int = 1  # masks are drawn on a grid of this many pixels (MAE: its patch size)

    def __init__(self, image_size: int, channels: int, train: dict | None = None):
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        self.train_cfg = dict(train or {})

    # ---- the contract -------------------------------------------------------------
    def encoder_parameter_names(self) -> set[str]:
        """Names (as in ``named_parameters``) of the parameters that form the encoder."""
        raise NotImplementedError

    def sample_state(self, image: Tensor, mask: Tensor) -> Any:
        """The random state of a training input for this batch (None: the family has none)."""
        return None

    def batchable(self, masks: list[Tensor]) -> bool:
        """Whether batches with these masks can run as one concatenated batch, each image's output
        unchanged (up to float round-off). Default: no; families that can say so override it."""
        return False

    def join_states(self, states: list[Any]) -> Any:
        """One state for concatenated batches (``batchable``); stateless families return None."""
        if any(s is not None for s in states):
            raise NotImplementedError(f"{type(self).__name__} has random states but no join_states")
        return None

    def embed(self, image: Tensor, mask: Tensor, state: Any = None) -> Embedding:
        """Encoder embedding(s) of the degraded image T(image); may be a list of tensors."""
        raise NotImplementedError

    def target_of(self, image: Tensor) -> Tensor:
        """The task's ground-truth target for ``image`` (pixels by default)."""
        return image

    def predict(self, image: Tensor, mask: Tensor, state: Any = None) -> Tensor:
        """The model's raw prediction for T(image), in the space of ``target_of``."""
        raise NotImplementedError

    def task_loss(self, image: Tensor, mask: Tensor, target: Tensor | None = None, state: Any = None) -> Tensor:
        """The family's own training loss on T(image); ``target`` replaces ``target_of(image)``."""
        raise NotImplementedError

    def row_losses(self, image: Tensor, mask: Tensor, target: Tensor | None = None, state: Any = None) -> Tensor:
        """``task_loss`` per row (B,): each row's loss reduced as the public code reduces one sample."""
        raise NotImplementedError(f"{type(self).__name__} has no row_losses: method.construction=reference needs it")

    def raw_output(self, image: Tensor, mask: Tensor, state: Any = None) -> Tensor:
        """The network's raw output for T(image) over the whole image (default: ``predict``)."""
        return self.predict(image, mask, state=state)

    def noise_target(self, targets: Tensor) -> Tensor:
        """Random targets shaped like ``targets``: N(mean, std^2) of their values (scalars), clipped to [0, 1]."""
        return noise_image(targets, "normal")

    def pure_noise_state(self, state: Any) -> Any:
        """``state`` with pure noise in the input's hole (the public code's diffusion noise input); None: no such
        state, the methods then use a noise image."""
        return None

    @torch.no_grad()
    def restore(self, image: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Generate the missing pixels of T(image); known pixels are kept."""
        raise NotImplementedError

    def pre_train(self, ctx: StageContext) -> dict:
        """Stages trained before the family's own I2I training, on the same data (the VQ-GAN's
        tokenizer). Returns figures to record with the model; the default has none."""
        return {}

    # ---- derived helpers ------------------------------------------------------------
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        names = self.encoder_parameter_names()
        return (p for n, p in self.named_parameters() if n in names)

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        names = self.encoder_parameter_names()
        return (p for n, p in self.named_parameters() if n not in names)

    # ---- training as the original / retrain model -----------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        b = batch["train"]
        loss = self.task_loss(b["image"], b["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b["image"].shape[0])
        return loss

    def configure_optimizers(self):
        """The recipe's ``optimizer`` and ``scheduler`` (``_partial_`` config nodes, model.train), the
        schedule stepped per optimiser step over the run's ``steps``."""
        cfg = self.train_cfg
        opt = instantiate(cfg.get("optimizer") or default_optimizer(cfg))(self.parameters())
        sched = instantiate(cfg.get("scheduler") or default_scheduler(cfg))(opt, total_steps=cfg.get("steps", 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a half-cosine from the peak lr to zero at ``total_steps``."""
    total = max(1, int(total_steps))
    warmup = min(int(warmup_steps), total - 1)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def default_optimizer(train: dict) -> dict:
    """The optimiser node of a family built in code without one (conf/model/ configs name theirs)."""
    return {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": train.get("lr", 1e-3),
            "weight_decay": train.get("weight_decay", 0.05), "betas": [0.9, 0.95]}


def default_scheduler(train: dict) -> dict:
    """The schedule node of a family built in code without one: `warmup_cosine`."""
    return {"_target_": "i2i_unlearning.families.base.warmup_cosine", "_partial_": True,
            "warmup_steps": train.get("warmup_steps", 0)}
