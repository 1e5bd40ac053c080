"""Restoration metrics of an image-to-image model: restore the eval images of each split and score them.

Every eval batch has a generator and RNG seed of its own (`batch_seed`), so the result does not depend on
the batches before it or on which rank makes it; under DDP the batches are shared out over the ranks
(distributed.py) and folded in one order, so a 2-rank evaluation equals 1 rank.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from functools import partial

import torch
from omegaconf import DictConfig

from .. import distributed
from ..data.datamodule import ForgetRetainDataModule
from ..data.degrade import fill
from ..families.base import Family
from .audit import membership_audit, sample_scores
from .evaluate import SplitScorer, class_acc


def batch_seed(*place) -> int:
    """A seed of one eval batch from its place (run seed, task, split, batch index): its outputs do not
    depend on which rank makes them or on the batches before it."""
    return zlib.crc32("/".join(map(str, place)).encode())


@contextmanager
def seeded(seed: int, device: torch.device):
    """Global RNG (CPU and ``device``) seeded for a block and restored after it (e.g. ``sample_state`` draws)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def member_scores(cfg: DictConfig, dm: ForgetRetainDataModule, model: Family, original: Family, split: str,
                  task: str, n: int, device: torch.device) -> torch.Tensor:
    """Membership scores (``audit.sample_scores``) of the first ``n`` images of a training split."""
    def scores(i: int, b: dict) -> torch.Tensor:
        seed = batch_seed(cfg.seed, "members", task, split, i)
        x, m = b["image"].to(device), b["mask"].to(device)
        with seeded(seed, device):
            return sample_scores(model, original, x, m, model.restore(x, m, generator=_generator(seed, device)))

    batches = dm.eval_batches(split, task, batch_size=cfg.metrics.eval_batch_size, limit=n)
    return torch.cat(list(distributed.ordered_map(scores, batches)))


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def evaluate(cfg: DictConfig, dm: ForgetRetainDataModule, model: Family, original: Family, net,
             device: torch.device | None = None, embed_net=None) -> tuple[dict, dict, dict, dict]:
    """Restore the eval images of each split and score outputs against their ground truth.

    Returns (metrics, floors, grid rows, embeddings): embeddings are the feature-network embeddings of
    the first ``metrics.tsne_points`` outputs and ground truths per split (the report's t-SNE). Floors:
    class accuracy of the degraded input with the hole filled grey / with noise, the level the table is
    read against. With ``metrics.audit``: KL / MI per split and task, and on the headline task the
    membership audit, <split>_train images (members of the original, as many as eval images) against
    <split>_eval. Under DDP (joined ranks) the batches are shared out over the ranks (distributed.py);
    every batch has a generator and RNG seed of its own, so the result does not depend on the rank count.
    """
    device = device or torch.device("cpu")
    model, original, net = model.to(device), original.to(device), net.to(device)
    if embed_net is not None:
        embed_net = embed_net.to(device)
    metrics, floors, grid, embeddings = {}, {}, {}, {}
    k = cfg.metrics.grid_images
    audit = bool(cfg.metrics.get("audit", False))

    def record(task: str, split: str, scorer: SplitScorer, i: int, b: dict) -> dict:
        """Everything evaluation needs of eval batch ``i``, as small CPU tensors (made on any rank)."""
        seed = batch_seed(cfg.seed, task, split, i)
        x, m = b["image"].to(device), b["mask"].to(device)
        with seeded(seed, device):  # fills with noise and `sample_state` draws from the global RNG
            out = model.restore(x, m, generator=_generator(seed, device))
            rec = {"features": scorer.features(out, x), "labels": b["label"]}
            if task != cfg.task:
                return rec
            if audit:
                rec["nonmembers"] = sample_scores(model, original, x, m, out)
            rec["grey"] = class_acc(net, fill(x, m, "grey"), b["label"]) * len(x)
            rec["noise"] = class_acc(net, fill(x, m, "noise"), b["label"]) * len(x)
            if i == 0:
                rec["grid"] = {
                    "ground truth": x[:k], "input": fill(x[:k], m[:k], "grey"),
                    "original": original.restore(x[:k], m[:k], generator=_generator(seed, device)),
                    cfg.method.name: out[:k],
                }
                rec["grid"] = {name: v.cpu() for name, v in rec["grid"].items()}
        return rec

    for task in [cfg.task, *cfg.extra_tasks]:
        headline = task == cfg.task
        prefix = "" if headline else f"{task}_"
        for split in ("retain", "forget"):
            scorer = SplitScorer(net, device=device, is_splits=cfg.metrics.is_splits, audit=audit,
                                 keep_embeddings=cfg.metrics.get("tsne_points", 0) if headline else 0,
                                 embed_net=embed_net)
            grey_hits = noise_hits = n = 0
            nonmembers = []
            batches = dm.eval_batches(f"{split}_eval", task, batch_size=cfg.metrics.eval_batch_size,
                                      limit=cfg.metrics.eval_limit)
            for rec in distributed.ordered_map(partial(record, task, split, scorer), batches):
                scorer.add(rec["features"], rec["labels"])
                if headline:
                    grey_hits, noise_hits = grey_hits + rec["grey"], noise_hits + rec["noise"]
                    n += len(rec["labels"])
                    nonmembers += [rec["nonmembers"]] if "nonmembers" in rec else []
                    grid.update({f"{split}: {name}": v for name, v in rec.get("grid", {}).items()})
            for name, value in scorer.compute().items():
                metrics[f"{prefix}{split}_{name}"] = float(value)
            embeddings.update({f"{split}_{name}": v.numpy() for name, v in scorer.embeddings().items()})
            if nonmembers:
                nonmembers = torch.cat(nonmembers)
                members = member_scores(cfg, dm, model, original, f"{split}_train", task, len(nonmembers), device)
                for name, value in membership_audit(members, nonmembers, seed=cfg.seed).items():
                    metrics[f"{split}_{name}"] = value
            if headline:
                floors[f"{split}_class_acc_grey"] = grey_hits / max(n, 1)
                floors[f"{split}_class_acc_noise"] = noise_hits / max(n, 1)
    return metrics, floors, grid, embeddings


def evaluate_on(device: torch.device, cfg: DictConfig, dm: ForgetRetainDataModule, model: Family,
                original: Family, net, embed_net=None) -> tuple[dict, dict, dict, dict]:
    """``evaluate`` on ``device`` (a rank's entry point for ``distributed.launch``); results on the CPU."""
    metrics, floors, grid, embeddings = evaluate(cfg, dm, model, original, net, device=device, embed_net=embed_net)
    return metrics, floors, {k: v.cpu() for k, v in grid.items()}, embeddings
