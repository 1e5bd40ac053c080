"""VQ-GAN family: a frozen VQ tokenizer (diffusers ``VQModel``) and a MaskGIT/MAGE-style
bidirectional transformer (timm blocks) that predicts the token ids of the missing region.

* Tokenizer: trained in ``pre_train`` (reconstruction MSE + the VQ commitment loss), cached in
  the stage's work dir, then frozen. Frozen means its weights are *buffers*: they travel in the
  state_dict and with ``.to(device)``, but no optimiser, unlearning method or DDP ever sees
  them as trainable, so they stay bit-identical.
* Degraded input T(x): the hole is filled with grey before tokenizing, so the embedding is a
  function of T(x) alone; a token is missing when any of its pixels is missing.
* Encoder: token embedding + learned positions + [CLS] + blocks over the kept tokens.
  Decoder: mask tokens at the missing positions, blocks over all, and a head giving token-id
  logits. ``tie_head=True`` reuses the token embedding matrix as the head's output weight (as
  MAGE does); that weight then counts as an encoder parameter, so encoder-only methods change
  the head too and the "frozen decoder" is only approximately frozen.
* Training uses the data module's random patch-aligned masks (patches, blocks, kept blocks with
  their own random ratios), not MAGE's truncated-normal ratio on [0.5, 1], so every family
  trains on the same degradations; loss = label-smoothed cross-entropy on missing tokens.
* ``restore``: MaskGIT iterative parallel decoding (cosine schedule, Gumbel-noised choice of
  the tokens to keep), seeded by the caller's generator, with the token mask widened by
  ``latent_margin`` tokens around the hole (the reference's 1); known pixels are pasted back.
* Backbones: ``model.tokenizer`` picks the tokenizer (``diffusers`` above, or ``maskgit``: MAGE's
  MaskGIT VQGAN, families/mage_tokenizer.py) and ``model.transformer`` the token transformer
  (``vit`` above, or ``mage``: MAGE's, families/mage.py); the MAGE pair loads the MAGE release.

Presets (conf/model/vqgan.yaml is ``tiny``; conf/experiment/vqgan_paper.yaml is ``paper``):
  tiny  -- 32 px, tokens of 4 px (8x8 grid), 128-entry codebook, encoder 4 x 128, decoder 2 x 128;
  paper -- 256 px RGB, tokens of 16 px (16x16 grid), 1024-entry codebook, ViT-B encoder
           12 x 768, decoder 8 x 768: MAGE ViT-B with its tokenizer (maskgit + mage).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import VQModel
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..atomic import torch_save, write_json
from ..errors import ConfigError
from .base import Family, StageContext
from .mage_tokenizer import MaskGITVQ

ENCODER_PREFIXES = ("token_emb.", "pos_embed", "cls_token", "blocks.", "norm.")


def build_tokenizer(channels: int, image_size: int, block_channels: list[int], layers: int, latent_channels: int,
                    codebook_size: int, codebook_dim: int, norm_groups: int, kind: str = "diffusers") -> nn.Module:
    """The VQ autoencoder ``kind`` (``model.tokenizer``) from config (no download), ``len(block_channels) - 1``
    halvings: ``diffusers`` a diffusers ``VQModel``, ``maskgit`` MAGE's MaskGIT VQGAN (`mage_tokenizer.MaskGITVQ`)."""
    if kind == "maskgit":
        return MaskGITVQ(channels, block_channels, layers, latent_channels, codebook_size, codebook_dim, norm_groups)
    if kind != "diffusers":
        raise ConfigError(f"model.tokenizer={kind!r}: use diffusers or maskgit")
    n = len(block_channels)
    return VQModel(
        in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_channels),
        layers_per_block=layers, latent_channels=latent_channels, sample_size=image_size,
        num_vq_embeddings=codebook_size, vq_embed_dim=codebook_dim, norm_num_groups=norm_groups,
    )


def freeze_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a (persistent) buffer of the same name."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                del m._parameters[name]
                m.register_buffer(name, p.detach())
    return module.eval()


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


class TokenizerTraining(L.LightningModule):
    """The tokenizer stage: reconstruction MSE + VQ commitment loss with Adam; the codebook starts on the
    encoder outputs of the first batch (data-dependent, so that no code starts dead)."""

    def __init__(self, vq: VQModel, lr: float, codebook_size: int) -> None:
        super().__init__()
        self.vq, self.lr, self.codebook_size = vq, float(lr), int(codebook_size)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["train"]["image"] * 2 - 1
        h = self.vq.encode(x).latents
        if self.global_step == 0:
            flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            with torch.no_grad():
                self.vq.quantize.embedding.weight.copy_(flat[torch.randint(len(flat), (self.codebook_size,))])
        out = self.vq.decode(h)
        loss = F.mse_loss(out.sample, x) + out.commit_loss.mean()
        self.log("tokenizer/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.vq.parameters(), lr=self.lr)


class VQGAN(Family):
    """Frozen VQ tokenizer + MaskGIT-style token transformer (encoder over kept tokens)."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        tokenizer_channels: tuple[int, ...] = (8, 16, 32),
        tokenizer_layers: int = 1,
        latent_channels: int = 16,
        codebook_size: int = 128,
        codebook_dim: int = 16,
        norm_groups: int = 8,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        label_smoothing: float = 0.1,
        tie_head: bool = False,
        decode_steps: int = 8,
        choice_temperature: float = 6.0,
        latent_margin: int = 1,
        train: dict | None = None,
        name: str = "vqgan",
        pretrained: str | None = None,  # read by the runner (weights of the original model)
        pretrained_tokenizer: str | None = None,
        tokenizer: str = "diffusers",
    ):
        super().__init__(image_size, channels, train)
        tokenizer_channels = list(tokenizer_channels)
        if not tokenizer_channels:
            raise ConfigError("model.tokenizer_channels is empty: give one width per tokenizer level")
        token = 2 ** (len(tokenizer_channels) - 1)
        if image_size % token:
            raise ConfigError(
                f"model.image_size={image_size} is not divisible by the token size {token} px "
                f"(2 ** (len(model.tokenizer_channels)={len(tokenizer_channels)} - 1)); use fewer levels or "
                "another image size"
            )
        if tokenizer_layers < 1:
            raise ConfigError(f"model.tokenizer_layers={tokenizer_layers}: the tokenizer needs >= 1 layer per level")
        if any(c % norm_groups for c in tokenizer_channels):
            raise ConfigError(
                f"model.tokenizer_channels={tokenizer_channels} must be divisible by model.norm_groups={norm_groups}"
            )
        if embed_dim % num_heads or decoder_dim % decoder_heads:
            raise ConfigError(
                f"embedding widths ({embed_dim}, {decoder_dim}) must be divisible by their head counts "
                f"({num_heads}, {decoder_heads})"
            )
        if decode_steps < 1 or latent_margin < 0:
            raise ConfigError(
                f"model.decode_steps={decode_steps} must be >= 1 and model.latent_margin={latent_margin} >= 0"
            )
        self.save_hyperparameters()
        self.token_size = self.mask_patch = token
        self.grid = image_size // token
        self.num_tokens = self.grid * self.grid
        self.codebook_size = codebook_size
        self.label_smoothing = label_smoothing
        self.decode_steps = decode_steps
        self.choice_temperature = choice_temperature
        self.latent_margin = latent_margin
        self._tokenizer_args = dict(
            channels=channels, image_size=image_size, block_channels=tokenizer_channels, layers=tokenizer_layers,
            latent_channels=latent_channels, codebook_size=codebook_size, codebook_dim=codebook_dim,
            norm_groups=norm_groups, kind=tokenizer,
        )
        self.tokenizer = freeze_as_buffers(build_tokenizer(**self._tokenizer_args))
        self.pretrained_tokenizer = pretrained_tokenizer
        self._build_transformer(embed_dim, depth, num_heads, decoder_dim, decoder_depth, decoder_heads, mlp_ratio,
                                dropout, tie_head)

    def _build_transformer(self, embed_dim: int, depth: int, num_heads: int, decoder_dim: int, decoder_depth: int,
                           decoder_heads: int, mlp_ratio: float, dropout: float, tie_head: bool) -> None:
        """The token transformer's modules, initialised (`families.mage.MAGE` builds MAGE's instead)."""
        self.token_emb = nn.Embedding(self.codebook_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Sequential(nn.Linear(decoder_dim, embed_dim), nn.GELU(), nn.LayerNorm(embed_dim))
        self.head_out = nn.Linear(embed_dim, self.codebook_size)
        self._init_weights()
        if tie_head:
            self.head_out.weight = self.token_emb.weight

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.mask_token, self.decoder_pos_embed, self.token_emb.weight):
            nn.init.trunc_normal_(p, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("tokenizer."):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def train(self, mode: bool = True):
        """Switch train/eval mode; the frozen tokenizer always stays in eval mode."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    # ---- tokenizer -----------------------------------------------------------------------
    def _ids(self, vq: VQModel, image: Tensor) -> Tensor:
        """Token ids (B, L) of images in [0, 1] under tokenizer ``vq``, row-major over the grid."""
        _, _, (_, _, ids) = vq.quantize(vq.encode(image * 2 - 1).latents)
        return ids.view(image.shape[0], -1)

    def _images(self, vq: VQModel, ids: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] that tokenizer ``vq`` decodes from token ids (B, L)."""
        shape = (ids.shape[0], self.grid, self.grid, vq.quantize.vq_embed_dim)
        z_q = vq.quantize.get_codebook_entry(ids.flatten(), shape)
        return ((vq.decode(z_q, force_not_quantize=True).sample + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def tokenize(self, image: Tensor) -> Tensor:
        """Token ids (B, L) of images in [0, 1] under the frozen tokenizer (always in fp32)."""
        with torch.autocast(image.device.type, enabled=False):
            return self._ids(self.tokenizer, image.float())

    @torch.no_grad()
    def detokenize(self, ids: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] decoded from token ids (B, L) by the frozen tokenizer."""
        with torch.autocast(ids.device.type, enabled=False):
            return self._images(self.tokenizer, ids)

    def pre_train(self, ctx: StageContext) -> dict:
        """Train the tokenizer (or load it from ``ctx.workdir``, or from ``model.pretrained_tokenizer``: a
        diffusers ``VQModel`` folder or state dict of this config's sizes), freeze it, record its quality.

        ``train.tokenizer_steps`` Adam steps (``train.tokenizer_lr``) of `TokenizerTraining` on batches of
        ``train.tokenizer_batch_size`` images (default: the training batch), with the run's Trainer
        (``ctx.fit``: resumable, DDP where the trainer is).
        """
        weights, record = Path(ctx.workdir) / "tokenizer.pt", Path(ctx.workdir) / "tokenizer.json"
        if self.pretrained_tokenizer is not None:  # a local VQ tokenizer: loaded, not trained
            from ..weights import load_weights

            info = load_weights(self.tokenizer, self.pretrained_tokenizer, what="model.pretrained_tokenizer")
            device = next(self.tokenizer.buffers()).device
            vq = build_tokenizer(**self._tokenizer_args)
            vq.load_state_dict(self.tokenizer.state_dict())
            return {"tokenizer": "pretrained", **self._tokenizer_quality(vq.to(device).eval(), ctx, device),
                    "tokenizer_tensors": info["tensors"]}
        if weights.exists() and record.exists():
            from ..weights import load_trusted

            self.tokenizer.load_state_dict(load_trusted(
                weights, f"Delete it and {record.name} beside it: the tokenizer is trained again on the next run."))
            return json.loads(record.read_text())["metrics"]
        cfg = self.train_cfg
        steps, lr = int(cfg.get("tokenizer_steps", 300)), float(cfg.get("tokenizer_lr", 2e-3))
        batch = int(cfg.get("batch_size", 128))
        micro = min(int(cfg.get("tokenizer_batch_size") or batch), batch)
        vq = build_tokenizer(**self._tokenizer_args)
        vq.load_state_dict(self.tokenizer.state_dict())
        ctx.fit(TokenizerTraining(vq, lr, self.codebook_size), ctx.train_data(steps, micro), "tokenizer")
        device = next(vq.parameters()).device
        metrics = self._tokenizer_quality(vq.eval(), ctx, device)
        self.tokenizer.load_state_dict(vq.state_dict())
        torch_save(weights, self.tokenizer.state_dict())
        write_json(record, {"steps": steps, "lr": lr, "micro_batch": micro, "tokenizer": self._tokenizer_args,
                            "metrics": metrics})
        return metrics

    @torch.no_grad()
    def _tokenizer_quality(self, vq: VQModel, ctx: StageContext, device: torch.device) -> dict:
        """PSNR, FID (if ``ctx`` has a scorer) and codebook use of reconstructions on retain_eval."""
        scorer = ctx.scorer() if ctx.scorer is not None else None
        total, n, used = 0.0, 0, torch.zeros(self.codebook_size, dtype=torch.bool)
        for b in ctx.eval_batches("retain_eval"):
            ids = self._ids(vq, b["image"].to(device))
            recon = self._images(vq, ids).cpu()
            total += float(psnr(recon, b["image"]).sum())
            n += len(recon)
            used[ids.flatten().unique().cpu()] = True
            if scorer is not None:
                scorer.score(recon, b["image"], b["label"])
        metrics = {"tokenizer_psnr": total / max(n, 1), "tokenizer_codes_used": int(used.sum())}
        if scorer is not None:
            metrics["tokenizer_fid"] = float(scorer.compute()["fid"])
        return metrics

    # ---- masks ---------------------------------------------------------------------------
    def token_missing(self, mask: Tensor, margin: int = 0) -> Tensor:
        """(B,1,H,W) pixel mask -> (B,L) bool: a token is missing if any of its pixels is,
        widened by ``margin`` tokens on every side."""
        grid = F.max_pool2d(mask.float(), self.token_size)
        if margin:
            grid = F.max_pool2d(grid, 2 * margin + 1, stride=1, padding=margin)
        return grid.flatten(1) > 0

    def _kept_positions(self, missing: Tensor) -> Tensor:
        """(B,L) bool -> (B,n) positions of the kept tokens; every sample must keep as many."""
        kept = (~missing).sum(1)
        if not torch.all(kept == kept[0]):
            raise ConfigError(
                "VQGAN needs the same number of kept tokens in every image of a batch; got "
                f"{sorted(set(kept.tolist()))}. Use token-aligned masks with equal counts "
                "(data.degrade.random_patch_mask with patch = the token size, or a fixed eval mask)."
            )
        order = torch.argsort(missing.to(torch.int8), dim=1, stable=True)
        return order[:, : int(kept[0])]

    def batchable(self, masks: list[Tensor]) -> bool:
        """Equal kept-token counts over all masks: the encoder needs one token count per batch."""
        kept = (~self.token_missing(torch.cat(masks))).sum(1)
        return bool(torch.all(kept == kept[0]))

    def _input_tokens(self, image: Tensor, mask: Tensor) -> Tensor:
        """Token ids of the degraded image: the hole is filled with grey before tokenizing."""
        return self.tokenize(image * (1 - mask) + 0.5 * mask)

    # ---- encoder / decoder -----------------------------------------------------------------
    def encoder_parameter_names(self) -> set[str]:
        """Token embedding, positions, [CLS], encoder blocks and norm (with ``tie_head`` the
        tied head weight is the token embedding, so it is counted here)."""
        return {n for n, _ in self.named_parameters() if n.startswith(ENCODER_PREFIXES)}

    def _encode(self, ids: Tensor, keep: Tensor) -> Tensor:
        x = self.token_emb(torch.gather(ids, 1, keep)) + self.pos_embed[0, keep]
        x = self.emb_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _decode(self, latent: Tensor, keep: Tensor) -> Tensor:
        x = self.decoder_embed(latent)
        b, d = x.shape[0], x.shape[-1]
        full = self.mask_token.expand(b, self.num_tokens, d).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.head_out(self.head(self.decoder_norm(x[:, 1:])))

    def _logits(self, ids: Tensor, missing: Tensor) -> Tensor:
        keep = self._kept_positions(missing)
        return self._decode(self._encode(ids, keep), keep)

    # ---- the family contract ---------------------------------------------------------------
    def embed(self, image: Tensor, mask: Tensor, state=None) -> Tensor:
        """Encoder output on [CLS] + kept tokens: (B, 1 + n_kept, embed_dim)."""
        return self._encode(self._input_tokens(image, mask), self._kept_positions(self.token_missing(mask)))

    def target_of(self, image: Tensor) -> Tensor:
        """Token ids (B, L) of the clean image."""
        return self.tokenize(image)

    def predict(self, image: Tensor, mask: Tensor, state=None) -> Tensor:
        """Token-id logits (B, L, codebook_size) at every position."""
        return self._logits(self._input_tokens(image, mask), self.token_missing(mask))

    def task_loss(self, image: Tensor, mask: Tensor, target: Tensor | None = None, state=None) -> Tensor:
        """Cross-entropy on missing tokens against token ids (B,L) (hard, label-smoothed) or
        against softmax of logits (B,L,V) (soft, e.g. a teacher's ``predict``)."""
        target = self._checked_target(image, target)
        missing = self.token_missing(mask)
        return self._token_ce(self.predict(image, mask)[missing], target[missing])

    def row_losses(self, image: Tensor, mask: Tensor, target: Tensor | None = None, state=None) -> Tensor:
        """Per-row cross-entropy (targets as ``task_loss``): the mean over each row's missing tokens."""
        target = self._checked_target(image, target)
        missing = self.token_missing(mask)
        ce = self._token_ce(self.predict(image, mask).flatten(0, 1), target.flatten(0, 1), reduction="none")
        return (ce.view(missing.shape) * missing).sum(1) / missing.sum(1).clamp_min(1)

    def noise_target(self, targets: Tensor) -> Tensor:
        """Random token ids shaped like ``targets``: round(clamp(N(mean, std^2) of their ids, 0, V - 1))."""
        ids = targets.float()
        noise = torch.randn(ids.shape, device=ids.device) * ids.std() + ids.mean()
        return noise.clamp(0, self.codebook_size - 1).round().long()

    def _checked_target(self, image: Tensor, target: Tensor | None) -> Tensor:
        """``target`` (default: the image's token ids), checked to be ids (B,L) int64 or logits (B,L,V) float."""
        target = self.target_of(image) if target is None else target
        b, n, v = image.shape[0], self.num_tokens, self.codebook_size
        if target.shape not in ((b, n), (b, n, v)) or (target.dim() == 3) != target.is_floating_point():
            raise ConfigError(
                f"VQGAN.task_loss target of shape {tuple(target.shape)} and dtype {target.dtype}: use token "
                f"ids ({b}, {n}) int64 or logits ({b}, {n}, {v}) float"
            )
        return target

    def _token_ce(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of logits (N,V) against ids (N,) (label-smoothed) or logits (N,V) (their softmax)."""
        if target.is_floating_point():
            return F.cross_entropy(logits, target.softmax(-1), reduction=reduction)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction=reduction)

    def _gumbel(self, shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Gumbel(0, 1) noise drawn from ``generator`` (on the generator's own device), moved to ``device``."""
        u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
        return -torch.log(-torch.log(u.clamp_min(1e-20))).to(device)

    @torch.no_grad()
    def restore(self, image: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """MaskGIT decoding of the widened token hole, then the known pixels pasted back.

        Each step samples every unknown token from the logits, then keeps the most confident
        ones: a cosine schedule says how many stay unknown, and Gumbel noise scaled by
        ``choice_temperature * (1 - progress)`` randomises the choice.
        """
        unknown = self.token_missing(mask, self.latent_margin)
        ids = self._input_tokens(image, mask)
        total = int(unknown[0].sum())
        for step in range(self.decode_steps if total else 0):
            logits = self._logits(ids, unknown).float()
            ids = torch.where(unknown, (logits + self._gumbel(logits.shape, generator, logits.device)).argmax(-1), ids)
            progress = (step + 1) / self.decode_steps
            n_mask = min(max(1, math.floor(total * math.cos(math.pi / 2 * progress))), int(unknown[0].sum()) - 1)
            if step == self.decode_steps - 1 or n_mask < 1:
                break
            conf = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
            conf = conf + self.choice_temperature * (1 - progress) * self._gumbel(conf.shape, generator, conf.device)
            conf = torch.where(unknown, conf, torch.inf)
            unknown = torch.zeros_like(unknown).scatter_(1, conf.argsort(dim=1)[:, :n_mask], True)
        out = self.detokenize(ids).to(image.dtype)
        return image * (1 - mask) + out * mask
