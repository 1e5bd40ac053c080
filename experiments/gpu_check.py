"""`make gpu-check`: what only a GPU can measure, in a few minutes of one.

1. Each paper preset (imagenet_mae, imagenet_vqgan, places_diffusion) at paper size with its unlearning recipe:
   a few `ours` steps (construction and batch composition of the preset) in the trainer's precision (bf16-mixed)
   on random images of the preset's shape, randomly initialised weights (the timing does not depend on them):
   seconds per step after a warm-up, and peak GPU memory.
2. The tiny demo sweep on CUDA (`make demo`'s sweep at `model.size=tiny`, few steps), to show every method runs
   there end to end.

Writes outputs/gpu_check/report.md (the table for docs/performance.md) and prints it. Without a CUDA device it
says so and exits 0. ``--device cpu --size tiny`` runs part 1 on the CPU at tiny size (the test does).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from i2i_unlearning.data.degrade import eval_mask
from i2i_unlearning.runner import build_family, unlearn_settings
from i2i_unlearning.training import make_trainer
from i2i_unlearning.unlearning.module import UnlearnModule

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PRESETS = {"mae": "imagenet_mae", "vqgan": "imagenet_vqgan", "diffusion": "places_diffusion"}
RECIPES = {"mae": "recipe_mage", "vqgan": "recipe_mage", "diffusion": "recipe_palette"}  # of each preset


class StepTimer(L.Callback):
    """Wall seconds of each training step, the device synchronised at both ends."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, *args) -> None:
        self._sync(module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self._sync(module)
        self.seconds.append(time.perf_counter() - self._t0)


def preset_config(family: str, size: str, overrides: list[str]):
    """The family's paper preset; at ``tiny`` size its recipe on the tiny model and synthetic data."""
    chosen = ([f"experiment={PRESETS[family]}"] if size == "paper" else
              [f"experiment={RECIPES[family]}", f"model={family}", "model.size=tiny", "data=synthetic",
               "method.batch_size=2", "method.forget_batch_size=2"])
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[*chosen, "logger=none", *overrides])


def random_batch(rows: int, cfg, patch: int, generator: torch.Generator) -> dict:
    """Random images of the preset's shape under its headline task's mask."""
    size, channels = int(cfg.data.image_size), int(cfg.model.channels)
    mask = eval_mask(cfg.task, size, patch)
    return {"image": torch.rand(rows, channels, size, size, generator=generator),
            "mask": mask.expand(rows, -1, -1, -1).clone()}


def step_cost(family: str, size: str, steps: int, overrides: list[str]) -> dict:
    """Seconds per `ours` step (median after one warm-up step) and peak memory of one paper preset."""
    cfg = preset_config(family, size, overrides)
    torch.manual_seed(0)
    model = build_family(cfg.model)
    method = instantiate(cfg.method)
    module = UnlearnModule(model, method)
    g = torch.Generator().manual_seed(0)
    batch = {"retain": random_batch(method.batch_size, cfg, model.mask_patch, g),
             "forget": random_batch(method.forget_batch_size, cfg, model.mask_patch, g)}
    timer = StepTimer()
    settings = unlearn_settings(method)
    trainer = make_trainer(cfg, steps, extra_callbacks=[timer, *settings.pop("extra_callbacks", [])], **settings)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    timed = sorted(timer.seconds[1:] or timer.seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    preset = PRESETS[family] if size == "paper" else f"{RECIPES[family]} (tiny model)"
    return {"family": family, "preset": preset, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "rows": method.batch_size + method.forget_batch_size, "precision": str(cfg.trainer.precision),
            "s_per_step": timed[len(timed) // 2], "peak_GiB": peak, "steps": len(timer.seconds)}


def table(rows: list[dict]) -> str:
    lines = ["| family | preset | parameters | rows / step | precision | s / step | peak memory |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['preset']} | {r['params_M']:.2f} M | {r['rows']} | {r['precision']} | "
                     f"{r['s_per_step']:.3f} | {r['peak_GiB']:.1f} GiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["paper", "tiny"], default="paper")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--families", default=",".join(PRESETS))
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tiny demo sweep on CUDA")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here, nothing to measure (run it on a GPU machine)")
        return 0
    overrides = ["trainer=gpu"] if args.device == "cuda" else ["trainer=cpu"]
    rows = []
    for family in args.families.split(","):
        rows.append(step_cost(family, args.size, args.steps, overrides))
        print(table(rows[-1:]), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report = [f"# gpu-check on {device}", "", f"`ours` steps at {args.size} size, random weights and images:", "",
              table(rows)]
    if args.device == "cuda" and not args.no_sweep:
        t0 = time.perf_counter()
        sweep = ["trainer=gpu", "model.size=tiny", "method.steps=5"]
        rc = subprocess.call([sys.executable, "experiments/demo.py", *sweep])
        report += ["", f"Tiny demo sweep on CUDA (outputs/demo): exit code {rc}, {time.perf_counter() - t0:.0f} s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
