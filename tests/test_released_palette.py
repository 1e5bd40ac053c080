"""The released Palette Places2 inpainting checkpoint (16_Network.pth) loads into the guided-diffusion backbone,
strictly and under its own tensor names; the backbone runs the diffusion family's contract."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, run_method_steps, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.data.degrade import center_mask, random_block_mask
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.families.guided_unet import PaletteDiffusion, PaletteState, noise_level_features
from i2i_unlearning.runner import build_family, build_runner
from i2i_unlearning.runs import run_dir
from i2i_unlearning.unlearning import methods as M
from i2i_unlearning.weights import load_weights

# Palette's config/inpainting_places2.json, "unet": in_channel 6, out_channel 3, inner_channel 64, channel_mults
# [1, 2, 4, 8], attn_res [16], num_head_channels 32, res_blocks 2, dropout 0.2, image_size 256 (GroupNorm: 32 groups);
# "beta_schedule.train": linear, 2000 steps, 1e-6 to 0.01.
PLACES2 = dict(inner=64, mults=(1, 2, 4, 8), res_blocks=2, attn_res=(16,))
PLACES2_FAMILY = dict(image_size=256, channels=3, inner_channel=64, channel_mults=(1, 2, 4, 8), res_blocks=2,
                      attn_res=(16,), head_channels=32, norm_groups=32, dropout=0.2)
# The parameters of that UNet (models/guided_diffusion_modules/unet.py at the Places2 config): the sum of the shapes
# `release_layout` lists; its noise schedule adds six buffers of 2000 values (no parameters).
RELEASED_PARAMETERS = 62_641_347
SCHEDULE_BUFFERS = ("gammas", "sqrt_recip_gammas", "sqrt_recipm1_gammas", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# tiny: the tiny size of conf/model/palette.yaml on the synthetic data (32 px, 1 channel); attention at factor 2
# puts attention blocks inside input and output blocks, which the Places2 config never does
TINY = dict(in_ch=2, out_ch=1, inner=8, mults=(1, 2), res_blocks=1, attn_res=(2,))
SIZE = 16


def release_layout(in_ch: int = 6, out_ch: int = 3, inner: int = 64, mults=(1, 2, 4, 8), res_blocks: int = 2,
                   attn_res=(16,), steps: int = 2000) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a Palette ``Network`` state dict, from the public model definition: the
    UNet under ``denoise_fn.`` and the six schedule buffers of the training schedule."""
    shapes: dict[str, tuple[int, ...]] = {}
    emb = 4 * inner

    def affine(name, cin, cout, kernel=()):  # Linear / Conv: weight (out, in, *kernel) and bias (out,)
        shapes[f"denoise_fn.{name}.weight"], shapes[f"denoise_fn.{name}.bias"] = (cout, cin, *kernel), (cout,)

    def norm(name, c):
        shapes[f"denoise_fn.{name}.weight"], shapes[f"denoise_fn.{name}.bias"] = (c,), (c,)

    def resblock(name, cin, cout):  # scale-shift norm: the embedding projects to 2 x cout
        norm(f"{name}.in_layers.0", cin)
        affine(f"{name}.in_layers.2", cin, cout, (3, 3))
        affine(f"{name}.emb_layers.1", emb, 2 * cout)
        norm(f"{name}.out_layers.0", cout)
        affine(f"{name}.out_layers.3", cout, cout, (3, 3))
        if cin != cout:
            affine(f"{name}.skip_connection", cin, cout, (1, 1))

    def attention(name, c):
        norm(f"{name}.norm", c)
        affine(f"{name}.qkv", c, 3 * c, (1,))
        affine(f"{name}.proj_out", c, c, (1,))

    affine("cond_embed.0", inner, emb)
    affine("cond_embed.2", emb, emb)
    widths = [inner * m for m in mults]
    affine("input_blocks.0.0", in_ch, widths[0], (3, 3))
    stack, ch, factor, block = [widths[0]], widths[0], 1, 1
    for level, width in enumerate(widths):
        for _ in range(res_blocks):
            resblock(f"input_blocks.{block}.0", ch, width)
            ch = width
            if factor in attn_res:
                attention(f"input_blocks.{block}.1", ch)
            stack, block = stack + [ch], block + 1
        if level + 1 < len(widths):  # a downsampling resblock
            resblock(f"input_blocks.{block}.0", ch, ch)
            stack, block, factor = stack + [ch], block + 1, factor * 2
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    block = 0
    for level in reversed(range(len(widths))):
        for i in range(res_blocks + 1):
            resblock(f"output_blocks.{block}.0", ch + stack.pop(), widths[level])
            ch, layer = widths[level], 1
            if factor in attn_res:
                attention(f"output_blocks.{block}.1", ch)
                layer = 2
            if level and i == res_blocks:  # an upsampling resblock
                resblock(f"output_blocks.{block}.{layer}", ch, ch)
                factor //= 2
            block += 1
    norm("out.0", ch)
    affine("out.2", ch, out_ch, (3, 3))
    return {**shapes, **{name: (steps,) for name in SCHEDULE_BUFFERS}}


def release_gammas(steps=2000, start=1e-6, end=0.01) -> torch.Tensor:
    """The release's ``gammas`` buffer: cumulative products of 1 - linear betas, in float64, stored as float32."""
    return torch.tensor(np.cumprod(1 - np.linspace(start, end, steps)), dtype=torch.float32)


def release_state(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the release's names and shapes: random tensors, its schedule buffers."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in layout.items() if k.startswith("denoise_fn.")}
    return {**state, **{k: torch.rand(layout[k], generator=g) for k in SCHEDULE_BUFFERS}, "gammas": release_gammas()}


def test_layout_spot_checks():
    """A few tensors of the Places2 layout, worked out by hand from the public definition."""
    layout = release_layout(**PLACES2)
    assert layout["denoise_fn.cond_embed.0.weight"] == (256, 64)  # 64 sinusoidal features -> 4 x 64
    assert layout["denoise_fn.input_blocks.0.0.weight"] == (64, 6, 3, 3)  # [y_cond, y_t]
    assert layout["denoise_fn.input_blocks.1.0.emb_layers.1.weight"] == (128, 256)  # scale and shift
    assert layout["denoise_fn.input_blocks.3.0.in_layers.2.weight"] == (64, 64, 3, 3)  # the first downsampler
    assert layout["denoise_fn.middle_block.1.qkv.weight"] == (1536, 512, 1)
    assert layout["denoise_fn.output_blocks.0.0.skip_connection.weight"] == (512, 1024, 1, 1)
    assert layout["denoise_fn.output_blocks.2.1.in_layers.2.weight"] == (512, 512, 3, 3)  # the first upsampler
    assert layout["denoise_fn.out.2.weight"] == (3, 64, 3, 3)
    assert not any(".qkv." in k for k in layout if "middle_block" not in k)  # attn_res [16]: never matched
    assert max(int(k.split(".")[2]) for k in layout if ".input_blocks." in k) == 11  # 12 input blocks
    assert max(int(k.split(".")[2]) for k in layout if ".output_blocks." in k) == 11  # 12 output blocks


# ---- the paper size --------------------------------------------------------------------------------------
def test_paper_size_builds_on_meta_with_the_released_parameter_count():
    layout = release_layout(**PLACES2)
    assert sum(int(np.prod(s)) for k, s in layout.items() if k.startswith("denoise_fn.")) == RELEASED_PARAMETERS
    with torch.device("meta"):
        model = PaletteDiffusion(**PLACES2_FAMILY)
        feats = model.embed(torch.rand(2, 3, 256, 256), center_mask(256, 0.5).expand(2, -1, -1, -1))
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    assert sum(p.numel() for p in params) == RELEASED_PARAMETERS
    # the encoder's 13 feature maps: the 12 input blocks and the middle block
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 256, 256), (64, 256, 256), (64, 256, 256), (64, 128, 128), (128, 128, 128), (128, 128, 128),
        (128, 64, 64), (256, 64, 64), (256, 64, 64), (256, 32, 32), (512, 32, 32), (512, 32, 32), (512, 32, 32)]


def test_release_layout_loads_at_paper_size():
    """Every tensor of the release's layout lands in the backbone under its own name; the schedule is checked."""
    model = PaletteDiffusion(**PLACES2_FAMILY)
    layout = release_layout(**PLACES2)
    state = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(layout.items())}
    state["gammas"] = release_gammas()
    info = load_weights(model, "16_Network.pth", what="model.pretrained", state=state)
    loaded = model.state_dict()
    assert info["tensors"] == len(loaded) == len(layout) - len(SCHEDULE_BUFFERS)
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


# ---- strict loading through model.pretrained ------------------------------------------------------------
def tiny_cfg(tmp: Path, *extra: str):
    return compose_cfg(tiny_overrides(tmp, model="palette", extra=list(extra)))


def original_from(tmp: Path, path: Path):
    """The runner's original model with model.pretrained=path (nothing trained, no data)."""
    return build_runner(tiny_cfg(tmp, f"model.pretrained={path}"), tmp / "run", "x").reference("original")


@pytest.fixture
def release_file(tmp_path) -> tuple[Path, dict]:
    state = release_state(release_layout(**TINY))
    torch.save(state, tmp_path / "16_Network.pth")
    return tmp_path / "16_Network.pth", state


def test_release_file_loads_as_the_original_model(tmp_path, release_file):
    path, state = release_file
    model, meta = original_from(tmp_path, path)
    assert isinstance(model, PaletteDiffusion) and meta["train_s"] == 0.0 and meta["pretrained"]["path"] == str(path)
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if k.startswith("denoise_fn.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    # a bare UNet state dict (no denoise_fn. prefix, no schedule) loads too
    bare = tmp_path / "bare.pth"
    torch.save({k.removeprefix("denoise_fn."): v for k, v in loaded.items()}, bare)
    assert all(torch.equal(v, loaded[k]) for k, v in original_from(tmp_path, bare)[0].state_dict().items())


@pytest.mark.parametrize("edit, names", [
    ("missing", ["denoise_fn.middle_block.1.qkv.weight"]),
    ("renamed", ["denoise_fn.input_blocks.3.1.proj_out.bias", "denoise_fn.input_blocks.3.1.to_out.bias"]),
    ("reshaped", ["denoise_fn.out.2.weight (3, 8, 3, 3) (model: (1, 8, 3, 3))"]),
    ("schedule", ["`gammas` (1000 steps", "model.schedule"]),
])
def test_wrong_release_file_fails_naming_the_tensor(tmp_path, release_file, edit, names):
    path, state = release_file
    if edit == "missing":
        state.pop("denoise_fn.middle_block.1.qkv.weight")
    elif edit == "renamed":
        state["denoise_fn.input_blocks.3.1.to_out.bias"] = state.pop("denoise_fn.input_blocks.3.1.proj_out.bias")
    elif edit == "reshaped":  # an RGB head where the model has one channel
        state["denoise_fn.out.2.weight"] = torch.zeros(3, 8, 3, 3)
    else:  # the release's test schedule saved as if it were the training one
        state["gammas"] = release_gammas(1000, 1e-4, 0.09)
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        original_from(tmp_path, path)
    assert all(name in str(err.value) for name in ["model.pretrained=", str(path), *names]), str(err.value)


# ---- the backbone's pieces --------------------------------------------------------------------------------
def tiny(**kw) -> PaletteDiffusion:
    torch.manual_seed(0)
    args = dict(image_size=SIZE, channels=1, inner_channel=8, channel_mults=(1, 2), res_blocks=1, attn_res=(2,),
                head_channels=4, norm_groups=4, sample_steps=3)
    return PaletteDiffusion(**{**args, **kw})


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    forget = {"image": torch.rand(6, 1, SIZE, SIZE, generator=g), "mask": random_block_mask(6, SIZE, 4, generator=g)}
    retain = {"image": torch.rand(6, 1, SIZE, SIZE, generator=g), "mask": random_block_mask(6, SIZE, 4, generator=g)}
    return forget, retain


def test_noise_level_features_are_cosines_then_sines():
    gamma = torch.tensor([0.0, 0.25, 1.0])
    f = noise_level_features(gamma, 8)
    freqs = torch.tensor([1.0, 10.0 ** -1, 10.0 ** -2, 10.0 ** -3])  # 10000 ** (-i / 4)
    assert torch.allclose(f, torch.cat([torch.cos(gamma[:, None] * freqs), torch.sin(gamma[:, None] * freqs)], 1))
    assert noise_level_features(gamma, 7).shape == (3, 7) and (noise_level_features(gamma, 7)[:, -1] == 0).all()


def test_attention_reads_qkv_per_head():
    """The qkv projection's rows are [q, k, v] of head 0, then of head 1 (the release's head layout)."""
    attn = tiny().denoise_fn.middle_block[1]  # 16 channels, 4 per head
    torch.nn.init.normal_(attn.proj_out.weight)
    x = torch.randn(2, 16, 4, 4)
    qkv = attn.qkv(attn.norm(x.reshape(2, 16, 16))).reshape(2, 4, 3, 4, 16)  # (b, head, q/k/v, channel, position)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = torch.softmax(torch.einsum("bhcs,bhct->bhst", q, k) / 2.0, dim=-1)  # 1 / sqrt(4 channels)
    heads = torch.einsum("bhst,bhct->bhcs", weights, v).reshape(2, 16, 16)
    expected = x + attn.proj_out(heads).reshape(2, 16, 4, 4)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_inputs_follow_the_release(batches):
    m = tiny()
    x, mask = batches[0]["image"], batches[0]["mask"]
    state = m.sample_state(x, mask)
    low, high = m.gammas[state.t], m.gammas[state.t - 1]
    assert (state.t >= 1).all() and ((state.gamma >= low) & (state.gamma <= high)).all()
    inp = m._input(x, mask, x, state)
    y0, g = 2 * x - 1, state.gamma.view(-1, 1, 1, 1)
    assert inp.shape == (6, 2, SIZE, SIZE)
    assert torch.allclose(inp[:, :1], y0 * (1 - mask) + state.cond_noise * mask)  # y_cond: noise in the hole
    assert torch.allclose(inp[:, 1:], (g.sqrt() * y0 + (1 - g).sqrt() * state.noise) * mask + y0 * (1 - mask))
    pure = m._input(x, mask, x, m.pure_noise_state(state))
    assert torch.equal(pure[:, :1], inp[:, :1]) and torch.allclose(pure[:, 1:], state.noise * mask + y0 * (1 - mask))
    seen = []
    m.denoise_fn.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    m.task_loss(x, mask, state=state)
    assert torch.equal(seen[-1], state.gamma)  # conditioned on the continuous noise level


def test_restore_conditions_on_the_sampling_schedule_and_keeps_known_pixels(batches):
    m = tiny(sampler="ddpm", sample_steps=4, timestep_spacing="leading").eval()
    x, mask = batches[1]["image"][:3], center_mask(SIZE, 0.5).expand(3, -1, -1, -1)
    seen = []
    m.denoise_fn.register_forward_hook(lambda mod, args, out: seen.append(args[1][0].item()))
    a = m.restore(x, mask, generator=torch.Generator().manual_seed(0))
    expected = m.sampler.alphas_cumprod[m.sampler.timesteps]
    assert torch.allclose(torch.tensor(seen), expected) and len(seen) == 4
    assert torch.equal(a * (1 - mask), x * (1 - mask)) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, m.restore(x, mask, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, m.restore(x, mask, generator=torch.Generator().manual_seed(1)))


def test_joined_states_keep_every_draw(batches):
    m = tiny()
    (f, r) = batches
    a, b = m.sample_state(f["image"], f["mask"]), m.pure_noise_state(m.sample_state(r["image"], r["mask"]))
    joined = m.join_states([a, b])
    assert isinstance(joined, PaletteState) and joined.gamma.shape == (12,) and joined.cond_noise.shape[0] == 12
    assert joined.pure.tolist() == [False] * 6 + [True] * 6
    image, mask = torch.cat([f["image"], r["image"]]), torch.cat([f["mask"], r["mask"]])
    with torch.no_grad():
        together = m.raw_output(image, mask, state=joined)
        assert torch.allclose(together[6:], m.raw_output(r["image"], r["mask"], state=b), atol=1e-5)


# ---- the family contract ---------------------------------------------------------------------------------
def changed(module) -> set[str]:
    return {n for (n, p), (_, q) in zip(module.student.named_parameters(), module.teacher.named_parameters(),
                                        strict=True) if not torch.equal(p, q)}


@pytest.mark.parametrize("construction", ["paper", "reference"])
def test_ours_trains_the_encoder_and_noise_embedding_only(batches, construction):
    m = tiny()
    module = run_method_steps(m, M.Ours("ours", construction=construction), *batches, steps=2)
    moved = changed(module)
    assert any(n.startswith("denoise_fn.input_blocks.") for n in moved)
    assert any(n.startswith("denoise_fn.cond_embed.") for n in moved)  # encoder_time_embedding: the reference's
    assert moved <= m.encoder_parameter_names()
    assert not any(n.startswith(("denoise_fn.output_blocks.", "denoise_fn.out.")) for n in moved)
    assert not tiny(encoder_time_embedding=False).encoder_parameter_names() & {
        n for n, _ in m.named_parameters() if n.startswith("denoise_fn.cond_embed.")}


@pytest.mark.parametrize("construction", ["paper", "reference"])
@pytest.mark.parametrize("cls", [M.MaxLoss, M.NoisyLabel, M.RetainLabel, M.RandomEncoder])
def test_baselines_run_on_the_backbone(batches, cls, construction):
    method = cls(cls.__name__, construction=construction)
    model = tiny()
    with torch.no_grad():  # the release's output conv starts at zero: every output (and retain_label's loss) is 0
        model.denoise_fn.out[-1].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    module = run_method_steps(model, method, *batches, steps=1)
    out = method.loss(module.student, module.teacher, *batches)
    assert changed(module) and torch.isfinite(out["forget"]) and torch.isfinite(out["retain"])


def test_configs_compose():
    paper = compose_cfg(["experiment=[places_palette,table1]", "paths.weights_dir=/weights"])
    assert paper.model.name == "palette" and paper.data.name == "places365"
    assert paper.model.pretrained == "/weights/16_Network.pth" and paper.method.alpha == 0.1
    with torch.device("meta"):
        model = build_family(paper.model)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS
    assert model.sampler.config.num_train_timesteps == 1000 and model.sample_steps == 1000


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    """model=palette through the whole runner: original and retrain trained, `ours` for 2 steps, evaluated."""
    cfg = tiny_cfg(tmp_path, "method.steps=2", "metrics.audit=false")
    cli.main(cfg)
    metrics = json.loads((run_dir(cfg) / "metrics.json").read_text())
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["family"] == "palette" and np.isfinite(metrics["metrics"]["forget_fid"])
