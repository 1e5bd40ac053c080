"""(3) images per second that the shard loader delivers (tar read, PNG decode, shuffle, masks, with
``data.num_workers`` workers) against images per second the unlearning step of ``ours`` consumes."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from .. import runner
from .common import ratio


def measure(cfg: DictConfig, data_dir, patch: int, batch_size: int, step_images_per_s: float | None) -> dict:
    """Batches of the retain and forget streams, as the unlearning stage reads them; the first batch
    (worker start, first shard reads) is timed apart from the steady rate."""
    n = int(cfg.bench.loader.batches)
    dm = runner.datamodule(cfg, data_dir, {"retain": ["retain_train"], "forget": ["forget_train"]}, batch_size,
                             n + 1, cfg.seed, patch)
    t0 = time.perf_counter()
    it = iter(dm.train_dataloader())
    next(it)
    first_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    count = 0
    for batch, _, _ in it:
        count += sum(part["image"].shape[0] for part in batch.values())
    steady_s = time.perf_counter() - t1
    rate = count / steady_s if steady_s > 0 else None
    return {"workers": int(cfg.data.num_workers), "batches": n, "images": count, "seconds": steady_s,
            "first_batch_s": first_s, "images_per_s": rate, "step_images_per_s": step_images_per_s,
            "x_step": ratio(rate, step_images_per_s)}
