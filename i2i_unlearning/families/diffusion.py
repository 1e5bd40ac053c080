"""Diffusion family: a Palette-style conditional DDPM on a diffusers ``UNet2DModel``.

* Model: the UNet (built from config, never downloaded) sees ``[x_t, cond, mask]``: the noisy
  target x_t with its known region reset to the clean pixels, the condition image (the
  image with its hole zeroed, in [-1, 1]) and the mask; it predicts the noise. Training
  loss: noise MSE inside the hole, timesteps uniform over a diffusers DDPM schedule (cosine,
  ``squaredcos_cap_v2``, by default).
* Restore: a diffusers sampler (``sampler``: ``ddim`` or ``ddpm``, ``sample_steps`` steps,
  ``timestep_spacing``), seeded by the caller's generator; the known region is put back after
  every step and in the output.
* Encoder: ``conv_in``, the down blocks and the mid block; decoder: the up blocks and the
  output head (``conv_norm_out``, ``conv_out``). ``embed`` is the list of the encoder's
  feature maps, as the reference code sums its loss over them: ``conv_in``'s output, every
  down-block output (each resnet layer and each downsampler) and the mid block's output --
  ``1 + levels * layers_per_block + (levels - 1) + 1`` maps, 7 for the tiny preset.
* Shared parameters: the time embedding (``unet.time_embedding``) feeds the resnets of both
  halves. By default (``encoder_time_embedding=false``, as the prototype) it belongs to the
  decoder, so encoder-only methods leave every parameter the up blocks see bit-identical;
  ``encoder_time_embedding=true`` counts it in the encoder, as the reference code does (its
  ``cond_embed`` is updated), and the "frozen" decoder then only approximately is.
* Shared randomness: a training input depends on a timestep and a noise draw.
  ``sample_state`` draws both (a ``DiffusionState``); ``embed``, ``predict`` and ``task_loss``
  use the state they are given (a fresh one otherwise), so the methods can show student and
  teacher the same timestep and noise (docs/algorithms.md: under the same mask and timestep).
* Targets: ``target_of(image)`` is the clean image x0 in [0, 1]; ``task_loss(target=y)``
  trains the pair (condition T(image), output y): x_t is built from y inside the hole (the
  known region stays the image's) and the loss is the noise MSE, so ``target=target_of(image)``
  is the plain loss, a noise image as target is Noisy Label, and gradient ascent on the plain
  loss is Max Loss. ``predict`` is the model's one-step x0 estimate at the state's timestep,
  clipped to [0, 1] with the known pixels kept, so a teacher's ``predict`` of other images is
  Retain Label's substituted target.
* Reference construction (unlearning/methods.py): ``pure_noise_state`` marks rows whose x_t is the
  noise itself inside the hole (the public code's forget input, same timestep and noise);
  ``raw_output`` is the noise estimate over the whole image; ``row_losses`` the per-row noise MSE.

Presets (conf/model/diffusion.yaml is ``tiny``; conf/experiment/diffusion_paper.yaml is ``paper``):
  tiny  -- 32 px, widths 16-32-64, one layer per block, attention at 8x8 and in the mid block
           (~0.69M parameters), cosine schedule of 1000 steps, DDIM with 10 steps;
  paper -- 256 px RGB, Palette's UNet width 64 with multipliers 1-2-4-8, two layers per
           block, attention in the mid block only, linear schedule of 2000 steps (1e-6 to 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor

from ..errors import ConfigError
from .base import Family

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


@dataclass
class DiffusionState:
    """The randomness of one diffusion training input: timesteps (B,) and noise (B,C,H,W); ``pure`` (B,) bool
    marks rows whose x_t is the noise itself inside the hole (`Diffusion.pure_noise_state`)."""

    t: Tensor
    noise: Tensor
    pure: Tensor | None = None


class Diffusion(Family):
    """Palette-style conditional DDPM: UNet over [noisy target, condition, mask] -> noise."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        block_channels: tuple[int, ...] = (16, 32, 64),
        attention: tuple[bool, ...] = (False, False, True),
        mid_attention: bool = True,
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_groups: int = 8,
        dropout: float = 0.0,
        encoder_time_embedding: bool = False,
        mask_patch: int = 4,
        schedule: dict | None = None,
        sampler: str = "ddim",
        sample_steps: int = 10,
        timestep_spacing: str = "trailing",
        eta: float = 0.0,
        train: dict | None = None,
        name: str = "diffusion",
        pretrained: str | None = None,  # read by the runner (weights of the original model)
    ):
        super().__init__(image_size, channels, train)
        block_channels, attention = list(block_channels), [bool(a) for a in attention]
        if not block_channels or len(attention) != len(block_channels):
            raise ConfigError(
                f"model.attention={attention} must give one flag per level of model.block_channels={block_channels}"
            )
        if image_size % 2 ** (len(block_channels) - 1):
            raise ConfigError(
                f"model.image_size={image_size} is not divisible by 2 ** (len(model.block_channels) - 1) = "
                f"{2 ** (len(block_channels) - 1)}; use fewer levels or another image size"
            )
        if any(c % norm_groups or c % attention_head_dim for c in block_channels):
            raise ConfigError(
                f"model.block_channels={block_channels} must be divisible by model.norm_groups={norm_groups} "
                f"and model.attention_head_dim={attention_head_dim}"
            )
        if layers_per_block < 1:
            raise ConfigError(f"model.layers_per_block={layers_per_block}: use at least 1")
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler={sampler!r}: use one of {sorted(SAMPLERS)}")
        schedule = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", **(schedule or {})}
        if not 1 <= sample_steps <= schedule["num_train_timesteps"]:
            raise ConfigError(
                f"model.sample_steps={sample_steps}: use 1 to model.schedule.num_train_timesteps="
                f"{schedule['num_train_timesteps']}"
            )
        self.save_hyperparameters()
        self.mask_patch = mask_patch
        self.encoder_time_embedding = encoder_time_embedding
        self.sample_steps, self.eta = sample_steps, eta
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=2 * channels + 1, out_channels=channels,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            block_out_channels=tuple(block_channels), layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim, norm_num_groups=norm_groups, dropout=dropout,
            add_attention=mid_attention,
        )
        self.noise_schedule = DDPMScheduler(**schedule)
        self.sampler = SAMPLERS[sampler].from_config(self.noise_schedule.config, timestep_spacing=timestep_spacing)
        self.num_timesteps = schedule["num_train_timesteps"]
        self.register_buffer("alphas_cumprod", self.noise_schedule.alphas_cumprod.clone(), persistent=False)

    def adapt_pretrained(self, state: dict) -> dict:
        """A bare ``UNet2DModel`` state dict (e.g. from a diffusers folder, ``unet.save_pretrained``) loads
        into ``self.unet``: its keys get the ``unet.`` prefix."""
        if state and not any(k.startswith("unet.") for k in state):
            return {f"unet.{k}": v for k, v in state.items()}
        return state

    # ---- encoder / decoder -------------------------------------------------------------
    def encoder_parameter_names(self) -> set[str]:
        """``conv_in``, down blocks and mid block (+ the time embedding if ``encoder_time_embedding``)."""
        prefixes = ("unet.conv_in.", "unet.down_blocks.", "unet.mid_block.")
        if self.encoder_time_embedding:
            prefixes += ("unet.time_embedding.",)
        return {n for n, _ in self.named_parameters() if n.startswith(prefixes)}

    def _time(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.unet.time_embedding(self.unet.time_proj(t).to(dtype))

    def _encode(self, x: Tensor, temb: Tensor) -> tuple[list[Tensor], Tensor]:
        """The UNet's first half: (skip feature maps of conv_in and the down blocks, mid output)."""
        h = self.unet.conv_in(x)
        skips = [h]
        for block in self.unet.down_blocks:
            h, res = block(hidden_states=h, temb=temb)
            skips.extend(res)
        return skips, self.unet.mid_block(h, temb)

    def _decode(self, skips: list[Tensor], h: Tensor, temb: Tensor) -> Tensor:
        """The UNet's second half: up blocks over the skips, then the output head."""
        for block in self.unet.up_blocks:
            n = len(block.resnets)
            h, skips = block(h, tuple(skips[-n:]), temb), skips[:-n]
        return self.unet.conv_out(self.unet.conv_act(self.unet.conv_norm_out(h)))

    def _eps(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self._time(t, x.dtype)
        return self._decode(*self._encode(x, temb), temb)

    # ---- inputs ------------------------------------------------------------------------
    def sample_state(self, image: Tensor, mask: Tensor) -> DiffusionState:
        """Timesteps uniform over the schedule and standard normal noise, one per image."""
        t = torch.randint(0, self.num_timesteps, (image.shape[0],), device=image.device)
        return DiffusionState(t, torch.randn_like(image))

    def batchable(self, masks: list[Tensor]) -> bool:
        """Always: every image of any mask goes through the same UNet shapes."""
        return True

    def join_states(self, states: list[DiffusionState | None]) -> DiffusionState:
        """The states of concatenated batches (each drawn with ``sample_state`` on its own batch)."""
        if any(s is None for s in states):
            raise ConfigError("Diffusion.join_states needs a drawn state per batch (sample_state), got None")
        flags = [s.pure if s.pure is not None else torch.zeros_like(s.t, dtype=torch.bool) for s in states]
        pure = torch.cat(flags) if any(s.pure is not None for s in states) else None
        return DiffusionState(torch.cat([s.t for s in states]), torch.cat([s.noise for s in states]), pure)

    def pure_noise_state(self, state: DiffusionState) -> DiffusionState:
        """``state`` (same timesteps and noise) with x_t equal to the noise inside the hole, in every row."""
        return DiffusionState(state.t, state.noise, torch.ones_like(state.t, dtype=torch.bool))

    def _check_state(self, image: Tensor, mask: Tensor, state: DiffusionState | None) -> DiffusionState:
        if state is None:
            return self.sample_state(image, mask)
        if state.noise.shape != image.shape:
            raise ConfigError(
                f"diffusion state of noise shape {tuple(state.noise.shape)} given for images of shape "
                f"{tuple(image.shape)}: draw it with sample_state() on the same batch"
            )
        return state

    def _alpha_bar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t].view(-1, 1, 1, 1)

    def _input(self, image: Tensor, mask: Tensor, hole: Tensor, state: DiffusionState) -> Tensor:
        """[x_t, cond, mask]: x_t noises ``hole`` (an image in [0, 1]) to the state's timestep inside
        the hole and keeps ``image``'s known pixels; cond is ``image`` with its hole zeroed. Rows the state
        marks ``pure`` have the noise itself in the hole."""
        ab = self._alpha_bar(state.t).to(image.dtype)
        known = (2 * image - 1) * (1 - mask)
        noisy = ab.sqrt() * (2 * hole - 1) + (1 - ab).sqrt() * state.noise
        if state.pure is not None:
            noisy = torch.where(state.pure.view(-1, 1, 1, 1), state.noise, noisy)
        x_t = noisy * mask + known
        return torch.cat([x_t, known, mask.to(image.dtype)], dim=1)

    # ---- the family contract -----------------------------------------------------------
    def embed(self, image: Tensor, mask: Tensor, state: DiffusionState | None = None) -> list[Tensor]:
        """The encoder's feature maps of T(image) at the state's timestep and noise."""
        state = self._check_state(image, mask, state)
        x = self._input(image, mask, image, state)
        skips, mid = self._encode(x, self._time(state.t, x.dtype))
        return [*skips, mid]

    def predict(self, image: Tensor, mask: Tensor, state: DiffusionState | None = None) -> Tensor:
        """One-step x0 estimate at the state's timestep, in [0, 1], known pixels kept."""
        state = self._check_state(image, mask, state)
        x = self._input(image, mask, image, state)
        ab = self._alpha_bar(state.t).to(x.dtype)
        x0 = (x[:, : self.channels] - (1 - ab).sqrt() * self._eps(x, state.t)) / ab.sqrt()
        return image * (1 - mask) + ((x0.clamp(-1, 1) + 1) / 2) * mask

    def task_loss(self, image: Tensor, mask: Tensor, target: Tensor | None = None,
                  state: DiffusionState | None = None) -> Tensor:
        """Noise MSE inside the hole, for the pair (condition T(image), output ``target``)."""
        err = self._noise_error(image, mask, target, state)
        return err.sum() / (mask.sum() * self.channels).clamp_min(1)

    def row_losses(self, image: Tensor, mask: Tensor, target: Tensor | None = None,
                   state: DiffusionState | None = None) -> Tensor:
        """Per-row noise MSE: the hole's squared errors over all C*H*W values of the row (the public code's mean
        over the whole tensor, zero outside the hole)."""
        return self._noise_error(image, mask, target, state).flatten(1).mean(1)

    def raw_output(self, image: Tensor, mask: Tensor, state: DiffusionState | None = None) -> Tensor:
        """The noise estimate over the whole image at the state's timestep and noise."""
        state = self._check_state(image, mask, state)
        return self._eps(self._input(image, mask, image, state), state.t)

    def _noise_error(self, image: Tensor, mask: Tensor, target: Tensor | None, state: DiffusionState | None
                     ) -> Tensor:
        """Squared noise-prediction error inside the hole (zero outside) for the pair (T(image), ``target``)."""
        target = image if target is None else target
        if target.shape != image.shape:
            raise ConfigError(
                f"Diffusion.task_loss target of shape {tuple(target.shape)}: use an image of the batch's shape "
                f"{tuple(image.shape)} in [0, 1] (target_of or predict of other images)"
            )
        state = self._check_state(image, mask, state)
        x = self._input(image, mask, target, state)
        return (self._eps(x, state.t) - state.noise) ** 2 * mask

    @torch.no_grad()
    def restore(self, image: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample the hole with ``sampler`` in ``sample_steps`` steps; known pixels reset after each."""
        device = image.device
        noise = torch.randn(image.shape, generator=generator,
                            device=generator.device if generator is not None else device).to(device, image.dtype)
        known = (2 * image - 1) * (1 - mask)
        x = noise * mask + known
        self.sampler.set_timesteps(self.sample_steps, device=device)
        extra = {"eta": self.eta} if isinstance(self.sampler, DDIMScheduler) else {}
        for t in self.sampler.timesteps:
            eps = self._eps(torch.cat([x, known, mask.to(image.dtype)], dim=1), t.expand(image.shape[0]))
            x = self.sampler.step(eps, t, x, generator=generator, **extra).prev_sample * mask + known
        return image * (1 - mask) + ((x.clamp(-1, 1) + 1) / 2) * mask
