"""Restoration metrics of an image-to-image model: a Lightning test loop that restores the eval images of
each split and scores them.

`RestorationEvaluation` runs under the run's Trainer (``trainer.test``). Its plan (`eval_plan`) lists every
eval batch of every task and split, and the membership batches; each rank takes one contiguous run of it
(`EvalBatches`: no padding, no repeats), and every batch has a generator and RNG seed of its own
(`batch_seed`), so its outputs do not depend on which rank makes them. Scores are torchmetrics Metric states
that add up over the ranks when they are computed; per-image values (membership scores, the t-SNE
embeddings, the grid) fill their stream positions in `Slots`. A 2-rank evaluation equals 1 rank up to
float round-off.

What each split's scores are computed on depends on the manifest's ``forget_kind`` (`DATA_SPLITS`,
`AUDIT_STREAMS`):

* class unlearning (``class``): the "forget" scores restore ``forget_eval`` (held-out images of the forgotten
  classes), the "retain" scores ``retain_eval``. The membership audit of a split takes its ``<split>_train``
  images as members and its ``<split>_eval`` images as non-members.
* item unlearning (``item``): every class is retained and ``forget_eval`` is empty, so the "forget" scores
  restore the forget items themselves (``forget_train``: what the model must no longer reproduce); "retain"
  stays ``retain_eval``. The forget audit takes those forget items as members and the held-out images of the
  same classes (``retain_eval``, never trained on) as non-members; the retain audit is unchanged.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics import MeanMetric, Metric

from ..data.datamodule import ForgetRetainDataModule
from ..data.degrade import fill
from ..errors import ConfigError
from ..families.base import Family
from .audit import membership_audit, sample_scores
from .evaluate import Slots, SplitScorer, class_acc

SPLITS = ("retain", "forget")
GRID_ROWS = ("ground truth", "input", "original")  # then the method's outputs
# (kind, split) -> the prepared split its batches are read from, per forget kind (the manifest's ``forget_kind``)
DATA_SPLITS = {
    "class": {("eval", "retain"): "retain_eval", ("eval", "forget"): "forget_eval",
              ("members", "retain"): "retain_train", ("members", "forget"): "forget_train"},
    "item": {("eval", "retain"): "retain_eval", ("eval", "forget"): "forget_train",
             ("members", "retain"): "retain_train"},
}
# split -> ((kind, split) of its members, (kind, split) of its non-members) in the membership audit. Item mode:
# the forget eval stream already is the forget items, the non-members the held-out images of the same classes
AUDIT_STREAMS = {
    "class": {"retain": (("members", "retain"), ("eval", "retain")),
              "forget": (("members", "forget"), ("eval", "forget"))},
    "item": {"retain": (("members", "retain"), ("eval", "retain")),
             "forget": (("eval", "forget"), ("eval", "retain"))},
}


def forget_kind(dm: ForgetRetainDataModule) -> str:
    """``class`` or ``item``: what the prepared data forgets (its manifest's ``forget_kind``)."""
    kind = dm.manifest.get("forget_kind", "class")
    if kind not in DATA_SPLITS:
        raise ConfigError(f"data.forget_kind={kind!r} (manifest of {dm.data_dir}): use 'class' or 'item'")
    return kind


def data_split(kind: str, split: str, forgets: str = "class") -> str:
    """The prepared split a ``kind`` ("eval" / "members") stream of ``split`` reads when the data forgets
    ``forgets`` ("class" / "item") (`DATA_SPLITS`)."""
    try:
        return DATA_SPLITS[forgets][kind, split]
    except KeyError:
        raise ConfigError(f"no {kind} stream of the {split} split under data.forget_kind={forgets}") from None


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


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class EvalItem:
    """One batch of the evaluation: ``kind`` "eval" (a scored restore of ``<split>_eval`` under ``task``'s
    mask) or "members" (membership scores of ``<split>_train``), the ``index``-th batch of its stream."""

    kind: str
    task: str
    split: str
    index: int

    @property
    def stream(self) -> tuple[str, str, str]:
        """(kind, task, split): the stream of batches the item belongs to."""
        return self.kind, self.task, self.split

    def data_split(self, forgets: str = "class") -> str:
        """The prepared split the batch is read from when the data forgets ``forgets`` (`data_split`)."""
        return data_split(self.kind, self.split, forgets)


def stream_sizes(cfg: DictConfig, dm: ForgetRetainDataModule) -> dict[tuple[str, str, str], int]:
    """Images per stream: every task's eval splits (at most ``metrics.eval_limit``), and with
    ``metrics.audit`` the headline task's member streams (`AUDIT_STREAMS`), as many training images as
    the split has eval images. Each stream reads the split `data_split` names for the data's forget kind."""
    counts = {name: split["count"] for name, split in dm.manifest["splits"].items()}
    limit, forgets = cfg.metrics.eval_limit, forget_kind(dm)
    sizes = {}
    for task in [cfg.task, *cfg.extra_tasks]:
        for split in SPLITS:
            n = counts[data_split("eval", split, forgets)]
            sizes["eval", task, split] = n if limit is None else min(n, int(limit))
    if cfg.metrics.get("audit", False):
        for split in SPLITS:
            kind, _ = AUDIT_STREAMS[forgets][split][0]
            if kind == "members":
                sizes[kind, cfg.task, split] = min(sizes["eval", cfg.task, split],
                                                   counts[data_split(kind, split, forgets)])
    return sizes


def eval_plan(cfg: DictConfig, sizes: dict[tuple[str, str, str], int]) -> list[EvalItem]:
    """Every batch of the evaluation, streams in order (the same list on every rank)."""
    bs = cfg.metrics.eval_batch_size
    return [EvalItem(*stream, i) for stream, n in sizes.items() for i in range(math.ceil(n / bs))]


def rank_share(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one; none is padded)."""
    return range(n * rank // world, n * (rank + 1) // world)


class EvalBatches(IterableDataset):
    """The eval batches of ``items`` in plan order, each with its place: kind, task, split, index and the
    stream positions of its images. One pass over each stream a rank reads from."""

    def __init__(self, dm: ForgetRetainDataModule, items: list[EvalItem], batch_size: int,
                 sizes: dict[tuple[str, str, str], int]) -> None:
        self.dm, self.items, self.batch_size, self.sizes = dm, items, batch_size, sizes

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[dict]:
        wanted: dict[tuple[str, str, str], set[int]] = {}
        for item in self.items:
            wanted.setdefault(item.stream, set()).add(item.index)
        forgets = forget_kind(self.dm)
        for (kind, task, split), indices in wanted.items():
            batches = self.dm.eval_batches(data_split(kind, split, forgets), task, batch_size=self.batch_size,
                                           limit=self.sizes[kind, task, split])
            for i, batch in enumerate(batches):
                if i in indices:
                    start = i * self.batch_size
                    yield {**batch, "kind": kind, "task": task, "split": split, "index": i,
                           "positions": torch.arange(start, start + len(batch["label"]))}
                if i >= max(indices):
                    break


class RestorationEvaluation(L.LightningModule):
    """``trainer.test`` of an image-to-image model: restores every eval image and scores it (`SplitScorer`
    per task and split), with the floors (class accuracy of the grey / noise-filled input) and, with
    ``metrics.audit``, the membership audit on the headline task.

    The scores are logged, so ``trainer.test`` returns them on every rank and in the process that spawned
    the ranks (`logged_scores` reads them); rank 0 hands the grid rows and the t-SNE embeddings to
    ``artefacts(grid, embeddings)``.
    """

    def __init__(self, cfg: DictConfig, dm: ForgetRetainDataModule, model: Family, original: Family,
                 net: nn.Module, embed_net: nn.Module | None = None,
                 artefacts: Callable[[dict, dict], None] | None = None) -> None:
        super().__init__()
        self.cfg, self.dm, self.artefacts = cfg, dm, artefacts
        self.model, self.original, self.net = model, original, net
        self.forgets = forget_kind(dm)
        self.sizes = stream_sizes(cfg, dm)
        self.plan = eval_plan(cfg, self.sizes)
        self.audit = bool(cfg.metrics.get("audit", False))
        keep = int(cfg.metrics.get("tsne_points", 0))
        self.scorers = nn.ModuleDict({
            task: nn.ModuleDict({split: SplitScorer(net, is_splits=cfg.metrics.is_splits, audit=self.audit,
                                                    keep_embeddings=keep if task == cfg.task else 0,
                                                    embed_net=embed_net, sync=True) for split in SPLITS})
            for task in [cfg.task, *cfg.extra_tasks]})
        self.floors = nn.ModuleDict({f"{split}_{fill_kind}": MeanMetric(sync_on_compute=True).set_dtype(torch.float64)
                                     for split in SPLITS for fill_kind in ("grey", "noise")})
        k, shape = int(cfg.metrics.grid_images), (dm.channels, dm.image_size, dm.image_size)
        self.grid = nn.ModuleDict({split: Slots(k, (len(GRID_ROWS) + 1, *shape), sync_on_compute=True)
                                   for split in SPLITS})
        self.mia = nn.ModuleDict({
            f"{kind}_{split}": Slots(n, (2,), torch.float64, sync_on_compute=True)
            for (kind, task, split), n in self.sizes.items() if task == cfg.task} if self.audit else {})

    def on_test_start(self) -> None:
        """Fresh metric states in this process: spawned ranks receive the module's tensors in shared memory,
        so states updated in place would be one storage for all ranks."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    def test_dataloader(self) -> DataLoader:
        """This rank's contiguous share of the plan."""
        share = rank_share(len(self.plan), self.trainer.global_rank, self.trainer.world_size)
        items = [self.plan[i] for i in share]
        return DataLoader(EvalBatches(self.dm, items, self.cfg.metrics.eval_batch_size, self.sizes),
                          batch_size=None)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Restore one batch under its own seed and fold its scores into the metric states."""
        kind, task, split, i, where = batch["kind"], batch["task"], batch["split"], batch["index"], batch["positions"]
        x, m, labels = batch["image"], batch["mask"], batch["label"]
        device, cfg = x.device, self.cfg
        if kind == "members":
            seed = batch_seed(cfg.seed, "members", task, data_split(kind, split, self.forgets), i)
            with seeded(seed, device):
                out = self.model.restore(x, m, generator=_generator(seed, device))
                self.mia[f"members_{split}"].update(sample_scores(self.model, self.original, x, m, out), where)
            return
        seed = batch_seed(cfg.seed, task, split, i)
        scorer = self.scorers[task][split]
        with seeded(seed, device):  # fills with noise and `sample_state` draw from the global RNG
            out = self.model.restore(x, m, generator=_generator(seed, device))
            feats = scorer.features(out, x)
            if task == cfg.task:
                if self.audit:
                    self.mia[f"eval_{split}"].update(sample_scores(self.model, self.original, x, m, out), where)
                for fill_kind in ("grey", "noise"):
                    self.floors[f"{split}_{fill_kind}"].update(class_acc(self.net, fill(x, m, fill_kind), labels),
                                                               len(x))
                if i == 0:
                    k = min(len(self.grid[split].filled), len(x))
                    rows = [x[:k], fill(x[:k], m[:k], "grey"),
                            self.original.restore(x[:k], m[:k], generator=_generator(seed, device)), out[:k]]
                    self.grid[split].update(torch.stack(rows, dim=1), where[:k])
        scorer.update(feats, labels, where)

    def on_test_epoch_end(self) -> None:
        """Compute every score (each Metric adds up the ranks' states first), log them, hand out the grid."""
        cfg, metrics, floors, embeddings = self.cfg, {}, {}, {}
        for task, scorers in self.scorers.items():
            prefix = "" if task == cfg.task else f"{task}_"
            for split in SPLITS:
                for name, value in scorers[split].compute().items():
                    metrics[f"{prefix}{split}_{name}"] = float(value)
                if task != cfg.task:
                    continue
                embeddings.update({f"{split}_{name}": v.cpu().numpy()
                                   for name, v in scorers[split].embeddings().items()})
                if self.audit:
                    (mk, ms), (nk, ns) = AUDIT_STREAMS[self.forgets][split]
                    members, nonmembers = self.mia[f"{mk}_{ms}"].compute(), self.mia[f"{nk}_{ns}"].compute()
                    for name, value in membership_audit(members.cpu(), nonmembers.cpu(), seed=cfg.seed).items():
                        metrics[f"{split}_{name}"] = value
                for fill_kind in ("grey", "noise"):
                    floors[f"{split}_class_acc_{fill_kind}"] = float(self.floors[f"{split}_{fill_kind}"].compute())
        grid = {}
        for split in SPLITS:
            rows = self.grid[split].compute().cpu()
            for r, name in enumerate([*GRID_ROWS, cfg.method.name]):
                grid[f"{split}: {name}"] = rows[:, r]
        values = {**{f"metrics/{k}": v for k, v in metrics.items()}, **{f"floors/{k}": v for k, v in floors.items()}}
        self.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}, sync_dist=False)
        if self.trainer.is_global_zero and self.artefacts is not None:
            self.artefacts(grid, embeddings)


def logged_scores(results: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, floors) from what ``trainer.test`` returned for a `RestorationEvaluation`."""
    logged = results[0]
    return ({k.removeprefix("metrics/"): float(v) for k, v in logged.items() if k.startswith("metrics/")},
            {k.removeprefix("floors/"): float(v) for k, v in logged.items() if k.startswith("floors/")})
