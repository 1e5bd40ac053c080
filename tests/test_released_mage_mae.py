"""The released MAGE ViT-B (with its MaskGIT VQGAN tokenizer) and the official MAE ViT-L load exactly; the paper
presets build on the meta device with the released parameter counts; the new backbones honour the family contract.

The release layouts below are written out by hand from the public model definitions (LTH14/mage ``models_mage.py``,
``taming/modules/diffusionmodules/model.py``, ``config/vqgan.yaml``; facebookresearch/mae ``models_mae.py``), not
read off this project's modules, so a module that drifts from a release fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, run_method_steps, tiny_overrides

from i2i_unlearning.data.degrade import center_mask, random_patch_mask
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.families.base import StageContext
from i2i_unlearning.families.mae import MAE
from i2i_unlearning.families.mage import MAGE, vqgan_family
from i2i_unlearning.families.vqgan import VQGAN, build_tokenizer
from i2i_unlearning.runner import build_family
from i2i_unlearning.unlearning import methods as M
from i2i_unlearning.weights import load_weights

Spec = dict[str, tuple[int, ...]]


# ---- the releases' layouts, by hand ------------------------------------------------------------------------------
def vit_block(prefix: str, d: int) -> Spec:
    """One pre-norm ViT block of width d, MLP ratio 4, qkv bias (both releases' blocks)."""
    return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
            f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}


def blocks(prefix: str, depth: int, d: int) -> Spec:
    return {k: s for i in range(depth) for k, s in vit_block(f"{prefix}.{i}", d).items()}


def mae_release(size=224, p=16, c=3, d=1024, depth=24, dd=512, ddepth=8) -> Spec:
    """``mae_visualize_vit_large.pth``'s state dict (``mae_vit_large_patch16_dec512d8b``; norm_pix_loss: no tensors)."""
    n = 1 + (size // p) ** 2
    return {"cls_token": (1, 1, d), "pos_embed": (1, n, d), "patch_embed.proj.weight": (d, c, p, p),
            "patch_embed.proj.bias": (d,), **blocks("blocks", depth, d), "norm.weight": (d,), "norm.bias": (d,),
            "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
            "decoder_pos_embed": (1, n, dd), **blocks("decoder_blocks", ddepth, dd), "decoder_norm.weight": (dd,),
            "decoder_norm.bias": (dd,), "decoder_pred.weight": (p * p * c, dd), "decoder_pred.bias": (p * p * c,)}


def res_block(prefix: str, cin: int, cout: int) -> Spec:
    """taming's ResnetBlock with temb_channels=0: bias-free convs; a bias-free 1x1 nin_shortcut when widths differ."""
    spec = {f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
            f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.norm2.weight": (cout,),
            f"{prefix}.norm2.bias": (cout,), f"{prefix}.conv2.weight": (cout, cout, 3, 3)}
    if cin != cout:
        spec[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)
    return spec


def maskgit_vq(c=3, widths=(128, 128, 256, 256, 512), layers=2, z=256, codes=1024) -> Spec:
    """``vqgan_jax_strongaug.ckpt``: taming Encoder / Decoder of MAGE's config (no attention, average-pool
    downsampling, no quant_conv) and VectorQuantizer2's codebook."""
    spec: Spec = {"encoder.conv_in.weight": (widths[0], c, 3, 3)}
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(layers):
            spec.update(res_block(f"encoder.down.{i}.block.{j}", cin, w))
            cin = w
    spec.update({**res_block("encoder.mid.block_1", cin, cin), **res_block("encoder.mid.block_2", cin, cin),
                 "encoder.norm_out.weight": (cin,), "encoder.norm_out.bias": (cin,),
                 "encoder.conv_out.weight": (z, cin, 1, 1), "encoder.conv_out.bias": (z,),
                 "decoder.conv_in.weight": (cin, z, 3, 3), "decoder.conv_in.bias": (cin,),
                 **res_block("decoder.mid.block_1", cin, cin), **res_block("decoder.mid.block_2", cin, cin)})
    for i in reversed(range(len(widths))):
        for j in range(layers):
            spec.update(res_block(f"decoder.up.{i}.block.{j}", cin, widths[i]))
            cin = widths[i]
        if i:
            spec.update({f"decoder.up.{i}.upsample.conv.weight": (cin, cin, 3, 3),
                         f"decoder.up.{i}.upsample.conv.bias": (cin,)})
    return {**spec, "decoder.norm_out.weight": (cin,), "decoder.norm_out.bias": (cin,),
            "decoder.conv_out.weight": (c, cin, 3, 3), "decoder.conv_out.bias": (c,),
            "quantize.embedding.weight": (codes, z)}


def mage_release(size=256, p=16, c=3, codes=1024, d=768, depth=12, dd=768, ddepth=8, **vq) -> Spec:
    """``mage-vitb-1600.pth``'s ``model`` state dict (``mage_vit_base_patch16``), its tokenizer under ``vqgan.``."""
    n, vocab = 1 + (size // p) ** 2, codes + 1000 + 1
    return {"token_emb.word_embeddings.weight": (vocab, d), "token_emb.position_embeddings.weight": (n, d),
            "token_emb.LayerNorm.weight": (d,), "token_emb.LayerNorm.bias": (d,), "token_emb.position_ids": (1, n),
            "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d),
            "pos_embed": (1, n, d), **blocks("blocks", depth, d), "norm.weight": (d,), "norm.bias": (d,),
            "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
            "decoder_pos_embed": (1, n, dd), "decoder_pos_embed_learned": (1, n, dd),
            **blocks("decoder_blocks", ddepth, dd), "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
            "decoder_pred.weight": (p * p * c, dd), "decoder_pred.bias": (p * p * c,),
            "mlm_layer.fc.weight": (d, dd), "mlm_layer.fc.bias": (d,), "mlm_layer.ln.weight": (d,),
            "mlm_layer.ln.bias": (d,), "mlm_layer.bias": (1, 1, vocab),
            **{f"vqgan.{k}": s for k, s in maskgit_vq(c=c, codes=codes, **vq).items()}}


MAGE_UNUSED = ("token_emb.position_ids", "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
               "mask_token", "decoder_pos_embed", "decoder_pred.weight", "decoder_pred.bias")

# Released parameter counts (torch ``parameters()``: fixed sin-cos tables are frozen nn.Parameters there; buffers
# such as MAGE's token_emb.position_ids are not counted). A ViT block of width d: qkv 3d^2+3d, proj d^2+d,
# fc1 4d^2+4d, fc2 4d^2+d, two norms 4d = 12d^2 + 13d.
# MAE ViT-L/16 visualize, encoder + decoder at 224 px:
#   patch_embed 1024*3*16*16 + 1024 = 787,456; cls_token 1,024; 24 blocks x 12,596,224 = 302,309,376; norm 2,048;
#   decoder_embed 1024*512 + 512 = 524,800; mask_token 512; 8 blocks x 3,152,384 = 25,219,072; decoder_norm 1,024;
#   decoder_pred 512*768 + 768 = 393,984                                               -> 329,239,296 trained
#   fixed tables pos_embed 197*1024 + decoder_pos_embed 197*512                          -> 302,592
MAE_L_TRAINED, MAE_L_TABLES = 329_239_296, 302_592
# MAGE ViT-B transformer (vocabulary 1024 + 1000 + 1 = 2025, 257 positions):
#   token_emb 2025*768 + 257*768 + 2*768 = 1,754,112; 12 blocks x 7,087,872 = 85,054,464; norm 1,536;
#   decoder_embed 768*768 + 768 = 590,592; decoder_pos_embed_learned 257*768 = 197,376; 8 blocks = 56,702,976;
#   decoder_norm 1,536; mlm_layer 768*768 + 768 + 2*768 + 2025 = 594,153                -> 144,896,745 used
#   never used to generate: patch_embed 768*3*16*16 + 768 = 590,592; cls_token 768; pos_embed 197,376;
#   mask_token 768; decoder_pos_embed 197,376; decoder_pred 768*768 + 768 = 590,592      -> 1,577,472
MAGE_B_USED, MAGE_B_UNUSED = 144_896_745, 1_577_472
# MaskGIT VQGAN (widths 128 x (1, 1, 2, 2, 4), two blocks per level, z 256, 1024 codes): encoder 23,775,104,
# decoder 30,478,339, codebook 1024*256 = 262,144                                        -> 54,515,587
VQ_ENCODER, VQ_DECODER, VQ_CODEBOOK = 23_775_104, 30_478_339, 262_144
VQ_TOKENIZER = VQ_ENCODER + VQ_DECODER + VQ_CODEBOOK
MAGE_RELEASE = MAGE_B_USED + MAGE_B_UNUSED + VQ_TOKENIZER  # 200,989,804: the whole release file's parameters


def numel(spec: Spec, keep=lambda k: True) -> int:
    return sum(int(np.prod(s)) for k, s in spec.items() if keep(k) and k != "token_emb.position_ids")


def meta_state(spec: Spec) -> dict[str, torch.Tensor]:
    """A state dict of ``spec`` on the meta device (names and shapes, no memory)."""
    return {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("position_ids") else torch.float32)
            for k, s in spec.items()}


def random_state(spec: Spec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.arange(s[1])[None] if k.endswith("position_ids") else torch.randn(s, generator=g))
            for k, s in spec.items()}


def test_hand_layouts_add_up_to_the_released_counts():
    mae, mage = mae_release(), mage_release()
    assert len(mae) == 14 + 12 * (24 + 8) and len(mage) == 25 + 12 * (12 + 8) + len(maskgit_vq())
    assert numel(mae) == MAE_L_TRAINED + MAE_L_TABLES == 329_541_888
    assert numel(mae, lambda k: "pos_embed" not in k) == MAE_L_TRAINED
    assert numel(mage, lambda k: not k.startswith("vqgan.")) == MAGE_B_USED + MAGE_B_UNUSED == 146_474_217
    assert numel(mage, lambda k: k in MAGE_UNUSED) == MAGE_B_UNUSED
    vq = maskgit_vq()
    assert [numel(vq, lambda k, p=p: k.startswith(p)) for p in ("encoder.", "decoder.", "quantize.")] == [
        VQ_ENCODER, VQ_DECODER, VQ_CODEBOOK]
    assert numel(mage) == MAGE_RELEASE == 200_989_804
    # a few entries spelt out: the shortcut sits where widths change, average pooling and the first decoder
    # level have no convs, and there is no attention or quant_conv
    literal = {"vqgan.encoder.conv_in.weight": (128, 3, 3, 3), "vqgan.encoder.down.2.block.0.nin_shortcut.weight":
               (256, 256, 1, 1), "vqgan.encoder.down.4.block.1.conv2.weight": (512, 512, 3, 3),
               "vqgan.encoder.conv_out.weight": (256, 512, 1, 1), "vqgan.decoder.conv_in.weight": (512, 256, 3, 3),
               "vqgan.decoder.up.3.block.0.conv1.weight": (256, 512, 3, 3),
               "vqgan.decoder.up.1.block.0.nin_shortcut.weight": (128, 128, 1, 1),
               "vqgan.decoder.up.4.upsample.conv.weight": (512, 512, 3, 3), "vqgan.decoder.conv_out.bias": (3,),
               "vqgan.quantize.embedding.weight": (1024, 256), "blocks.11.mlp.fc2.weight": (768, 3072),
               "decoder_blocks.7.attn.qkv.weight": (2304, 768), "mlm_layer.bias": (1, 1, 2025)}
    assert {k: mage[k] for k in literal} == literal
    assert not any(("downsample" in k or "attn_1" in k or "quant_conv" in k or "up.0.upsample" in k) for k in mage)


# ---- paper sizes on the meta device ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_models():
    """Each paper preset's model, built on the meta device (shapes only), by preset name."""
    models = {}

    def get(preset: str):
        if preset not in models:
            family = "vqgan" if "vqgan" in preset else "mae"
            cfg = compose_cfg([f"model={family}", f"experiment={preset}", "paths.weights_dir=/weights"])
            with torch.device("meta"):
                models[preset] = (build_family(cfg.model), cfg)
        return models[preset]

    return get


# preset -> (class, trained parameters, frozen buffers kept in the state dict). diffusion_paper (the Palette
# backbone) joins this table with its release's count when that backbone lands.
PAPER = {"mae_paper": (MAE, MAE_L_TRAINED, 0), "imagenet_mae": (MAE, MAE_L_TRAINED, 0),
         "vqgan_paper": (MAGE, MAGE_B_USED, VQ_TOKENIZER), "imagenet_vqgan": (MAGE, MAGE_B_USED, VQ_TOKENIZER)}


@pytest.mark.parametrize("preset", list(PAPER))
def test_paper_presets_build_on_meta_with_the_released_counts(paper_models, preset):
    model, _ = paper_models(preset)
    cls, trained, frozen = PAPER[preset]
    assert type(model) is cls
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == trained
    persistent = model.state_dict()
    assert sum(v.numel() for v in persistent.values()) == trained + frozen


def test_paper_layouts_are_the_releases(paper_models):
    mage, _ = paper_models("imagenet_vqgan")
    assert mage.release_shapes() == mage_release()
    mae, _ = paper_models("imagenet_mae")
    ours = {k: tuple(v.shape) for k, v in mae.state_dict().items()}
    assert {**ours, "pos_embed": (1, 197, 1024), "decoder_pos_embed": (1, 197, 512)} == mae_release()
    assert (mae.norm.eps, mae.blocks[0].norm1.eps, mage.norm.eps, mage.token_emb.LayerNorm.eps,
            mage.mlm_layer.ln.eps) == (1e-6, 1e-6, 1e-6, 1e-6, 1e-5)


def test_presets_name_the_release_files(paper_models):
    _, cfg = paper_models("imagenet_vqgan")
    assert (cfg.model.pretrained, cfg.model.pretrained_tokenizer) == ("/weights/mage-vitb-1600.pth",
                                                                        "/weights/vqgan_jax_strongaug.ckpt")
    assert paper_models("imagenet_mae")[1].model.pretrained == "/weights/mae_visualize_vit_large.pth"


@pytest.mark.parametrize("preset,release", [("imagenet_vqgan", mage_release), ("imagenet_mae", mae_release)])
def test_release_state_dicts_load_and_bad_keys_fail_by_name(paper_models, preset, release):
    model, _ = paper_models(preset)
    info = load_weights(model, "release.pth", "model.pretrained", state=meta_state(release()))
    assert info["tensors"] == len(release()) - (len(MAGE_UNUSED) if preset == "imagenet_vqgan" else 2)
    if preset == "imagenet_vqgan":
        dropped, renamed = "blocks.11.mlp.fc2.bias", "vqgan.decoder.up.4.upsample.conv.weight"
        reshaped = "mlm_layer.bias"
    else:
        dropped, renamed, reshaped = "mask_token", "decoder_pred.weight", "blocks.23.norm2.bias"
    state = meta_state(release())
    state.pop(dropped)
    state[renamed + "_v2"] = state.pop(renamed)
    state[reshaped] = torch.empty(7, device="meta")
    with pytest.raises(ConfigError) as err:
        load_weights(model, "release.pth", "model.pretrained", state=state)
    text = str(err.value)
    assert text.startswith("model.pretrained=release.pth")
    assert "2 missing" in text and dropped in text and renamed in text and f"{renamed}_v2" in text
    assert f"{reshaped} (7,)" in text


def test_mage_release_needs_its_unused_tensors_too(paper_models):
    model, _ = paper_models("imagenet_vqgan")
    state = meta_state(mage_release())
    state.pop("decoder_pred.bias")  # never used to generate, but part of the release
    with pytest.raises(ConfigError, match="MAGE release's layout.*1 missing: decoder_pred.bias"):
        load_weights(model, "mage-vitb-1600.pth", "model.pretrained", state=state)


# ---- tiny sizes with values --------------------------------------------------------------------------------------
SIZE = 32
TINY_MAGE = dict(image_size=SIZE, channels=3, tokenizer_channels=(8, 16, 16), tokenizer_layers=1, latent_channels=8,
                 codebook_size=32, codebook_dim=8, norm_groups=4, embed_dim=32, depth=1, num_heads=2, decoder_dim=16,
                 decoder_depth=1, decoder_heads=2, dropout=0.0, decode_steps=2, tokenizer="maskgit")
TINY_MAGE_RELEASE = dict(size=SIZE, p=4, c=3, codes=32, d=32, depth=1, dd=16, ddepth=1, widths=(8, 16, 16), layers=1,
                         z=8)
TINY_MAE = dict(image_size=SIZE, channels=3, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_dim=16,
                decoder_depth=1, decoder_heads=1)
IMAGENET = dict(pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225])


def tiny_mage(seed: int = 0, **kw) -> MAGE:
    torch.manual_seed(seed)
    return vqgan_family(**{"transformer": "mage", **TINY_MAGE, **kw})


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=SIZE, mode="bilinear")


def test_a_release_file_loads_with_its_values(tmp_path):
    release = random_state(mage_release(**TINY_MAGE_RELEASE), seed=3)
    torch.save({"model": release, "epoch": 1599}, tmp_path / "mage-vitb-1600.pth")
    model = tiny_mage()
    assert load_weights(model, tmp_path / "mage-vitb-1600.pth", "model.pretrained")["tensors"] == len(release) - 9
    state = model.state_dict()
    for k, v in release.items():
        if k not in MAGE_UNUSED:
            assert torch.equal(state[k.replace("vqgan.", "tokenizer.", 1)], v), k
    # the tokenizer file on its own (its keys bare) is what pre_train's model.pretrained_tokenizer loads
    tokenizer = {k.removeprefix("vqgan."): v for k, v in release.items() if k.startswith("vqgan.")}
    torch.save(tokenizer, tmp_path / "vqgan_jax_strongaug.ckpt")
    fresh = tiny_mage(seed=1, pretrained_tokenizer=str(tmp_path / "vqgan_jax_strongaug.ckpt"))
    x = images(4, 0)
    ctx = StageContext(train_data=None, fit=None, eval_batches=lambda split: iter([{"image": x}]), workdir=tmp_path,
                       scorer=None, seed=0)
    record = fresh.pre_train(ctx)
    assert record["tokenizer"] == "pretrained" and record["tokenizer_tensors"] == len(tokenizer)
    assert all(torch.equal(fresh.tokenizer.state_dict()[k], v) for k, v in tokenizer.items())
    # this framework's own checkpoint of the same config loads as it is
    torch.save(model.state_dict(), tmp_path / "checkpoint.pt")
    load_weights(fresh, tmp_path / "checkpoint.pt", "model.pretrained")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values(), strict=True))


def public_mage_logits(m: MAGE, ids: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """MAGE's training forward with the dropped = the masked tokens = ``missing``, the way the public code computes
    it: every token embedded ([MASK] ids in the hole), then dropped by a boolean mask; the decoder input padded with
    the decoded [CLS] token; logits over the whole vocabulary, of which the codebook ids are scored."""
    b, n = ids.shape
    tokens = torch.cat([torch.full((b, 1), m.codebook_size + 76), ids.masked_fill(missing, m.vocab_size - 1)], 1)
    drop = torch.cat([torch.zeros(b, 1, dtype=torch.bool), missing], 1)
    te = m.token_emb
    x = te.LayerNorm(te.word_embeddings(tokens) + te.position_embeddings.weight[None])
    x = x[~drop].reshape(b, -1, x.shape[-1])
    for blk in m.blocks:
        x = blk(x)
    x = m.decoder_embed(m.norm(x))
    pad = x[:, :1].repeat(1, n + 1, 1)
    full = pad.clone()
    full[~drop] = x.reshape(-1, x.shape[-1])
    full = torch.where(drop[..., None], pad, full) + m.decoder_pos_embed_learned
    for blk in m.decoder_blocks:
        full = blk(full)
    hidden = m.mlm_layer.ln(F.gelu(m.mlm_layer.fc(m.decoder_norm(full))))
    logits = hidden @ te.word_embeddings.weight.t() + m.mlm_layer.bias
    return logits[:, 1:, : m.codebook_size]


def test_mage_forward_is_the_public_forward():
    m = tiny_mage().eval()
    for p in m.parameters():  # away from the initialisation's zero biases, so every term counts
        p.data.normal_(0, 0.3)
    ids = torch.randint(0, 32, (3, m.num_tokens), generator=torch.Generator().manual_seed(0))
    missing = m.token_missing(center_mask(SIZE, 0.5).expand(3, -1, -1, -1))
    with torch.no_grad():
        ours = m._logits(ids, missing)
    assert ours.shape == (3, 64, 32)
    assert torch.allclose(ours, public_mage_logits(m, ids, missing), atol=1e-4)
    keep = m._kept_positions(missing)
    m._decode(torch.randn(3, 1 + keep.shape[1], 32), keep).sum().backward()
    assert m.mlm_layer.fc.weight.grad is not None
    assert m.token_emb.word_embeddings.weight.grad is None  # the head reads the word embeddings detached


def test_maskgit_tokenizer_wiring():
    vq = dict(channels=3, image_size=SIZE, block_channels=[8, 16, 16], layers=1, latent_channels=8, codebook_size=32,
              codebook_dim=8, norm_groups=4, kind="maskgit")
    torch.manual_seed(0)
    tok = build_tokenizer(**vq).eval()
    for p in tok.parameters():
        p.data.normal_(0, 0.2)
    blk, x = tok.encoder.down[1].block[0], torch.randn(2, 8, 8, 8)  # 8 -> 16 channels: the shortcut block
    h = blk.conv2(F.silu(blk.norm2(blk.conv1(F.silu(blk.norm1(x))))))
    assert torch.allclose(blk(x), h + blk.nin_shortcut(h))  # the shortcut reads the branch output, not x
    x = images(2, 1)
    with torch.no_grad():
        latents = tok.encode(x * 2 - 1).latents
        assert torch.allclose(latents, tok.encoder(x), atol=1e-6)  # the network sees [0, 1] pixels
        _, _, (_, _, ids) = tok.quantize(latents)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, 8)
        assert torch.equal(ids, torch.cdist(flat, tok.quantize.embedding.weight).argmin(1))
        codes = tok.quantize.get_codebook_entry(ids, (2, 8, 8, 8))
        assert torch.allclose(tok.decode(codes, force_not_quantize=True).sample, tok.decoder(codes) * 2 - 1)
    assert latents.shape == (2, 8, 8, 8)
    with pytest.raises(ConfigError, match="codebook_dim=4 must equal model.latent_channels=8"):
        build_tokenizer(**{**vq, "codebook_dim": 4})
    with pytest.raises(ConfigError, match="model.tokenizer='jax'"):
        build_tokenizer(**{**vq, "kind": "jax"})
    with pytest.raises(ConfigError, match="model.transformer='bert'"):
        vqgan_family(transformer="bert")


def mae_release_table(dim: int, grid: int) -> torch.Tensor:
    """The MAE release's fixed table (1, 1 + grid^2, dim), from its formula: a zero [CLS] row, then per position
    (row-major) sin / cos of the column index, then sin / cos of the row index, frequencies 1e4 ** (-k / (dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    halves = [np.outer(pos.reshape(-1), omega) for pos in (cols, rows)]
    table = np.concatenate([np.concatenate([np.sin(a), np.cos(a)], 1) for a in halves], 1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table])).float()[None]


def test_mae_release_loads_and_runs_as_released(tmp_path):
    release = random_state(mae_release(size=SIZE, p=4, d=32, depth=1, dd=16, ddepth=1), seed=4)
    release["pos_embed"], release["decoder_pos_embed"] = mae_release_table(32, 8), mae_release_table(16, 8)
    torch.save({"model": release}, tmp_path / "mae_visualize_vit_large.pth")
    model = MAE(**TINY_MAE, norm_eps=1e-6, sincos_layout="mae", **IMAGENET)
    assert load_weights(model, tmp_path / "mae_visualize_vit_large.pth", "model.pretrained")["tensors"] == len(
        release) - 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in release.items() if "pos_embed" not in k)
    # timm's table has another channel order: the release's weights would see permuted positions
    with pytest.raises(ConfigError, match=r"pos_embed: the file's fixed sin-cos table.*sincos_layout=mae"):
        load_weights(MAE(**TINY_MAE), tmp_path / "mae_visualize_vit_large.pth", "model.pretrained")
    # ImageNet-normalised pixels in and out: the same weights without normalisation, fed normalised pixels
    plain = MAE(**TINY_MAE, norm_eps=1e-6, sincos_layout="mae")
    plain.load_state_dict(model.state_dict())
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET.values())
    x, mask = images(2, 2), center_mask(SIZE, 0.5).expand(2, -1, -1, -1)
    with torch.no_grad():
        assert torch.allclose(model.predict(x, mask), plain.predict((x - mean) / std, mask) * std + mean, atol=1e-5)
    with pytest.raises(ConfigError, match="pixel_mean"):
        MAE(**TINY_MAE, pixel_mean=[0.5])


# ---- the family contract at tiny sizes ---------------------------------------------------------------------------
def changed(module) -> set[str]:
    return {n for (n, p), (_, q) in zip(module.student.named_parameters(), module.teacher.named_parameters(),
                                        strict=True) if not torch.equal(p, q)}


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return ({"image": images(4, 5), "mask": random_patch_mask(4, SIZE, 4, (0.5, 0.5), generator=g)},
            {"image": images(4, 6), "mask": random_patch_mask(4, SIZE, 4, (0.5, 0.5), generator=g)})


@pytest.mark.parametrize("tokenizer,transformer", [("maskgit", "mage"), ("maskgit", "vit"), ("diffusers", "mage")])
def test_backbones_run_the_family_contract(batches, tokenizer, transformer):
    m = tiny_mage(tokenizer=tokenizer, transformer=transformer)
    assert type(m) is {"mage": MAGE, "vit": VQGAN}[transformer]
    x, mask = batches[0]["image"], center_mask(SIZE, 0.5).expand(4, -1, -1, -1)
    assert m.embed(x, mask).shape == (4, 1 + 64 - 16, 32) and m.predict(x, mask).shape == (4, 64, 32)
    assert m.task_loss(x, mask).ndim == 0
    out = m.eval().restore(x, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out * (1 - mask), x * (1 - mask)) and not torch.equal(out * mask, x * mask)
    assert torch.equal(out, m.restore(x, mask, generator=torch.Generator().manual_seed(0)))
    module = run_method_steps(m.train(), M.Ours("ours"), *batches, steps=2)
    assert changed(module) and changed(module) <= m.encoder_parameter_names()


@pytest.mark.parametrize("name", ["ours", "random_encoder", "max_loss", "noisy_label", "retain_label"])
def test_mage_unlearns_with_every_method(batches, name):
    m = tiny_mage()
    method = {"ours": M.Ours, "random_encoder": M.RandomEncoder, "max_loss": M.MaxLoss, "noisy_label": M.NoisyLabel,
              "retain_label": M.RetainLabel}[name](name)
    module = run_method_steps(m, method, *batches, steps=2)
    assert changed(module)
    s, t = module.student, module.teacher
    assert all(torch.equal(a, b) for a, b in zip(s.tokenizer.buffers(), t.tokenizer.buffers(), strict=True))
    if method.encoder_only:  # MAGE's head reads the word embeddings detached: the decoder itself stays put
        assert changed(module) <= m.encoder_parameter_names()
        assert "token_emb.word_embeddings.weight" in m.encoder_parameter_names()
        assert all(torch.equal(a, b) for a, b in zip(s.decoder_parameters(), t.decoder_parameters(), strict=True))


@pytest.mark.slow
def test_a_run_starts_from_a_release_file(tmp_path):
    """The runner end to end (tiny, synthetic data): model.pretrained is a MAGE release-layout file."""
    from i2i_unlearning.runner import build_runner

    cfg = compose_cfg(tiny_overrides(tmp_path, model="vqgan", extra=[
        "model.tokenizer=maskgit", "model.transformer=mage", "metrics.audit=false"]))
    m = cfg.model
    spec = mage_release(size=m.image_size, p=2 ** (len(m.tokenizer_channels) - 1), c=m.channels, codes=m.codebook_size,
                        d=m.embed_dim, depth=m.depth, dd=m.decoder_dim, ddepth=m.decoder_depth,
                        widths=tuple(m.tokenizer_channels), layers=m.tokenizer_layers, z=m.latent_channels)
    torch.save({"model": random_state(spec, seed=5)}, tmp_path / "mage-vitb-1600.pth")
    cfg.model.pretrained = str(tmp_path / "mage-vitb-1600.pth")
    result = build_runner(cfg, tmp_path / "run", "h").execute()
    assert result["status"] == "ok" and result["original_train_s"] == 0.0
    assert np.isfinite(result["metrics"]["forget_fid"])
