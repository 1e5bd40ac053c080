"""The I2I degradation T: masks (1 = missing pixel to generate, 0 = known), fills and noise images.

Masks are float tensors (B,1,H,W). Eval tasks are fixed masks (centre inpainting, outpainting);
training uses random patch masks with the same number of missing patches for every sample of a batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from i2i_unlearning.errors import ConfigError


def _square(size: int, side: int, inside: float) -> torch.Tensor:
    """(1,1,size,size) mask equal to `inside` on a centred square of `side` pixels, 1-inside elsewhere."""
    mask = torch.full((1, 1, size, size), 1.0 - inside)
    start = (size - side) // 2
    mask[..., start : start + side, start : start + side] = inside
    return mask


def _check_frac(name: str, frac: float) -> None:
    if not 0.0 < frac < 1.0:
        raise ConfigError(f"{name}={frac}: use a fraction of the image side strictly between 0 and 1")


def center_mask(size: int, hole_frac: float) -> torch.Tensor:
    """Inpainting mask (1,1,size,size): a centred square hole of side round(size*hole_frac)."""
    _check_frac("hole_frac", hole_frac)
    return _square(size, round(size * hole_frac), inside=1.0)


def outpaint_mask(size: int, keep_frac: float) -> torch.Tensor:
    """Outpainting mask (1,1,size,size): everything missing except a centred square of side round(size*keep_frac)."""
    _check_frac("keep_frac", keep_frac)
    return _square(size, round(size * keep_frac), inside=0.0)


EVAL_TASKS: dict[str, Callable[[int], torch.Tensor]] = {
    "center_half": lambda size: center_mask(size, 0.5),
    "center_quarter": lambda size: center_mask(size, 0.25),
    "outpaint_half": lambda size: outpaint_mask(size, 0.5),
}


BORDER_TASK = "outpaint_border_"  # outpaint_border_<r>: a missing border of r x the side on every edge


def task_mask_fn(task: str) -> Callable[[int], torch.Tensor]:
    """The mask builder of an eval task name: one of EVAL_TASKS, or ``outpaint_border_<r>`` with 0 < r < 0.5."""
    if task in EVAL_TASKS:
        return EVAL_TASKS[task]
    if task.startswith(BORDER_TASK):
        try:
            ratio = float(task[len(BORDER_TASK):])
        except ValueError:
            ratio = -1.0
        if 0.0 < ratio < 0.5:
            return lambda size: outpaint_mask(size, 1.0 - 2.0 * ratio)
    raise ConfigError(
        f"unknown eval task {task!r}; use one of {sorted(EVAL_TASKS)} or {BORDER_TASK}<r> with 0 < r < 0.5 "
        f"(e.g. {BORDER_TASK}0.125)"
    )


def eval_mask(task: str, size: int, patch: int = 1) -> torch.Tensor:
    """The fixed (1,1,size,size) mask of an eval task, checked to be aligned to `patch`-pixel patches."""
    build = task_mask_fn(task)
    if patch < 1 or size % patch:
        raise ConfigError(
            f"eval task {task!r}: image size {size} is not a multiple of the patch size {patch}"
        )
    mask = build(size)
    patches = mask.unfold(2, patch, patch).unfold(3, patch, patch)
    if not torch.all(patches.amax(dim=(-1, -2)) == patches.amin(dim=(-1, -2))):
        raise ConfigError(
            f"eval task {task!r}: its hole at image size {size} is not aligned to {patch}-pixel patches; "
            "choose an image size whose half and quarter are multiples of the patch (e.g. 32 with patch 4)"
        )
    return mask


def random_patch_mask(
    batch: int,
    size: int,
    patch: int,
    ratio_range: tuple[float, float] = (0.5, 0.9),
    generator: torch.Generator | None = None,
    shape_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random patch-aligned masks (batch,1,size,size) with the same number of missing patches per sample.

    One ratio is drawn uniformly in ratio_range for the whole batch (from ``shape_generator``,
    default ``generator``), then each sample masks round(ratio * num_patches) patches chosen at
    random (MAE needs equal visible counts per batch).
    """
    low, high = ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"mask ratio range {tuple(ratio_range)}: use 0 <= low <= high <= 1")
    if patch < 1 or size % patch:
        raise ConfigError(f"image size {size} is not a multiple of the patch size {patch}")
    side = size // patch
    num_patches = side * side
    ratio = low + (high - low) * torch.rand((), generator=shape_generator or generator).item()
    missing = round(ratio * num_patches)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    flat = torch.zeros(batch, num_patches)
    flat.scatter_(1, order[:, :missing], 1.0)
    grid = flat.view(batch, 1, side, side)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def random_block_mask(
    batch: int,
    size: int,
    patch: int,
    side_range: tuple[float, float] = (0.25, 0.75),
    keep: bool = False,
    generator: torch.Generator | None = None,
    shape_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Patch-aligned rectangular holes (batch,1,size,size): one height and width per batch (so
    every sample hides as many patches; drawn from ``shape_generator``, default ``generator``), a
    random position per sample. ``keep=True`` inverts it: only the block is known (outpainting-like)."""
    low, high = side_range
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"block side range {tuple(side_range)}: use 0 < low <= high <= 1")
    if patch < 1 or size % patch:
        raise ConfigError(f"image size {size} is not a multiple of the patch size {patch}")
    side = size // patch
    lo, hi = max(1, round(low * side)), max(1, round(high * side))
    h, w = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=shape_generator or generator))
    tops = torch.randint(0, side - h + 1, (batch,), generator=generator)
    lefts = torch.randint(0, side - w + 1, (batch,), generator=generator)
    grid = torch.zeros(batch, 1, side, side)
    for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist(), strict=True)):
        grid[i, :, top : top + h, left : left + w] = 1.0
    if keep:
        grid = 1.0 - grid
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


TRAIN_MASKS = ("patches", "block", "keep_block")


def train_mask(
    batch: int,
    size: int,
    patch: int,
    ratio_range: tuple[float, float],
    kinds: tuple[str, ...] = TRAIN_MASKS,
    generator: torch.Generator | None = None,
    shape_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The training degradation: per batch, one kind drawn from ``kinds`` -- scattered patches
    (``random_patch_mask``), a hole (``block``), or a known block only (``keep_block``).

    The kind and the hidden-patch count come from ``shape_generator`` (default ``generator``), the
    positions from ``generator``: streams that share a shape generator (the data module's forget and
    retain streams with ``shared_mask_shape``) get masks of one kind and count per step, so MAE embeds
    them in one batched call."""
    unknown = set(kinds) - set(TRAIN_MASKS)
    if not kinds or unknown:
        raise ConfigError(f"training mask kinds {list(kinds)}: choose from {list(TRAIN_MASKS)}")
    shape_generator = shape_generator or generator
    kind = kinds[int(torch.randint(len(kinds), (), generator=shape_generator))]
    if kind == "patches":
        return random_patch_mask(batch, size, patch, ratio_range, generator, shape_generator)
    return random_block_mask(batch, size, patch, keep=kind == "keep_block", generator=generator,
                             shape_generator=shape_generator)


def noise_image(
    images: torch.Tensor, kind: str = "normal", generator: torch.Generator | None = None
) -> torch.Tensor:
    """A noise image per input image, same shape, values in [0,1].

    "normal": each pixel ~ N(mean, std^2) with the scalar mean/std of the whole batch, clipped to [0,1];
    "uniform": U[0,1]; "constant": a flat image at the batch mean. A generator must live on images' device.
    """
    if kind == "normal":
        mean = images.mean()
        std = images.std() if images.numel() > 1 else images.new_zeros(())
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return (noise * std + mean).clamp(0.0, 1.0)
    if kind == "uniform":
        return torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    if kind == "constant":
        return images.mean().expand_as(images).clone()  # no host sync (a .item() would wait for the device)
    raise ConfigError(f"unknown noise kind {kind!r}; use one of ['constant', 'normal', 'uniform']")


def fill(
    image: torch.Tensor, mask: torch.Tensor, how: str = "grey", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The degraded input T(x): known pixels kept, missing ones (mask 1) set to grey 0.5, noise or zero."""
    if how == "grey":
        filler = torch.full_like(image, 0.5)
    elif how == "noise":
        filler = noise_image(image, "normal", generator)
    elif how == "zero":
        filler = torch.zeros_like(image)
    else:
        raise ConfigError(f"unknown fill {how!r}; use one of ['grey', 'noise', 'zero']")
    mask = mask.to(device=image.device, dtype=image.dtype)
    return image * (1.0 - mask) + filler * mask
