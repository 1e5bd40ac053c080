"""Palette's guided-diffusion UNet as a backbone of the diffusion family, so the public Palette release loads.

``GuidedUNet`` has the parameter layout of the UNet in Palette's ``guided_diffusion_modules`` (key for key,
shape for shape), and ``PaletteDiffusion`` (a `Diffusion` subclass) holds it as ``denoise_fn``, as Palette's
``Network`` does: the released Places2 inpainting checkpoint ``16_Network.pth`` (a state dict of that
``Network``) therefore loads under its own tensor names; its noise-schedule buffers are checked and dropped.

The network (the Places2 release: width 64, multipliers 1-2-4-8, two residual blocks per level, 32 channels per
attention head, GroupNorm of 32 groups, 6 input and 3 output channels; 62,641,347 parameters):

* conditioning: a noise level gamma in [0, 1] (the cumulative alpha of the schedule, not a timestep index):
  ``inner_channel`` sinusoidal features of gamma (cosines first, then sines, frequencies ``10000 ** (-i / half)``)
  -> ``cond_embed`` (Linear, SiLU, Linear; width 4 x ``inner_channel``);
* ``input_blocks``: a 3x3 conv, then per level ``res_blocks`` residual blocks (each followed by self-attention
  where the level's downsampling factor is in ``attn_res``) and, between levels, a residual block that
  average-pools inside itself;
* ``middle_block``: residual block, self-attention, residual block;
* ``output_blocks``: per level, deepest first, ``res_blocks + 1`` residual blocks over [h, the matching input
  block's output], the last one of every level but the top followed by a residual block that upsamples
  (nearest) inside itself;
* ``out``: GroupNorm, SiLU, 3x3 conv to the noise estimate.
Residual block: GroupNorm, SiLU, 3x3 conv; the embedding scales and shifts the second GroupNorm's output (FiLM);
SiLU, dropout, 3x3 conv; a 1x1 conv on the skip path where the width changes. Self-attention: GroupNorm, a 1x1
qkv projection laid out per head (q, k, v of head 0, then of head 1, ...), softmax attention, a 1x1 projection,
residual. GroupNorm runs in float32.

The family (`PaletteDiffusion`) builds the inputs as the release was trained on them, images in [-1, 1]:
6 channels (2 x ``channels``) = [y_cond, y_t], y_cond = the image outside the hole and standard normal noise
inside it, y_t = the image outside the hole and sqrt(gamma) * target + sqrt(1 - gamma) * eps inside it.
Training draws t uniform in 1..T-1 on the training schedule and gamma uniform between its cumulative alphas at
t and t-1 (``sample_state``: t, eps, gamma and the condition's noise, so student and teacher see one draw).
``restore`` runs a diffusers sampler on ``sample_schedule`` (the release: its 1,000-step test schedule), the
network conditioned on that schedule's cumulative alpha at each step, starting from y_cond itself (the release's
restoration starts from its condition image) and putting the known pixels back after every step. Encoder:
``input_blocks`` and ``middle_block`` (+ ``cond_embed`` with ``encoder_time_embedding``, the reference
unlearning code's choice and this family's default); ``embed`` is their 13 feature maps at the Places2 size.
Rows a state marks ``pure`` (the reference construction's forget input) hold eps itself in y_t's hole. The
diffusion family's ``task_loss`` / ``row_losses`` reduce this family's ``_noise_error``.

Differences from the release: ``task_loss`` normalises the hole's squared noise error by the hole's size (the
release: the mean of the masked error over the whole image, a per-batch constant factor); the schedules are
diffusers' float32 ones (the release's float64 cumulative alphas agree to 2.5e-7 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from ..errors import ConfigError
from .diffusion import SAMPLERS, Diffusion, DiffusionState

# Palette's ``Network`` registers these schedule buffers beside ``denoise_fn`` (so its state dicts hold them)
SCHEDULE_BUFFERS = ("gammas", "sqrt_recip_gammas", "sqrt_recipm1_gammas", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
PREFIX = "denoise_fn."


def noise_level_features(gamma: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) noise levels -> (B, dim) sinusoidal features: cos(gamma * f_i) then sin(gamma * f_i),
    f_i = max_period ** (-i / half) for i < half = dim // 2 (a zero column pads an odd ``dim``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=gamma.device))
    angles = gamma.float().reshape(-1, 1) * freqs
    return F.pad(torch.cat([angles.cos(), angles.sin()], dim=1), (0, dim % 2))


class Norm32(nn.GroupNorm):
    """GroupNorm computed in float32, the result cast back to the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def _resample(x: Tensor, how: str | None) -> Tensor:
    if how == "down":
        return F.avg_pool2d(x, 2)
    if how == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class ResBlock(nn.Module):
    """Residual block conditioned on the noise-level embedding; ``resample`` "down" / "up" halves / doubles
    the resolution between its first normalisation and its first conv (and on the skip path)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.in_layers = nn.Sequential(Norm32(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_layers = nn.Sequential(Norm32(groups, cout), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)  # each block starts as its skip path
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = _resample(self.in_layers[1](self.in_layers[0](x)), self.resample)
        h = self.in_layers[2](h)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(_resample(x, self.resample)) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions, ``head_channels`` per head, qkv laid out per head."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = Norm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, height * width)
        qkv = self.qkv(self.norm(flat)).reshape(b, self.heads, 3, c // self.heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=2)  # each (b, heads, positions, head channels)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, height * width)
        return (flat + self.proj_out(out)).reshape(b, c, height, width)


class EmbedStage(nn.ModuleList):
    """Layers applied in order; the residual blocks among them also get the noise-level embedding."""

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class GuidedUNet(nn.Module):
    """Palette's guided-diffusion UNet (the module doc): (x, gamma) -> noise estimate, split into
    ``encode`` (input blocks + middle block) and ``decode`` (output blocks + ``out``)."""

    def __init__(self, in_channels: int, out_channels: int, inner_channel: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 4, 8), res_blocks: int = 2, attn_res: tuple[int, ...] = (16,),
                 head_channels: int = 32, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.inner_channel = inner_channel
        emb_dim = 4 * inner_channel
        self.cond_embed = nn.Sequential(nn.Linear(inner_channel, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, norm_groups, resample)

        def attention(c: int) -> AttentionBlock:
            return AttentionBlock(c, head_channels, norm_groups)

        widths = [inner_channel * m for m in channel_mults]
        ch, factor = widths[0], 1
        self.input_blocks = nn.ModuleList([EmbedStage([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skip_widths = [ch]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers = [res(ch, width)]
                ch = width
                if factor in attn_res:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedStage(layers))
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.input_blocks.append(EmbedStage([res(ch, ch, "down")]))
                skip_widths.append(ch)
                factor *= 2
        self.middle_block = EmbedStage([res(ch, ch), attention(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(res_blocks + 1):
                layers = [res(ch + skip_widths.pop(), widths[level])]
                ch = widths[level]
                if factor in attn_res:
                    layers.append(attention(ch))
                if level > 0 and i == res_blocks:
                    layers.append(res(ch, ch, "up"))
                    factor //= 2
                self.output_blocks.append(EmbedStage(layers))
        self.out = nn.Sequential(Norm32(norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def embed_noise_level(self, gamma: Tensor) -> Tensor:
        """(B,) noise levels -> (B, 4 x inner_channel) embedding fed to every residual block."""
        return self.cond_embed(noise_level_features(gamma, self.inner_channel))

    def encode(self, x: Tensor, emb: Tensor) -> tuple[list[Tensor], Tensor]:
        """(every input block's output, the middle block's output)."""
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return skips, self.middle_block(h, emb)

    def decode(self, skips: list[Tensor], h: Tensor, emb: Tensor) -> Tensor:
        """Output blocks over ``h`` and the skips (deepest first), then the output head."""
        skips = list(skips)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def forward(self, x: Tensor, gamma: Tensor) -> Tensor:
        emb = self.embed_noise_level(gamma)
        return self.decode(*self.encode(x, emb), emb)


@dataclass(kw_only=True)
class PaletteState(DiffusionState):
    """A Palette training input's randomness: as `DiffusionState` (t (B,), eps (B,C,H,W), ``pure`` rows), plus
    the continuous noise level gamma (B,) the network sees and the noise in the condition image's hole (B,C,H,W)."""

    gamma: Tensor
    cond_noise: Tensor


class PaletteDiffusion(Diffusion):
    """The diffusion family on Palette's guided-diffusion UNet, with the release's inputs (the module doc)."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        inner_channel: int = 16,
        channel_mults: tuple[int, ...] = (1, 2, 4),
        res_blocks: int = 1,
        attn_res: tuple[int, ...] = (4,),
        head_channels: int = 16,
        norm_groups: int = 8,
        dropout: float = 0.0,
        encoder_time_embedding: bool = True,
        mask_patch: int = 4,
        schedule: dict | None = None,
        sample_schedule: dict | None = None,
        sampler: str = "ddim",
        sample_steps: int = 10,
        timestep_spacing: str = "trailing",
        eta: float = 0.0,
        train: dict | None = None,
        name: str = "palette",
        pretrained: str | None = None,  # read by the runner (e.g. the release's 16_Network.pth)
    ):
        # past Diffusion.__init__ (it builds a diffusers UNet): this family builds its own network and sets what
        # the inherited methods read
        super(Diffusion, self).__init__(image_size, channels, train)
        mults = [int(m) for m in channel_mults]
        widths = [inner_channel * m for m in mults]
        if not mults or image_size % 2 ** (len(mults) - 1):
            raise ConfigError(f"model.image_size={image_size} is not divisible by 2 ** (len(model.channel_mults) - 1)"
                              f" = {2 ** (len(mults) - 1)}; use fewer levels or another image size")
        if any(w % norm_groups for w in widths) or widths[-1] % head_channels:
            raise ConfigError(f"model.inner_channel={inner_channel} x model.channel_mults={mults} must be divisible "
                              f"by model.norm_groups={norm_groups}, the deepest width by model.head_channels="
                              f"{head_channels}")
        attended = [w for level, w in enumerate(widths) if 2 ** level in attn_res]
        if any(w % head_channels for w in attended):
            raise ConfigError(f"model.attn_res={list(attn_res)}: the widths {attended} it attends at must be "
                              f"divisible by model.head_channels={head_channels}")
        if res_blocks < 1:
            raise ConfigError(f"model.res_blocks={res_blocks}: use at least 1")
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler={sampler!r}: use one of {sorted(SAMPLERS)}")
        schedule = {"num_train_timesteps": 2000, "beta_schedule": "linear", "beta_start": 1e-6, "beta_end": 0.01,
                    **(schedule or {})}
        sample_schedule = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                           "beta_end": 0.09, **(sample_schedule or {})}
        if not 1 <= sample_steps <= sample_schedule["num_train_timesteps"]:
            raise ConfigError(f"model.sample_steps={sample_steps}: use 1 to model.sample_schedule.num_train_timesteps="
                              f"{sample_schedule['num_train_timesteps']}")
        self.save_hyperparameters()
        self.mask_patch = mask_patch
        self.encoder_time_embedding = encoder_time_embedding
        self.sample_steps, self.eta = sample_steps, eta
        self.denoise_fn = GuidedUNet(2 * channels, channels, inner_channel, tuple(mults), res_blocks,
                                     tuple(attn_res), head_channels, dropout, norm_groups)
        self.noise_schedule = DDPMScheduler(**schedule)
        self.sampler = SAMPLERS[sampler](**sample_schedule, timestep_spacing=timestep_spacing)
        self.num_timesteps = schedule["num_train_timesteps"]
        # the cumulative alphas of the training schedule (Palette's ``gammas``) and of the sampling schedule
        self.register_buffer("gammas", self.noise_schedule.alphas_cumprod.clone(), persistent=False)
        self.register_buffer("sample_gammas", self.sampler.alphas_cumprod.clone(), persistent=False)

    def adapt_pretrained(self, state: dict) -> dict:
        """A Palette ``Network`` state dict (or a bare UNet one: ``denoise_fn.`` is added): its schedule buffers
        are dropped after ``gammas`` is checked against ``model.schedule``; the rest must match by name."""
        state = dict(state)
        buffers = {k: state.pop(k) for k in SCHEDULE_BUFFERS if k in state}
        if state and not any(k.startswith(PREFIX) for k in state):
            state = {PREFIX + k: v for k, v in state.items()}
        gammas, ours = buffers.get("gammas"), self.gammas
        if gammas is not None and (gammas.shape != ours.shape
                                   or not torch.allclose(gammas.float(), ours.cpu(), rtol=1e-4, atol=1e-7)):
            raise ConfigError(
                f"the checkpoint's noise schedule `gammas` ({gammas.numel()} steps, "
                f"{gammas[0].item():.6g} to {gammas[-1].item():.6g}) is not model.schedule's ({self.num_timesteps} "
                f"steps, {ours[0].item():.6g} to {ours[-1].item():.6g}): set model.schedule to the training schedule "
                "the checkpoint was trained with"
            )
        return state

    # ---- encoder / decoder -------------------------------------------------------------
    def encoder_parameter_names(self) -> set[str]:
        """``input_blocks`` and ``middle_block`` (+ ``cond_embed`` if ``encoder_time_embedding``)."""
        prefixes = (PREFIX + "input_blocks.", PREFIX + "middle_block.")
        if self.encoder_time_embedding:
            prefixes += (PREFIX + "cond_embed.",)
        return {n for n, _ in self.named_parameters() if n.startswith(prefixes)}

    # ---- inputs ------------------------------------------------------------------------
    def sample_state(self, image: Tensor, mask: Tensor) -> PaletteState:
        """t uniform in 1..T-1, gamma uniform between the cumulative alphas at t and t-1 (as the release's
        training), eps and the condition's hole noise standard normal; one of each per image."""
        b = image.shape[0]
        t = torch.randint(1, self.num_timesteps, (b,), device=image.device)
        low, high = self.gammas[t], self.gammas[t - 1]
        gamma = low + (high - low) * torch.rand(b, device=image.device)
        return PaletteState(t=t, noise=torch.randn_like(image), gamma=gamma, cond_noise=torch.randn_like(image))

    def join_states(self, states: list[PaletteState | None]) -> PaletteState:
        """The states of concatenated batches (each drawn with ``sample_state`` on its own batch)."""
        joined = super().join_states(states)
        return PaletteState(t=joined.t, noise=joined.noise, pure=joined.pure,
                            gamma=torch.cat([s.gamma for s in states]),
                            cond_noise=torch.cat([s.cond_noise for s in states]))

    def pure_noise_state(self, state: PaletteState) -> PaletteState:
        """``state`` (same noise level and noises) with y_t equal to eps inside the hole, in every row."""
        return replace(state, pure=super().pure_noise_state(state).pure)

    def _input(self, image: Tensor, mask: Tensor, hole: Tensor, state: PaletteState) -> Tensor:
        """[y_cond, y_t] in [-1, 1]: y_cond is ``image`` with the state's condition noise in the hole; y_t noises
        ``hole`` (an image in [0, 1]) to the state's gamma inside the hole (rows the state marks ``pure``: eps
        itself) and keeps ``image``'s known pixels."""
        gamma = state.gamma.view(-1, 1, 1, 1).to(image.dtype)
        known = (2 * image - 1) * (1 - mask)
        noisy = gamma.sqrt() * (2 * hole - 1) + (1 - gamma).sqrt() * state.noise
        if state.pure is not None:
            noisy = torch.where(state.pure.view(-1, 1, 1, 1), state.noise, noisy)
        return torch.cat([known + state.cond_noise * mask, noisy * mask + known], dim=1)

    # ---- the family contract -----------------------------------------------------------
    def embed(self, image: Tensor, mask: Tensor, state: PaletteState | None = None) -> list[Tensor]:
        """The encoder's feature maps of T(image) at the state's noise level and noise."""
        state = self._check_state(image, mask, state)
        x = self._input(image, mask, image, state)
        skips, mid = self.denoise_fn.encode(x, self.denoise_fn.embed_noise_level(state.gamma))
        return [*skips, mid]

    def predict(self, image: Tensor, mask: Tensor, state: PaletteState | None = None) -> Tensor:
        """One-step x0 estimate at the state's noise level, in [0, 1], known pixels kept."""
        state = self._check_state(image, mask, state)
        x = self._input(image, mask, image, state)
        gamma = state.gamma.view(-1, 1, 1, 1).to(x.dtype)
        x0 = (x[:, self.channels:] - (1 - gamma).sqrt() * self.denoise_fn(x, state.gamma)) / gamma.sqrt()
        return image * (1 - mask) + ((x0.clamp(-1, 1) + 1) / 2) * mask

    def raw_output(self, image: Tensor, mask: Tensor, state: PaletteState | None = None) -> Tensor:
        """The noise estimate over the whole image at the state's noise level and noise."""
        state = self._check_state(image, mask, state)
        return self.denoise_fn(self._input(image, mask, image, state), state.gamma)

    def _noise_error(self, image: Tensor, mask: Tensor, target: Tensor | None, state: PaletteState | None
                     ) -> Tensor:
        """Squared noise-prediction error inside the hole (zero outside) for the pair (T(image), ``target``);
        the inherited ``task_loss`` and ``row_losses`` reduce it."""
        target = image if target is None else target
        if target.shape != image.shape:
            raise ConfigError(
                f"PaletteDiffusion.task_loss target of shape {tuple(target.shape)}: use an image of the batch's "
                f"shape {tuple(image.shape)} in [0, 1] (target_of or predict of other images)"
            )
        state = self._check_state(image, mask, state)
        x = self._input(image, mask, target, state)
        return (self.denoise_fn(x, state.gamma) - state.noise) ** 2 * mask

    @torch.no_grad()
    def restore(self, image: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample the hole with ``sampler`` on ``sample_schedule`` in ``sample_steps`` steps, from y_cond (the
        release's start); known pixels reset after each step."""
        device = image.device
        noise = torch.randn(image.shape, generator=generator,
                            device=generator.device if generator is not None else device).to(device, image.dtype)
        known = (2 * image - 1) * (1 - mask)
        cond = known + noise * mask
        x = cond
        self.sampler.set_timesteps(self.sample_steps, device=device)
        extra = {"eta": self.eta} if isinstance(self.sampler, DDIMScheduler) else {}
        for t in self.sampler.timesteps:
            gamma = self.sample_gammas[t].expand(image.shape[0])
            eps = self.denoise_fn(torch.cat([cond, x], dim=1), gamma)
            x = self.sampler.step(eps, t, x, generator=generator, **extra).prev_sample * mask + known
        return image * (1 - mask) + ((x.clamp(-1, 1) + 1) / 2) * mask
