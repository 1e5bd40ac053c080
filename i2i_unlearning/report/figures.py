"""Figures: the image grid of a run (ground truth / input / before / after, for retain and forget), the
grids of a sweep's methods side by side, and the trade-off frontier."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from i2i_unlearning.atomic import write_atomic
from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.report.tables import lowest_seed_runs

_PAD = 2
_MIN_TILE_PX = 96


def _check_rows(rows: dict[str, Tensor], nrow_max: int) -> list[Tensor]:
    if not rows or nrow_max < 1:
        raise ConfigError(
            f"save_grid needs at least one row and nrow_max >= 1; got {len(rows)} rows, {nrow_max=}"
        )
    batches = []
    for label, batch in rows.items():
        if batch.dim() != 4 or batch.shape[0] == 0 or batch.shape[1] not in (1, 3):
            raise ConfigError(
                f"grid row {label!r} has shape {tuple(batch.shape)}; expected (B>0, 1 or 3, H, W)"
            )
        batches.append(batch[:nrow_max].detach().float().cpu().clamp(0, 1))
    sizes = {tuple(b.shape[-2:]) for b in batches}
    if len(sizes) > 1:
        raise ConfigError(
            f"grid rows have different image sizes {sorted(sizes)}; resize them to one size first"
        )
    return batches


def save_grid(path: Path, rows: dict[str, Tensor], nrow_max: int = 8) -> Path:
    """Write one PNG: each (label -> (B, C, H, W) in [0, 1]) entry is a row of up to `nrow_max` images.

    Images are upscaled (nearest) so 32 px tiles stay readable; labels are drawn left of each row
    and also written, in order, to a sidecar `.txt` beside the PNG.
    """
    path = Path(path)
    batches = _check_rows(rows, nrow_max)
    cols = max(b.shape[0] for b in batches)
    channels = max(b.shape[1] for b in batches)
    tiles = []
    for batch in batches:
        batch = batch.expand(-1, channels, -1, -1)
        blank = torch.ones(cols - batch.shape[0], *batch.shape[1:])
        tiles.append(torch.cat([batch, blank]))
    grid = make_grid(torch.cat(tiles), nrow=cols, padding=_PAD, pad_value=1.0)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    height = batches[0].shape[-2]
    scale = max(1, math.ceil(_MIN_TILE_PX / height))
    image = Image.fromarray(pixels, mode="RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)

    font = ImageFont.load_default(size=14)
    labels = list(rows)
    margin = max(int(font.getlength(label)) for label in labels) + 16
    canvas = Image.new("RGB", (image.width + margin, image.height), "white")
    canvas.paste(image, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_px = (height + _PAD) * scale
    for i, label in enumerate(labels):
        centre = _PAD * scale + i * row_px + height * scale // 2
        draw.text((8, centre), label, fill="black", font=font, anchor="lm")

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))
    write_atomic(path.with_suffix(".txt"), lambda tmp: tmp.write_text("\n".join(labels) + "\n"))
    return path


def save_side_by_side(path: Path, panels: list[tuple[str, Path]], ncols: int = 3) -> Path:
    """Write one PNG of the (caption, image file) panels, `ncols` per row, each captioned above."""
    if not panels or ncols < 1:
        raise ConfigError(f"save_side_by_side needs at least one panel and ncols >= 1; got {len(panels)}, {ncols=}")
    images = []
    for caption, file in panels:
        try:
            with Image.open(file) as im:
                images.append((caption, im.convert("RGB")))
        except OSError as exc:
            raise DataError(f"grids: cannot read {file}: {exc}; re-run that run's evaluation") from exc
    font = ImageFont.load_default(size=20)
    caption_px, gap = 34, 16
    cell_w = max(im.width for _, im in images) + gap
    cell_h = max(im.height for _, im in images) + caption_px + gap
    cols = min(ncols, len(images))
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (caption, im) in enumerate(images):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        draw.text((x + 8, y + caption_px // 2), caption, fill="black", font=font, anchor="lm")
        canvas.paste(im, (x, y + caption_px))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def write_grids(root: Path, out_dir: Path | None = None, ncols: int = 3) -> list[Path]:
    """grids_<family>_<dataset>.png per group: each method's grid.png (its lowest seed) side by side,
    captioned, in METHOD_ORDER; [] when no run has a grid.png."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    return [
        save_side_by_side(out_dir / f"grids_{label}.png", [(f"{m} (seed {s})", f) for m, s, f in picked], ncols)
        for label, (_, picked) in lowest_seed_runs(root, "grid.png").items()
    ]


def save_frontier(path: Path, panels: list[tuple[str, Any]], retain_budget: float) -> Path:
    """Write one PNG, a panel per (title, points frame of report.frontier): retain cost (retain_fid_x) across,
    forget change (forget_fid_x) up; each method's runs joined in alpha order per step count and labelled with
    their alpha, the original (1, 1) and retrain's runs marked, the retain budget a dashed line (unless it lies
    far right of every point)."""
    from matplotlib.figure import Figure

    if not panels:
        raise ConfigError("save_frontier needs at least one panel")
    fig = Figure(figsize=(5.5 * len(panels), 5.0))
    for ax, (title, points) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        trained = points[~points["method"].isin(["original", "retrain"])]
        several_steps = trained["steps"].map(str).nunique() > 1
        for (method, steps), line in trained.groupby(["method", "steps"], sort=False, dropna=False):
            line = line.sort_values(["alpha", "seed"], key=lambda c: c.map(lambda v: -math.inf if v is None else v))
            label = f"{method} (steps {steps})" if several_steps else str(method)
            ax.plot(line["retain_fid_x"], line["forget_fid_x"], marker="o", label=label)
            for x, y, alpha in line[["retain_fid_x", "forget_fid_x", "alpha"]].itertuples(index=False):
                ax.annotate("" if alpha is None else f"{alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        ax.scatter([1.0], [1.0], marker="*", s=200, color="black", label="original", zorder=3)
        retrain = points[points["method"].eq("retrain")]
        if not retrain.empty:
            ax.scatter(retrain["retain_fid_x"], retrain["forget_fid_x"], marker="*", s=200, color="tab:red",
                       label="retrain", zorder=3)
        if retain_budget <= 2 * ax.get_xlim()[1]:  # a budget far right of every point would squash them
            ax.axvline(retain_budget, color="grey", linestyle="--", linewidth=1,
                       label=f"retain budget {retain_budget:g}x")
        ax.set(title=title, xlabel="retain cost: retain FID / original's (lower is better)",
               ylabel="forget change: forget FID / original's (higher forgets more)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
