"""(4) evaluation throughput and peak memory at two evaluation-set sizes: ``runner.run_evaluation`` as a
run calls it (the Lightning test loop of restore, FID / IS / cosine / class accuracy, floors, and with
``metrics.audit`` the KL / MI and the membership audit, which restores as many training images again)."""

from __future__ import annotations

import time

from omegaconf import DictConfig, OmegaConf, open_dict

from .. import runner
from ..families.base import Family
from .common import PeakMemory, ratio


def measure(cfg: DictConfig, data_dir, model: Family, net, device) -> dict:
    """Images per second and peak memory of ``run_evaluation`` with ``metrics.eval_limit`` = each size."""
    sizes = [int(s) for s in cfg.bench.eval.sizes]
    dm = runner.datamodule(cfg, data_dir, {"retain": ["retain_train"]}, 1, 1, cfg.seed, model.mask_patch)
    counts = {s: dm.manifest["splits"][f"{s}_eval"]["count"] for s in ("retain", "forget")}
    model = model.cpu().eval()
    out = {"sizes": {}, "audit": bool(cfg.metrics.get("audit", False))}
    for n in sizes:
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(c):
            c.metrics.eval_limit = n
            c.metrics.eval_batch_size = min(sizes)  # the same batch at both sizes: a batch's activations set
            # the peak, so with the run's larger batch the small size's single short batch would understate it
            c.extra_tasks = []
        images = sum(min(n, k) for k in counts.values())
        with PeakMemory(device if device.type == "cuda" else model.device) as peak:
            t0 = time.perf_counter()
            runner.run_evaluation(c, dm, model, model, net)
            seconds = time.perf_counter() - t0
        out["sizes"][str(n)] = {"images": images, "seconds": seconds, "images_per_s": images / seconds,
                                "peak_mib": peak.mib}
        out["memory_method"] = peak.method
    small, large = (out["sizes"][str(s)] for s in (min(sizes), max(sizes)))
    out["x_rate_large_vs_small"] = ratio(large["images_per_s"], small["images_per_s"])
    out["x_memory_large_vs_small"] = ratio(large["peak_mib"], small["peak_mib"])
    return out
