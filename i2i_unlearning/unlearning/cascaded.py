"""Cascaded unlearning for GANs (Sun, Zhu, Chang, Zhou, "Generative Adversarial Networks Unlearning", 2023).

A documented RECONSTRUCTION: the paper's code is not public and only its abstract is verified
(docs/gan.md). Verified: unconditional GANs, item and class unlearning, a substitution
mechanism for the generator, a fake label for the discriminator, unlearning and learning stages
alternating. Everything else is a choice of ours, exposed as an option of `Cascaded`:

* R rounds (``rounds``) of
  - unlearning stage (``unlearn_steps``): D is trained with the forget images under the fake label
    (``fake_label``: 0 = hard, e.g. 0.1 = soft) and the substitutes as real, plus the usual G samples as
    fake; G is trained against it (non-saturating loss) and, for latent substitutes, to map the latent
    codes of the forget images to substitute images;
  - learning stage (``learn_steps``): ordinary GAN steps with retain images as real;
* ``substitutes``: ``generator`` (samples of the original G that are not near the forget set: for class
  unlearning the feature classifier must not assign them to a forgotten class; for item unlearning no
  forget image may lie within ``copy_rms`` pixel RMS), ``retain`` (retain training images), ``latent``
  (generator substitutes as real, plus the latent codes that best reproduce the forget images, found by
  inverting the original G, re-targeted to their nearest substitute), ``none`` (no substitution: the
  original G's unfiltered samples stand as real; the ``fake_label`` baseline);
* stop after the first round that meets the forgetting criterion (``stop``): class unlearning, at most
  ``stop_share`` of ``check_samples`` samples assigned to a forgotten class; item unlearning, D scores the
  forget images no higher than retained training images (AUC <= ``stop_auc``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor

from ..errors import ConfigError
from ..families.gan import DCGAN, BatchStream

SUBSTITUTES = ("generator", "retain", "latent", "none")


@dataclass
class GANContext:
    """What a GAN method gets from the run: the splits in memory, the classifier and a way to train."""

    forget: Tensor  # forget training images (N, C, H, W) in [0, 1]
    forget_keys: list[str]
    retain: Tensor  # retain training images
    retain_keys: list[str]
    forget_classes: list[int]  # class indices forgotten (empty for item unlearning)
    classify: Callable[[Tensor], Tensor]  # images -> predicted class indices (the feature net)
    fit: Callable[[DCGAN, BatchStream], None]  # trains the model on the stream (a Lightning fit)
    seed: int
    log: list = field(default_factory=list)


def forgotten_share(images: Tensor, classify: Callable[[Tensor], Tensor], forget_classes: list[int]) -> float:
    """Share of ``images`` the classifier assigns to one of ``forget_classes``."""
    pred = classify(images)
    return float(torch.isin(pred, torch.tensor(forget_classes, dtype=pred.dtype)).float().mean())


def select_generator_substitutes(samples: Tensor, ctx: GANContext, copy_rms: float) -> tuple[Tensor, int]:
    """The samples that may stand in for the forget set, and how many were rejected.

    Class unlearning rejects samples the classifier assigns to a forgotten class; item unlearning rejects
    near copies of a forget image (pixel RMS distance below ``copy_rms``).
    """
    if ctx.forget_classes:
        pred = ctx.classify(samples)
        keep = ~torch.isin(pred, torch.tensor(ctx.forget_classes, dtype=pred.dtype))
    else:
        dist = torch.cdist(samples.flatten(1), ctx.forget.flatten(1)) / samples[0].numel() ** 0.5
        keep = dist.min(dim=1).values >= copy_rms
    return samples[keep], int((~keep).sum())


def invert(model: DCGAN, images: Tensor, steps: int, lr: float, seed: int) -> Tensor:
    """Latent codes whose generation best reproduces ``images`` (Adam on pixel MSE, G frozen in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    g = copy.deepcopy(model.G).eval().requires_grad_(False)
    z = torch.randn(len(images), model.latent_dim, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(g(z), images) + 1e-3 * z.pow(2).mean()  # the prior keeps z where G was trained
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return z.detach()


def auc(members: Tensor, non_members: Tensor) -> float:
    """ROC AUC of scores that should rank members above non-members (0.5 = no separation)."""
    y = torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))]).numpy()
    return float(roc_auc_score(y, torch.cat([members, non_members]).double().numpy()))


def retain_stream(images: Tensor, keys: list[str], batch_size: int, steps: int, seed: int) -> BatchStream:
    """Ordinary GAN steps with ``images`` as real: the learning stage, fine-tuning, and (all data) pre-training."""
    return BatchStream({"retain": {"real": images, "real_key": keys}}, {"retain": batch_size}, steps, seed)


class GANMethod:
    """Base of GAN-only unlearning methods: `run` unlearns a whole model (an image-to-image model cannot run them)."""

    trains = True
    start_from = "original"

    def __init__(self, name: str):
        self.name = name

    def run(self, original: DCGAN, ctx: GANContext) -> tuple[DCGAN, dict]:
        """Unlearn from ``original`` (left untouched); return the new model and what the run did."""
        raise NotImplementedError


class Cascaded(GANMethod):
    """R rounds of unlearning stage + learning stage (module docstring: the reconstruction and its options)."""

    def __init__(self, name: str, rounds: int = 5, unlearn_steps: int = 20, learn_steps: int = 20,
                 batch_size: int = 64, lr: float = 2e-4, fake_label: float = 0.0, substitutes: str = "generator",
                 substitute_pool: int = 1024, copy_rms: float = 0.1, latent_steps: int = 200,
                 latent_lr: float = 0.05, latent_max_items: int = 256, anchor_weight: float = 1.0,
                 stop: bool = True, stop_share: float = 0.01, stop_auc: float = 0.5, check_samples: int = 512):
        super().__init__(name)
        if substitutes not in SUBSTITUTES:
            raise ConfigError(f"method.substitutes={substitutes!r}: use one of {', '.join(SUBSTITUTES)}")
        if rounds < 1 or unlearn_steps < 1 or learn_steps < 0 or batch_size < 1:
            raise ConfigError(
                f"method: rounds={rounds}, unlearn_steps={unlearn_steps}, learn_steps={learn_steps}, "
                f"batch_size={batch_size}: need rounds, unlearn_steps, batch_size >= 1 and learn_steps >= 0"
            )
        if not 0.0 <= fake_label < 0.5:
            raise ConfigError(f"method.fake_label={fake_label}: use 0 (hard) or a soft label below 0.5")
        self.rounds, self.unlearn_steps, self.learn_steps = int(rounds), int(unlearn_steps), int(learn_steps)
        self.batch_size, self.lr, self.fake_label = int(batch_size), float(lr), float(fake_label)
        self.substitutes, self.substitute_pool, self.copy_rms = substitutes, int(substitute_pool), float(copy_rms)
        self.latent_steps, self.latent_lr = int(latent_steps), float(latent_lr)
        self.latent_max_items, self.anchor_weight = int(latent_max_items), float(anchor_weight)
        self.stop, self.stop_share, self.stop_auc = bool(stop), float(stop_share), float(stop_auc)
        self.check_samples = int(check_samples)

    # ---- the pieces (tested one by one) --------------------------------------------------
    def substitute_pool_of(self, original: DCGAN, ctx: GANContext) -> tuple[dict, dict]:
        """The real side of the unlearning stage ({"real", "real_key"}) and a record of how it was built."""
        if self.substitutes == "retain":
            return {"real": ctx.retain, "real_key": list(ctx.retain_keys)}, {"substitutes": len(ctx.retain)}
        samples = original.sample(self.substitute_pool, torch.Generator().manual_seed(ctx.seed + 1))
        rejected = 0
        if self.substitutes != "none":
            samples, rejected = select_generator_substitutes(samples, ctx, self.copy_rms)
            if len(samples) == 0:
                raise ConfigError(
                    f"every one of the {self.substitute_pool} generator samples was rejected as a substitute; "
                    "raise method.substitute_pool or use method.substitutes=retain"
                )
        keys = [f"generated:{i}" for i in range(len(samples))]
        return {"real": samples, "real_key": keys}, {"substitutes": len(samples), "rejected": rejected}

    def anchors(self, original: DCGAN, ctx: GANContext, substitutes: Tensor) -> dict:
        """Latent substitution: codes of (up to ``latent_max_items``) forget images -> their nearest substitute."""
        gen = torch.Generator().manual_seed(ctx.seed + 2)
        idx = torch.randperm(len(ctx.forget), generator=gen)[: self.latent_max_items]
        z = invert(original, ctx.forget[idx], self.latent_steps, self.latent_lr, ctx.seed + 3)
        nearest = torch.cdist(ctx.forget[idx].flatten(1), substitutes.flatten(1)).argmin(dim=1)
        return {"anchor_z": z, "anchor_x": substitutes[nearest]}

    def unlearning_stream(self, real: dict, anchors: dict | None, ctx: GANContext, seed: int) -> BatchStream:
        """Substitutes as real, the forget images as "fake" (the fake label), anchors when latent."""
        pools = {"substitutes": real, "forget": {"fake": ctx.forget, "fake_key": list(ctx.forget_keys)}}
        sizes = {"substitutes": self.batch_size, "forget": min(self.batch_size, len(ctx.forget))}
        if anchors is not None:
            pools["anchors"] = anchors
            sizes["anchors"] = min(self.batch_size, len(anchors["anchor_z"]))
        return BatchStream(pools, sizes, self.unlearn_steps, seed)

    def learning_stream(self, ctx: GANContext, seed: int) -> BatchStream:
        """Ordinary GAN steps on retain images only."""
        return retain_stream(ctx.retain, ctx.retain_keys, self.batch_size, self.learn_steps, seed)

    def criterion(self, model: DCGAN, ctx: GANContext) -> tuple[float, bool]:
        """The forgetting criterion's value and whether it holds (module docstring)."""
        if ctx.forget_classes:
            share = forgotten_share(model.sample(self.check_samples, torch.Generator().manual_seed(ctx.seed + 4)),
                                    ctx.classify, ctx.forget_classes)
            return share, share <= self.stop_share
        gen = torch.Generator().manual_seed(ctx.seed + 5)
        members = ctx.retain[torch.randperm(len(ctx.retain), generator=gen)[: max(len(ctx.forget), 2)]]
        value = auc(model.score(ctx.forget), model.score(members))
        return value, value <= self.stop_auc

    # ---- the cascade ---------------------------------------------------------------------------
    def run(self, original: DCGAN, ctx: GANContext) -> tuple[DCGAN, dict]:
        model = copy.deepcopy(original).train()
        model.train_cfg["lr"] = self.lr
        model.fake_target = self.fake_label
        model.anchor_weight = self.anchor_weight
        real, info = self.substitute_pool_of(original, ctx)
        anchors = self.anchors(original, ctx, real["real"]) if self.substitutes == "latent" else None
        info["criterion"] = []
        for r in range(self.rounds):
            ctx.fit(model, self.unlearning_stream(real, anchors, ctx, ctx.seed * 1000 + 2 * r))
            if self.learn_steps:
                ctx.fit(model, self.learning_stream(ctx, ctx.seed * 1000 + 2 * r + 1))
            value, met = self.criterion(model, ctx)
            info["criterion"].append(value)
            if self.stop and met:
                break
        info["rounds"] = len(info["criterion"])
        return model.eval(), info
