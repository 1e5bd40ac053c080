"""Unlearning methods, written only against the family interface (families/base.py).

Each method is chosen by Hydra ``_target_`` (conf/method/*.yaml) and says:
  * what it trains (``encoder_only``) and whether it trains at all (``trains``);
  * which model it starts from (``start_from``: the original, or the retrain reference);
  * which split stands for D_R (``retain_split``: ``retain_train``, or ``proxy_train``);
  * its loss on a forget batch and a retain batch, given the student and the frozen
    original (the teacher).

The formulas are METHODS.md section 1. Batches are dicts with "image" and "mask".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.degrade import noise_image
from ..errors import ConfigError
from ..families.base import Embedding, Family


def embedding_mse(student: Embedding, target: Embedding) -> Tensor:
    """Squared, mean-reduced L2 between embeddings; a list of feature maps is summed."""
    if isinstance(student, Tensor):
        return F.mse_loss(student, target)
    return sum(F.mse_loss(s, t) for s, t in zip(student, target, strict=True))


def _map(fn, emb: Embedding) -> Embedding:
    return fn(emb) if isinstance(emb, Tensor) else [fn(e) for e in emb]


def draw_state(student: Family, batch: dict):
    """One random state (e.g. a diffusion timestep and noise) for ``batch``, drawn once and given to
    the student and the teacher alike, so both see the same noisy input."""
    return student.sample_state(batch["image"], batch["mask"])


class UnlearningMethod:
    """Base class: a named loss over (forget, retain) batches plus what it trains."""

    trains = True
    encoder_only = False
    needs_forget = True
    start_from = "original"

    def __init__(
        self,
        name: str,
        alpha: float = 1.0,
        steps: int = 200,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        retain_split: str = "retain_train",
        noise: str = "normal",
    ):
        if retain_split not in ("retain_train", "proxy_train"):
            raise ConfigError(
                f"method.retain_split={retain_split!r}: use 'retain_train' or 'proxy_train' (retain-set-free)"
            )
        if self.trains and steps < 1:
            raise ConfigError(f"method.steps={steps}: a training method needs at least one step")
        self.name = name
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.retain_split = retain_split
        self.noise = noise

    def trainable_parameters(self, student: Family) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (the encoder only, or the whole model)."""
        return list(student.encoder_parameters() if self.encoder_only else student.parameters())

    def noise_like(self, images: Tensor) -> Tensor:
        """The noise image n of METHODS.md (moment-matched by default)."""
        return noise_image(images, self.noise)

    def loss(self, student: Family, teacher: Family, forget: dict | None, retain: dict) -> dict[str, Tensor]:
        """Return {"loss": total, "retain": retain term, "forget": forget term (if any)}."""
        raise NotImplementedError


class Reference(UnlearningMethod):
    """No unlearning step: ``original`` evaluates the original model, ``retrain`` the gold standard."""

    trains = False
    needs_forget = False

    def __init__(self, name: str, start_from: str = "original", **kwargs):
        if start_from not in ("original", "retrain"):
            raise ConfigError(f"method.start_from={start_from!r}: use 'original' or 'retrain'")
        super().__init__(name, **kwargs)
        self.start_from = start_from


class Ours(UnlearningMethod):
    """Encoder-only: retain embeddings stay E0's; forget embeddings go to E0(T(noise))."""

    encoder_only = True

    def loss(self, student, teacher, forget, retain):
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        with torch.no_grad():
            r_target = teacher.embed(retain["image"], retain["mask"], state=sr)
            f_target = teacher.embed(self.noise_like(forget["image"]), forget["mask"], state=sf)
        r = embedding_mse(student.embed(retain["image"], retain["mask"], state=sr), r_target)
        f = embedding_mse(student.embed(forget["image"], forget["mask"], state=sf), f_target)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class RandomEncoder(UnlearningMethod):
    """Encoder-only: forget target = Gaussian with the statistics of E0's forget embeddings."""

    encoder_only = True

    def loss(self, student, teacher, forget, retain):
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        with torch.no_grad():
            r_target = teacher.embed(retain["image"], retain["mask"], state=sr)
            f_teacher = teacher.embed(forget["image"], forget["mask"], state=sf)
            f_target = _map(lambda t: torch.randn_like(t) * t.std() + t.mean(), f_teacher)
        r = embedding_mse(student.embed(retain["image"], retain["mask"], state=sr), r_target)
        f = embedding_mse(student.embed(forget["image"], forget["mask"], state=sf), f_target)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class MaxLoss(UnlearningMethod):
    """Full model, gradient ascent on forget: task loss on D_R minus alpha * task loss on D_F."""

    def loss(self, student, teacher, forget, retain):
        r = student.task_loss(retain["image"], retain["mask"])
        f = student.task_loss(forget["image"], forget["mask"])
        return {"loss": r - self.alpha * f, "retain": r, "forget": f}


class NoisyLabel(UnlearningMethod):
    """Full model: forget targets are the task targets of a noise image."""

    def loss(self, student, teacher, forget, retain):
        r = student.task_loss(retain["image"], retain["mask"])
        noisy_target = student.target_of(self.noise_like(forget["image"]))
        f = student.task_loss(forget["image"], forget["mask"], target=noisy_target)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class RetainLabel(UnlearningMethod):
    """Full model: distil D_R to the original's outputs; D_F targets = original outputs of
    *other* (retain) images of the batch under the forget mask."""

    def loss(self, student, teacher, forget, retain):
        xr, mr, xf, mf = retain["image"], retain["mask"], forget["image"], forget["mask"]
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        with torch.no_grad():
            r_target = teacher.predict(xr, mr, state=sr)
            others = xr[torch.arange(xf.shape[0], device=xr.device) % xr.shape[0]]
            f_target = teacher.predict(others, mf, state=sf)
        r = student.task_loss(xr, mr, target=r_target, state=sr)
        f = student.task_loss(xf, mf, target=f_target, state=sf)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class Finetune(UnlearningMethod):
    """Reference: continue training the full model on D_R only."""

    needs_forget = False

    def loss(self, student, teacher, forget, retain):
        r = student.task_loss(retain["image"], retain["mask"])
        return {"loss": r, "retain": r}
