"""DCGAN family: an unconditional generator G(z) and a discriminator D(x) for 32x32 images.

Not an image-to-image family (no masks, no restore): it has its own runner variant (gan_runner.py) and
its own unlearning method (unlearning/cascaded.py). One training step (`training_step`) serves every
stage that trains it: the original / retrain models (real = training images), the learning stage
of the cascade (real = retain images) and its unlearning stage, where a batch may also carry images
the discriminator must call fake (the forget set, under a hard or soft fake label) and latent
anchors the generator must map to given images (latent substitution).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


def _init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), norm weights N(1, 0.02) (spectral-normed convs keep theirs)."""
    if nn.utils.parametrize.is_parametrized(module):
        return
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (B, latent) -> image (B, C, 32, 32) in [0, 1]: transposed convs 4 -> 8 -> 16 -> 32 with BatchNorm."""

    def __init__(self, latent_dim: int, width: int, channels: int):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, w * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(w * 4), nn.ReLU(True),
            nn.ConvTranspose2d(w * 4, w * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 2), nn.ReLU(True),
            nn.ConvTranspose2d(w * 2, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return (self.net(z[:, :, None, None]) + 1.0) / 2.0


D_NORMS = ("spectral", "batch", "none")


class Discriminator(nn.Module):
    """image (B, C, 32, 32) in [0, 1] -> real/fake logit (B,): strided convs 32 -> 16 -> 8 -> 4 -> 1.

    ``norm``: ``spectral`` (spectral normalisation of every conv: stable, and an image's score never depends
    on its batch), ``batch`` (the DCGAN paper's BatchNorm) or ``none``.
    """

    def __init__(self, width: int, channels: int, norm: str = "batch"):
        super().__init__()
        if norm not in D_NORMS:
            raise ConfigError(f"model.d_norm={norm!r}: use one of {', '.join(D_NORMS)}")
        w = width
        sn = nn.utils.parametrizations.spectral_norm if norm == "spectral" else (lambda m: m)

        def bn(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()

        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, w, 4, 2, 1)), nn.LeakyReLU(0.2, True),
            sn(nn.Conv2d(w, w * 2, 4, 2, 1)), bn(w * 2), nn.LeakyReLU(0.2, True),
            sn(nn.Conv2d(w * 2, w * 4, 4, 2, 1)), bn(w * 4), nn.LeakyReLU(0.2, True),
            sn(nn.Conv2d(w * 4, 1, 4, 1, 0)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2.0 - 1.0).flatten()


class DCGAN(L.LightningModule):
    """DCGAN (Radford et al. 2016) at 32x32: latent ``latent_dim``, base width ``width`` (tiny preset: 8).

    Trained with manual optimisation (one D step, then one G step, per batch; Adam, non-saturating G
    loss). A batch is a dict with ``real`` (B, C, H, W) in [0, 1] and optionally ``fake`` (images D must
    score as ``fake_target``: the forget set in the unlearning stage) and ``anchor_z`` / ``anchor_x``
    (latent codes and the images G must produce from them, weighted by ``anchor_weight``).
    """


    def __init__(self, image_size: int = 32, channels: int = 1, latent_dim: int = 100, width: int = 32,
                 d_norm: str = "batch", train: dict | None = None, name: str = "gan",
                 eval: dict | None = None,  # name, eval, pretrained: read by the runner
                 pretrained: str | None = None):
        super().__init__()
        if image_size != 32:
            raise ConfigError(f"DCGAN: image_size={image_size}; this DCGAN generates 32x32 images "
                              "(set data.image_size=32)")
        if latent_dim < 1 or width < 1:
            raise ConfigError(f"DCGAN(latent_dim={latent_dim}, width={width}): both must be positive")
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.train_cfg = dict(train or {})
        self.G = Generator(latent_dim, width, channels)
        self.D = Discriminator(width, channels, d_norm)
        self.apply(_init)
        self.automatic_optimization = False
        self.fake_target = 0.0  # D's label for the batch's "fake" images (hard 0, or soft)
        self.anchor_weight = 1.0

    # ---- sampling and scoring ----------------------------------------------------------
    def latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n standard-normal latent codes (from ``generator`` when given, else the global RNG)."""
        return torch.randn(n, self.latent_dim, generator=generator).to(self.device)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 512) -> Tensor:
        """n generated images in [0, 1] with G in eval mode (mode restored afterwards)."""
        was = self.G.training
        self.G.eval()
        z = self.latent(n, generator)
        out = torch.cat([self.G(z[i:i + batch_size]) for i in range(0, n, batch_size)])
        self.G.train(was)
        return out.cpu()

    @torch.no_grad()
    def score(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """D's logit per image, D in eval mode (higher = judged real); the membership-inference score."""
        was = self.D.training
        self.D.eval()
        out = torch.cat([self.D(images[i:i + batch_size].to(self.device)) for i in range(0, len(images), batch_size)])
        self.D.train(was)
        return out.cpu()

    # ---- training ------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_d, opt_g = self.optimizers()
        real = batch["real"]
        z = self.latent(real.shape[0])
        fake = self.G(z)

        logits_real = self.D(real)
        logits_gen = self.D(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real)) + \
            F.binary_cross_entropy_with_logits(logits_gen, torch.zeros_like(logits_gen))
        if "fake" in batch:  # the fake label: D learns to reject these images
            logits_f = self.D(batch["fake"])
            d_loss = d_loss + F.binary_cross_entropy_with_logits(
                logits_f, torch.full_like(logits_f, float(self.fake_target)))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()

        logits = self.D(fake)
        g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        if "anchor_z" in batch:  # latent substitution: these codes must now give the substitutes
            g_loss = g_loss + self.anchor_weight * F.mse_loss(self.G(batch["anchor_z"]), batch["anchor_x"])
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        bs = real.shape[0]
        self.log("train/d_loss", d_loss, prog_bar=True, batch_size=bs)
        self.log("train/g_loss", g_loss, prog_bar=True, batch_size=bs)

    def configure_optimizers(self):
        lr = float(self.train_cfg.get("lr", 2e-4))
        betas = tuple(self.train_cfg.get("betas", (0.5, 0.999)))
        return (torch.optim.Adam(self.D.parameters(), lr=lr, betas=betas),
                torch.optim.Adam(self.G.parameters(), lr=lr, betas=betas))


class BatchStream(torch.utils.data.IterableDataset):
    """``steps`` batch dicts for `DCGAN.training_step`, drawn with replacement from named pools, seeded.

    ``pools`` maps a pool name to aligned fields (tensors or lists of the same length, e.g. {"real": images,
    "real_key": keys}); ``sizes`` maps a pool name to how many rows each batch draws from it. Every field of a
    pool lands in the batch under its own name, so keys travel with their images (the tests read them).
    """

    def __init__(self, pools: dict[str, dict], sizes: dict[str, int], steps: int, seed: int):
        super().__init__()
        for name, fields in pools.items():
            lengths = {len(v) for v in fields.values()}
            if len(lengths) != 1 or 0 in lengths:
                raise ConfigError(f"batch pool {name!r} has fields of lengths {sorted(lengths)}; "
                                  "need one non-zero length")
        if steps < 1 or set(sizes) != set(pools) or min(sizes.values()) < 1:
            raise ConfigError(f"BatchStream(steps={steps}, sizes={sizes}): need steps >= 1 and a positive size "
                              "per pool")
        self.pools, self.sizes, self.steps, self.seed = pools, sizes, steps, seed
        self.start = 0  # batches already trained (set on resume): they are drawn and skipped

    def __len__(self) -> int:
        # all the batches: a resumed fit restores Lightning's count of those already trained, and stops at this
        # length (steps - start would end it ``start`` batches early)
        return self.steps

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for step in range(self.steps):
            draws = {}
            for name, fields in self.pools.items():
                n = len(next(iter(fields.values())))
                draws[name] = torch.randint(n, (self.sizes[name],), generator=gen)
            if step < self.start:
                continue
            batch = {}
            for name, fields in self.pools.items():
                idx = draws[name]
                for key, value in fields.items():
                    batch[key] = value[idx] if isinstance(value, Tensor) else [value[i] for i in idx.tolist()]
            yield batch


class StreamData(L.LightningDataModule):
    """A `BatchStream` as a data module whose checkpoint state is its position: a resumed fit goes on with
    the batch after the last one trained, so it ends with the weights of an uninterrupted fit."""

    def __init__(self, stream: BatchStream) -> None:
        super().__init__()
        self.stream = stream

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.stream, batch_size=None)

    def state_dict(self) -> dict:
        """The batches trained so far: every batch steps each optimiser once (`DCGAN.training_step`)."""
        return {"position": self.trainer.global_step // len(self.trainer.optimizers)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stream.start = int(state_dict["position"])
