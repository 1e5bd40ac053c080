"""Masked autoencoder (MAE) family on timm ViT blocks.

The encoder sees only the visible patches (plus a [CLS] token); a light decoder puts
mask tokens at the missing positions and reconstructs their pixels. A patch counts as
missing when any of its pixels is missing, so eval holes must be patch-aligned.

The official MAE release (``mae_visualize_vit_large.pth``) has this module's tensor names; running it as
trained takes ``norm_eps=1e-6`` (every LayerNorm), ``sincos_layout=mae`` (its fixed position tables'
channel order, which differs from timm's) and ImageNet's ``pixel_mean`` / ``pixel_std`` (it reads and
predicts normalised pixels): the paper preset sets all three.

Presets (conf/model/mae.yaml is ``tiny``; conf/experiment/mae_paper.yaml is ``paper``):
  tiny  -- 32 px, patch 4, encoder 4 x 128 (4 heads), decoder 2 x 64 (2 heads);
  paper -- 224 px RGB, patch 16, ViT-L/16 encoder 24 x 1024 (16 heads), decoder 8 x 512.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Family

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.", "norm.")


def mae_sincos_table(grid: int, dim: int) -> Tensor:
    """The MAE release's fixed 2-D sin-cos table (grid * grid, dim), row-major positions: per position the sines
    then cosines of its column index, then those of its row index, at frequencies 10000 ** (-k / (dim / 4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


SINCOS_LAYOUTS = {"timm": lambda grid, dim: build_sincos2d_pos_embed([grid, grid], dim), "mae": mae_sincos_table}


class MAE(Family):
    """ViT masked autoencoder: encoder over visible patches, light decoder over all."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        patch_size: int = 4,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 2,
        mlp_ratio: float = 4.0,
        train: dict | None = None,
        name: str = "mae",
        pretrained: str | None = None,  # read by the runner (weights of the original model)
        norm_eps: float | None = None,
        sincos_layout: str = "timm",
        pixel_mean: list[float] | None = None,
        pixel_std: list[float] | None = None,
    ):
        super().__init__(image_size, channels, train)
        if sincos_layout not in SINCOS_LAYOUTS:
            raise ConfigError(f"model.sincos_layout={sincos_layout!r}: use timm or mae")
        if embed_dim % 4 or decoder_dim % 4:
            raise ConfigError(f"model.embed_dim={embed_dim} and model.decoder_dim={decoder_dim} must be divisible by 4 "
                              "(the 2-D sin-cos position tables)")
        if (pixel_mean is None) != (pixel_std is None) or any(
                v is not None and len(v) != channels for v in (pixel_mean, pixel_std)):
            raise ConfigError(f"model.pixel_mean={pixel_mean} and model.pixel_std={pixel_std}: give both (one value "
                              f"per channel, {channels}) or neither")
        if image_size % patch_size:
            raise ConfigError(
                f"model.image_size={image_size} is not divisible by model.patch_size={patch_size}; "
                "pick sizes whose ratio is an integer (e.g. 32 and 4)"
            )
        if embed_dim % num_heads or decoder_dim % decoder_heads:
            raise ConfigError(
                f"embedding widths ({embed_dim}, {decoder_dim}) must be divisible by their head counts "
                f"({num_heads}, {decoder_heads})"
            )
        self.save_hyperparameters()
        self.patch_size = self.mask_patch = patch_size
        grid = image_size // patch_size
        self.num_patches = grid * grid

        self.sincos_layout = sincos_layout
        table = SINCOS_LAYOUTS[sincos_layout]
        # norm_eps None: timm's block default (1e-6) in the blocks, PyTorch's 1e-5 for norm / decoder_norm
        norm = partial(nn.LayerNorm, eps=1e-5 if norm_eps is None else norm_eps)
        block_norm = {} if norm_eps is None else {"norm_layer": norm}
        for key, values in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):  # None: pixels in [0, 1] as they are
            self.register_buffer(key, None if values is None else torch.tensor(values).view(1, -1, 1, 1),
                                 persistent=False)

        self.patch_embed = PatchEmbed(image_size, patch_size, channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", table(grid, embed_dim)[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, **block_norm) for _ in range(depth)
        )
        self.norm = norm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", table(grid, decoder_dim)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, **block_norm) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * channels)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def adapt_pretrained(self, state: dict) -> dict:
        """Accept the official MAE release's layout: its fixed sin-cos ``pos_embed`` / ``decoder_pos_embed``
        (stored there, rebuilt here) are dropped when their shape fits this model (with or without the [CLS]
        slot, which must be zero) and their values are this model's tables (a ConfigError names a table of
        another channel order); a mis-sized one stays, so the strict check names it."""
        state = dict(state)
        for key in ("pos_embed", "decoder_pos_embed"):
            if key in state:
                ours = getattr(self, key)[0]
                theirs = state[key].reshape(-1, state[key].shape[-1])
                if tuple(theirs.shape) not in {tuple(ours.shape), (ours.shape[0] + 1, ours.shape[1])}:
                    continue
                if not (theirs.is_meta or ours.is_meta):  # meta tensors (size checks) have no values
                    ours = torch.cat([ours.new_zeros(len(theirs) - len(ours), ours.shape[1]), ours]).cpu()
                    if not torch.allclose(theirs.float(), ours, atol=1e-5):
                        raise ConfigError(
                            f"{key}: the file's fixed sin-cos table differs from this model's "
                            f"(model.sincos_layout={self.sincos_layout}); the official MAE release's is "
                            "model.sincos_layout=mae"
                        )
                del state[key]
        return state

    def _pixels_in(self, image: Tensor) -> Tensor:
        """The encoder's input: ``image`` normalised with ``pixel_mean`` / ``pixel_std`` when they are set."""
        return image if self.pixel_mean is None else (image - self.pixel_mean) / self.pixel_std

    # ---- masks -------------------------------------------------------------------------
    def patch_missing(self, mask: Tensor) -> Tensor:
        """(B,1,H,W) pixel mask -> (B,L) bool, True where a patch has any missing pixel."""
        return F.max_pool2d(mask, self.patch_size).flatten(1) > 0

    def _visible_ids(self, mask: Tensor) -> Tensor:
        missing = self.patch_missing(mask)
        visible = (~missing).sum(1)
        if not torch.all(visible == visible[0]):
            raise ConfigError(
                "MAE needs the same number of visible patches in every image of a batch; got "
                f"{sorted(set(visible.tolist()))}. Use patch-aligned masks with equal counts "
                "(data.degrade.random_patch_mask or a fixed eval mask)."
            )
        if visible[0] == 0:
            raise ConfigError("the mask hides every patch; the MAE encoder needs at least one visible patch")
        order = torch.argsort(missing.to(torch.int8), dim=1, stable=True)
        return order[:, : int(visible[0])]

    def batchable(self, masks: list[Tensor]) -> bool:
        """Equal visible-patch counts over all masks: the encoder needs one token count per batch."""
        counts = (~self.patch_missing(torch.cat(masks))).sum(1)
        return bool(torch.all(counts == counts[0]))

    # ---- encoder / decoder -------------------------------------------------------------
    def encoder_parameter_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith(ENCODER_PREFIXES)}

    def _encode(self, image: Tensor, ids_keep: Tensor) -> Tensor:
        x = self.patch_embed(self._pixels_in(image)) + self.pos_embed
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _decode(self, latent: Tensor, ids_keep: Tensor) -> Tensor:
        x = self.decoder_embed(latent)
        b, d = x.shape[0], x.shape[-1]
        full = self.mask_token.expand(b, self.num_patches, d).clone()
        full.scatter_(1, ids_keep[..., None].expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full + self.decoder_pos_embed], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        out = self.unpatchify(self.decoder_pred(self.decoder_norm(x))[:, 1:])
        return out if self.pixel_mean is None else out * self.pixel_std + self.pixel_mean

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        p, g, c = self.patch_size, self.image_size // self.patch_size, self.channels
        x = patches.reshape(-1, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(-1, c, g * p, g * p)

    # ---- the family contract -----------------------------------------------------------
    def embed(self, image: Tensor, mask: Tensor, state=None) -> Tensor:
        return self._encode(image, self._visible_ids(mask))

    def predict(self, image: Tensor, mask: Tensor, state=None) -> Tensor:
        ids_keep = self._visible_ids(mask)
        return self._decode(self._encode(image, ids_keep), ids_keep)

    def task_loss(self, image: Tensor, mask: Tensor, target: Tensor | None = None, state=None) -> Tensor:
        per_patch, missing = self._patch_errors(image, mask, target)
        return (per_patch * missing).sum() / missing.sum().clamp_min(1)

    def row_losses(self, image: Tensor, mask: Tensor, target: Tensor | None = None, state=None) -> Tensor:
        """Per-row pixel MSE: the mean over each row's missing patches."""
        per_patch, missing = self._patch_errors(image, mask, target)
        return (per_patch * missing).flatten(1).sum(1) / missing.flatten(1).sum(1).clamp_min(1)

    def _patch_errors(self, image: Tensor, mask: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B,1,g,g) mean squared error per patch against ``target`` (default the image), and the missing patches."""
        target = self.target_of(image) if target is None else target
        err = (self.predict(image, mask) - target) ** 2
        missing = F.max_pool2d(mask, self.patch_size)  # (B,1,g,g): loss on missing patches only
        per_patch = F.avg_pool2d(err.mean(1, keepdim=True), self.patch_size)
        return per_patch, missing

    @torch.no_grad()
    def restore(self, image: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        out = self.predict(image, mask).clamp(0, 1)
        return image * (1 - mask) + out * mask
