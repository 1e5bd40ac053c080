"""The MaskGIT VQGAN tokenizer of the MAGE release (``vqgan_jax_strongaug.ckpt``, converted from JAX) for the
VQ-GAN family's ``model.tokenizer=maskgit``: the published structure, with the release's tensor names.

Structure (MAGE's tokenizer config: widths 128 x (1, 1, 2, 2, 4), two residual blocks per level, 256-d latents,
1024 codes; here ``tokenizer_channels``, ``tokenizer_layers``, ``latent_channels``, ``codebook_size``):

* residual block: GroupNorm (eps 1e-6) - swish - 3x3 conv without bias, twice. Where the width changes, a 1x1
  ``nin_shortcut`` (no bias) of the residual branch's *output* replaces the identity path (the JAX original's
  wiring, kept because the release's weights were trained with it).
* encoder: ``conv_in`` (3x3, no bias); per level its blocks, then a 2x2 average pool (no weights) between levels;
  ``mid.block_1`` / ``block_2``; GroupNorm, swish and a 1x1 ``conv_out`` (with bias) to the latent width.
* decoder: ``conv_in`` (3x3, with bias); ``mid``; per level, widest first, its blocks, then (all but the first
  level) nearest-neighbour x2 upsampling and a 3x3 conv with bias; GroupNorm, swish and a 3x3 ``conv_out``.
* no attention layers, no quant_conv / post_quant_conv: the codes live in the latent width, so ``codebook_dim``
  must equal ``latent_channels``.
* quantizer ``quantize.embedding``: the nearest code by squared distance, straight-through gradients, and the
  taming loss ``|sg(z_q) - z|^2 + 0.25 |z_q - sg(z)|^2`` (used when this framework trains the tokenizer).

The network maps images in [0, 1] (MAGE feeds ``ToTensor`` images and returns images in that range); the
VQ-GAN family calls it as a diffusers ``VQModel`` on [-1, 1], so `MaskGITVQ.encode` / ``decode`` convert.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.autoencoders.vq_model import VQEncoderOutput
from torch import Tensor, nn

from ..errors import ConfigError

NORM_EPS = 1e-6
COMMIT_BETA = 0.25


def group_norm(groups: int, width: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, width, eps=NORM_EPS)


class ResBlock(nn.Module):
    """Two GroupNorm-swish-conv steps; a width change sends the output through ``nin_shortcut`` (module doc)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ``block`` (residual blocks from ``cin`` to ``cout``) and, in the decoder, ``upsample``."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool = False) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.upsample = Upsample(cout) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class Middle(nn.Module):
    """The two residual blocks at the lowest resolution."""

    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResBlock(width, width, groups)
        self.block_2 = ResBlock(width, width, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, channels: int, widths: list[int], layers: int, latent: int, groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
        self.down = nn.ModuleList(Level(cin, cout, layers, groups) for cin, cout in zip([widths[0], *widths[:-1]],
                                                                                         widths, strict=True))
        self.mid = Middle(widths[-1], groups)
        self.norm_out = group_norm(groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], latent, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, channels: int, widths: list[int], layers: int, latent: int, groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(latent, widths[-1], 3, padding=1)
        self.mid = Middle(widths[-1], groups)
        inputs = [*widths[1:], widths[-1]]  # level i starts from level i + 1's width (the widest from its own)
        self.up = nn.ModuleList(Level(inputs[i], widths[i], layers, groups, upsample=i > 0) for i in range(len(widths)))
        self.norm_out = group_norm(groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Nearest-code quantisation of (B, D, H, W) latents, with the diffusers ``VectorQuantizer`` calls."""

    def __init__(self, codes: int, dim: int) -> None:
        super().__init__()
        self.vq_embed_dim = dim
        self.embedding = nn.Embedding(codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codes, 1.0 / codes)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:
        """(straight-through z_q, commitment loss, (None, None, flat code ids in (B, H, W) order))."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        ids = dist.argmin(1)
        z_q = self.embedding(ids).view(b, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q.detach(), z) + COMMIT_BETA * F.mse_loss(z_q, z.detach())
        return z + (z_q - z).detach(), loss, (None, None, ids)

    def get_codebook_entry(self, ids: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        """Codes of flat ids as latents (B, D, H, W); ``shape`` is (B, H, W, D)."""
        return self.embedding(ids).view(shape).permute(0, 3, 1, 2).contiguous()


class MaskGITVQ(nn.Module):
    """MAGE's VQGAN tokenizer (``encoder``, ``decoder``, ``quantize``) behind the diffusers ``VQModel`` calls of the
    VQ-GAN family: ``encode(x).latents``, ``quantize(h)``, ``decode(h[, force_not_quantize]).sample`` on [-1, 1]."""

    def __init__(self, channels: int, block_channels: list[int], layers: int, latent_channels: int,
                 codebook_size: int, codebook_dim: int, norm_groups: int) -> None:
        super().__init__()
        if codebook_dim != latent_channels:
            raise ConfigError(
                f"model.tokenizer=maskgit has no projection around its codebook: model.codebook_dim={codebook_dim} "
                f"must equal model.latent_channels={latent_channels} (MAGE's release: 256 and 256)"
            )
        widths = list(block_channels)
        self.encoder = Encoder(channels, widths, layers, latent_channels, norm_groups)
        self.decoder = Decoder(channels, widths, layers, latent_channels, norm_groups)
        self.quantize = Quantizer(codebook_size, codebook_dim)

    def encode(self, x: Tensor) -> VQEncoderOutput:
        """Latents (before quantisation) of images in [-1, 1]."""
        return VQEncoderOutput(latents=self.encoder((x + 1) / 2))

    def decode(self, h: Tensor, force_not_quantize: bool = False) -> DecoderOutput:
        """Images in [-1, 1] from latents ``h`` (quantised first unless ``force_not_quantize``: ``h`` is codes)."""
        if force_not_quantize:
            quant, loss = h, h.new_zeros(h.shape[0])
        else:
            quant, loss, _ = self.quantize(h)
        return DecoderOutput(sample=self.decoder(quant) * 2 - 1, commit_loss=loss)
