"""MAGE's token transformer (the ViT-B of the MAGE release, ``mage-vitb-1600.pth``) as the VQ-GAN family's
``model.transformer=mage``: MAGE's modules with the release's tensor names and shapes, so the release loads
as it is (with ``model.tokenizer=maskgit``, its tokenizer too: the release holds it under ``vqgan.``).

How it differs from the family's own transformer (``vit``, families/vqgan.py), everything else (tokenizer,
masks, loss, MaskGIT ``restore``) being the family's:

* ``token_emb``: one vocabulary of the codebook ids, 1000 class ids and a [MASK] id (2025 for 1024 codes);
  word + learned position embeddings over [CLS] + the grid (257 positions), then LayerNorm (eps 1e-6) and
  dropout. [CLS] is the class id of MAGE's unconditional training (codebook size + 76: 1100) at position 0.
* blocks and norms: pre-norm ViT blocks with LayerNorm eps 1e-6 and ``model.dropout`` on attention and
  projections, as MAGE pre-trains (the paper's unlearning code turns the blocks' dropout off and keeps the
  embedding's 0.1, which the one ``dropout`` key does not express).
* decoder: every grid position starts as the decoded [CLS] token (MAGE pads with it), the kept tokens are put
  back, learned positions (``decoder_pos_embed_learned``) are added, then blocks and ``decoder_norm``.
* head ``mlm_layer``: Linear - GELU - LayerNorm (eps 1e-5) to the embedding width, logits against the word
  embeddings *detached* (the head's gradients never reach them), plus a bias over
  the vocabulary; the family scores the codebook ids' logits. The word embeddings are encoder weights, so an
  encoder-only method moves the head's output weights too ("frozen decoder" is approximate, as ``tie_head``).
* the token transformer sees the degraded image's kept tokens only (the family's way, and MAGE's training
  forward); MAGE's own inpainting script instead feeds [MASK] ids for the hole and drops nothing.

Tensors the release holds that MAGE never uses to generate (its MAE-style ``patch_embed``, ``cls_token``,
``mask_token``, ``decoder_pred``, the fixed sin-cos ``pos_embed`` / ``decoder_pos_embed``, and
``token_emb.position_ids``) are not built: `MAGE.adapt_pretrained` checks them by name and shape, then drops them.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import ConfigError
from ..weights import mismatch
from .vqgan import VQGAN

NUM_CLASSES = 1000  # class ids after the codebook ids; one [MASK] id follows them
CLASS_OFFSET = 76  # [CLS] = codebook_size + 76 (MAGE's id 1100 for 1024 codes)
NORM_EPS = 1e-6


class TokenEmbedding(nn.Module):
    """Word + position embeddings, LayerNorm and dropout (MAGE's BERT-style ``token_emb``)."""

    def __init__(self, vocab: int, dim: int, positions: int, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions)))


class MlmHead(nn.Module):
    """Linear - GELU - LayerNorm to the word-embedding width, logits against given word embeddings + a bias."""

    def __init__(self, dim: int, word_dim: int, vocab: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, word_dim)
        self.ln = nn.LayerNorm(word_dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab))

    def forward(self, x: Tensor, words: Tensor) -> Tensor:
        """Logits (B, N, V') against ``words`` (V', word_dim): the first V' ids of the vocabulary."""
        return self.ln(F.gelu(self.fc(x))) @ words.t() + self.bias[..., : words.shape[0]]


class MAGE(VQGAN):
    """The VQ-GAN family with MAGE's token transformer (see the module doc); built by ``vqgan_family``."""

    def _build_transformer(self, embed_dim: int, depth: int, num_heads: int, decoder_dim: int, decoder_depth: int,
                           decoder_heads: int, mlp_ratio: float, dropout: float, tie_head: bool) -> None:
        """MAGE's modules (``tie_head`` is not read: MAGE's head always reads the word embeddings)."""
        self.vocab_size = self.codebook_size + NUM_CLASSES + 1
        self.class_id = self.codebook_size + CLASS_OFFSET
        self.token_emb = TokenEmbedding(self.vocab_size, embed_dim, 1 + self.num_tokens, dropout)
        norm = partial(nn.LayerNorm, eps=NORM_EPS)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  norm_layer=norm) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.mlm_layer = MlmHead(decoder_dim, embed_dim, self.vocab_size)
        for p in (self.token_emb.word_embeddings.weight, self.token_emb.position_embeddings.weight,
                  self.decoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("tokenizer."):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- the release's layout ------------------------------------------------------------------
    def unused_release_shapes(self) -> dict[str, tuple[int, ...]]:
        """The release's tensors MAGE never uses to generate, for this config: name -> shape."""
        d, dd, n = self.decoder_embed.in_features, self.decoder_embed.out_features, 1 + self.num_tokens
        pixels = self.token_size * self.token_size * self.channels
        return {"token_emb.position_ids": (1, n), "cls_token": (1, 1, d), "pos_embed": (1, n, d),
                "patch_embed.proj.weight": (d, self.channels, self.token_size, self.token_size),
                "patch_embed.proj.bias": (d,), "mask_token": (1, 1, dd), "decoder_pos_embed": (1, n, dd),
                "decoder_pred.weight": (pixels, dd), "decoder_pred.bias": (pixels,)}

    def release_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the MAGE release's state dict for this config (the tokenizer under ``vqgan.``)."""
        ours = {(f"vqgan.{k.removeprefix('tokenizer.')}" if k.startswith("tokenizer.") else k): tuple(v.shape)
                for k, v in self.state_dict().items()}
        return {**ours, **self.unused_release_shapes()}

    def adapt_pretrained(self, state: dict) -> dict:
        """Accept the MAGE release's state dict (recognised by its ``vqgan.`` or unused tensors): every tensor of
        `release_shapes` must be there with its shape, and nothing else (a ConfigError names the others); the
        unused ones are dropped and ``vqgan.`` becomes ``tokenizer.``. This framework's own checkpoints pass as
        they are."""
        unused = self.unused_release_shapes()
        if not any(k.startswith("vqgan.") or k in unused for k in state):
            return state
        problems = mismatch(self.release_shapes(), state)
        if problems:
            raise ConfigError(f"not the MAGE release's layout for this config (model.transformer=mage, "
                              f"model.tokenizer={self._tokenizer_args['kind']}): {problems}")
        return {(f"tokenizer.{k.removeprefix('vqgan.')}" if k.startswith("vqgan.") else k): v
                for k, v in state.items() if k not in unused}

    # ---- encoder / decoder ---------------------------------------------------------------------
    def _encode(self, ids: Tensor, keep: Tensor) -> Tensor:
        """[CLS] (the class id at position 0) + the kept tokens (at 1 + their grid positions), blocks, norm."""
        b = ids.shape[0]
        tokens = torch.cat([ids.new_full((b, 1), self.class_id), torch.gather(ids, 1, keep)], dim=1)
        positions = torch.cat([keep.new_zeros(b, 1), keep + 1], dim=1)
        x = self.token_emb(tokens, positions)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _decode(self, latent: Tensor, keep: Tensor) -> Tensor:
        """Codebook logits (B, L, codebook_size): dropped positions start as the decoded [CLS] token."""
        x = self.decoder_embed(latent)
        b, d = x.shape[0], x.shape[-1]
        full = x[:, :1].expand(b, 1 + self.num_tokens, d)
        full = full.scatter(1, (keep + 1)[..., None].expand(-1, -1, d), x[:, 1:]) + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            full = blk(full)
        words = self.token_emb.word_embeddings.weight[: self.codebook_size].detach()
        return self.mlm_layer(self.decoder_norm(full[:, 1:]), words)


def vqgan_family(transformer: str = "vit", **kwargs) -> VQGAN:
    """The VQ-GAN family with the token transformer ``model.transformer`` names: ``vit`` (`VQGAN`'s own) or
    ``mage`` (the MAGE release's, `MAGE`); ``kwargs`` are the constructor's."""
    if transformer == "vit":
        return VQGAN(**kwargs)
    if transformer == "mage":
        return MAGE(**kwargs)
    raise ConfigError(f"model.transformer={transformer!r}: use vit or mage")
