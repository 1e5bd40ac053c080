"""Lightning data module: named training streams over prepared shards, with random masks drawn on the fly.

Each stream resamples whole shards forever and cuts a fixed number of
batches per epoch, so DDP ranks never wait on one another over uneven shards. The shard sequence of an
epoch is shared and split across ranks and workers; sample shuffling and masks are seeded per
(seed, stream, epoch, rank, worker). The epoch counter lives in the main process and is part of
`state_dict` with the mid-epoch position, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from webdataset.utils import pytorch_worker_info

from i2i_unlearning.data.degrade import TRAIN_MASKS, eval_mask, train_mask
from i2i_unlearning.data.prepare import load_manifest
from i2i_unlearning.data.shards import decode_png, verify_shards
from i2i_unlearning.errors import ConfigError


def _stream_seed(seed: int, name: str) -> int:
    """A stable integer seed for (seed, stream name), independent of Python's hash randomisation."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class _Epoch:
    """The current epoch of a stream, set in the main process before each pass (workers get a copy)."""

    def __init__(self):
        self.value = 0


class _ResampledShards(torch.utils.data.IterableDataset):
    """Endless shard urls drawn uniformly with replacement, seeded per epoch.

    Uniform over shards (not weighted by size) because each draw reads the whole shard: every image
    then comes up equally often, whatever the size of the shard it sits in.
    """

    def __init__(self, urls: list[str], seed: int, epoch: _Epoch):
        super().__init__()
        self.urls, self.seed, self.epoch = urls, seed, epoch

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(_derived_seed(self.seed, self.epoch.value))
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


class _Decode:
    """Raw tar samples -> {"image": float (C,H,W) in [0,1], "label": int, "key": str} (picklable for workers)."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, samples):
        for sample in samples:
            image = decode_png(sample["png"], self.channels)
            yield {
                "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
                "label": int(sample["cls"]),
                "key": sample["__key__"],
            }


def _local_seed(seed: int, epoch: _Epoch) -> int:
    """Seed for this (stream, epoch, rank, worker), read where the data loader runs."""
    rank, _, worker, _ = pytorch_worker_info()
    return _derived_seed(seed, epoch.value, rank, worker)


class _Shuffle:
    """Buffer shuffle of raw (still encoded) samples, seeded per (stream, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: _Epoch):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, samples):
        if self.bufsize < 2:
            yield from samples
            return
        rng = random.Random(_local_seed(self.seed, self.epoch))
        buffer = []
        for sample in samples:
            if len(buffer) < self.bufsize:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def _collate(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
    }


class _MaskedBatches:
    """Group samples into batches and add a random patch mask per batch from seeded generators: the
    positions from the stream's own seed, the kind and hidden-patch count from ``shape_seed`` when
    given, which every stream of a data module then shares (step k of each stream hides as many
    patches), else from the stream's seed too."""

    def __init__(self, batch_size: int, size: int, patch: int, ratio: tuple[float, float],
                 kinds: tuple[str, ...], seed: int, shape_seed: int | None, epoch: _Epoch,
                 fixed: torch.Tensor | None = None):
        self.batch_size, self.size, self.patch, self.ratio, self.kinds = batch_size, size, patch, ratio, kinds
        self.seed, self.shape_seed, self.epoch, self.fixed = seed, shape_seed, epoch, fixed

    def __call__(self, samples):
        generator = torch.Generator().manual_seed(_local_seed(self.seed, self.epoch))
        shape_generator = (None if self.shape_seed is None else
                           torch.Generator().manual_seed(_local_seed(self.shape_seed, self.epoch)))
        samples = iter(samples)
        while batch := list(islice(samples, self.batch_size)):
            if len(batch) < self.batch_size:
                return
            out = _collate(batch)
            if self.fixed is not None:  # a fixed degradation: every item always gets the same mask
                out["mask"] = self.fixed.expand(self.batch_size, -1, -1, -1).clone()
            else:
                out["mask"] = train_mask(self.batch_size, self.size, self.patch, self.ratio, self.kinds, generator,
                                         shape_generator)
            yield out


class _StreamLoader:
    """One stream's loader: `epoch_batches` batches per pass, the epoch taken lazily on the first batch.

    Lazy, so that Lightning's probing `iter()` calls neither start workers nor use up an epoch.
    """

    def __init__(
        self, loader: wds.WebLoader, epoch: _Epoch, counters: dict[str, int], skips: dict[str, int], name: str,
        length: int,
    ):
        self.loader, self.epoch, self.counters, self.name, self.length = loader, epoch, counters, name, length
        self.skips = skips

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        self.epoch.value = self.counters[self.name]
        self.counters[self.name] += 1
        skip = self.skips.pop(self.name, 0)  # a run resumed mid-epoch continues where it stopped
        yield from islice(iter(self.loader), skip, self.length)


class ForgetRetainDataModule(L.LightningDataModule):
    """Training streams (e.g. forget / retain) over a prepared data dir, plus fixed-order eval batches.

    Training masks are random per batch (``mask_kinds``), or, with ``fixed_task`` (an eval task name,
    ``data.train_task``), that task's fixed mask for every item: a fixed degradation, under which the
    teacher cache (``perf.teacher_cache``) hits. With ``shared_mask_shape`` (``data.shared_mask_shape``)
    step k of every stream has one mask kind and hidden-patch count (positions still per stream), so
    MAE runs a retain and a forget batch as one batch; the masks drawn then differ from the default's.

    `streams` maps a stream name to the splits it concatenates; `train_dataloader` always returns a
    CombinedLoader ("min_size"), so a training step gets `batch[stream]` = {"image", "label", "mask", "key"}.
    Shards are verified against the manifest at construction (fail fast, before any training).
    """

    def __init__(
        self,
        data_dir: str | Path,
        streams: dict[str, list[str]],
        batch_size: int | dict[str, int] = 64,
        epoch_batches: int = 100,
        num_workers: int = 0,
        patch: int = 4,
        mask_ratio: tuple[float, float] = (0.5, 0.9),
        mask_kinds: tuple[str, ...] = TRAIN_MASKS,
        seed: int = 0,
        shuffle_buffer: int = 2000,
        fixed_task: str | None = None,
        shared_mask_shape: bool = False,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self._manifest = load_manifest(self.data_dir)
        self.streams = {str(name): [str(s) for s in splits] for name, splits in dict(streams).items()}
        sizes = batch_size if isinstance(batch_size, Mapping) else dict.fromkeys(self.streams, batch_size)
        self.batch_sizes = {name: int(sizes.get(name, 0)) for name in self.streams}  # rows per step, per stream
        self.epoch_batches = epoch_batches
        self.num_workers = num_workers
        self.patch = patch
        self.mask_ratio = tuple(mask_ratio)
        self.mask_kinds = tuple(mask_kinds)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.fixed_task = fixed_task
        self.shared_mask_shape = bool(shared_mask_shape)
        self._check_settings()
        self._check_streams()
        needed = sorted({split for splits in self.streams.values() for split in splits})
        verify_shards(self.data_dir, self._manifest, needed)
        self._verified = set(needed)
        self._epochs = {name: 0 for name in self.streams}
        self._skips: dict[str, int] = {}

    def _check_settings(self) -> None:
        for name, size in self.batch_sizes.items():
            if size < 1:
                raise ConfigError(f"batch size {size} for stream {name!r}: use a positive integer per stream")
        if self.epoch_batches < 1:
            raise ConfigError(f"epoch_batches={self.epoch_batches}: use a positive integer")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: use 0 (main process) or more")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}: use a non-negative integer seed")
        if self.patch < 1 or self.image_size % self.patch:
            raise ConfigError(
                f"patch={self.patch} does not divide the prepared image size {self.image_size}; "
                "choose a patch size that divides it (e.g. 4 for 32)"
            )
        if self.fixed_task is not None:
            eval_mask(self.fixed_task, self.image_size, self.patch)  # an unknown or misaligned task fails here
        low, high = self.mask_ratio
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(
                f"mask_ratio={list(self.mask_ratio)}: use [low, high] with 0 <= low <= high <= 1"
            )

    def _check_streams(self) -> None:
        valid = list(self._manifest["splits"])
        if not self.streams:
            raise ConfigError(f"streams is empty; name at least one stream, e.g. {{'train': {valid[:1]}}}")
        for name, splits in self.streams.items():
            if not splits:
                raise ConfigError(f"stream {name!r} lists no splits; use some of {valid}")
            for split in splits:
                if split not in valid:
                    raise ConfigError(f"stream {name!r}: unknown split {split!r}; valid splits: {valid}")
            if sum(self._manifest["splits"][s]["count"] for s in splits) == 0:
                counts = {s: self._manifest["splits"][s]["count"] for s in splits}
                raise ConfigError(
                    f"stream {name!r} has no samples (split counts {counts} in {self.data_dir}); "
                    "use splits with data, e.g. name proxy classes or use retain_train"
                )

    @property
    def manifest(self) -> dict:
        """The data dir's manifest.json."""
        return self._manifest

    @property
    def image_size(self) -> int:
        """Side of the (square) prepared images in pixels."""
        return int(self._manifest["image_size"])

    @property
    def channels(self) -> int:
        """Image channels: 1 (grey) or 3 (RGB)."""
        return int(self._manifest["channels"])

    @property
    def class_names(self) -> list[str]:
        """All class names of the source; labels index this list."""
        return list(self._manifest["class_names"])

    @property
    def num_classes(self) -> int:
        """Number of classes of the source (forget, retain and proxy together)."""
        return len(self._manifest["class_names"])

    def _shard_urls(self, splits: list[str]) -> list[str]:
        return [
            str(self.data_dir / s["name"])
            for split in splits
            for s in self._manifest["splits"][split]["shards"]
        ]

    def _stream_loader(self, name: str) -> _StreamLoader:
        urls = self._shard_urls(self.streams[name])
        seed, epoch = _stream_seed(self.seed, name), _Epoch()
        per_worker = math.ceil(self.epoch_batches / max(1, self.num_workers))
        pipeline = wds.DataPipeline(
            _ResampledShards(urls, seed, epoch),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            _Shuffle(self.shuffle_buffer, seed, epoch),
            _Decode(self.channels),
            _MaskedBatches(
                self.batch_sizes[name], self.image_size, self.patch, self.mask_ratio, self.mask_kinds, seed,
                _stream_seed(self.seed, "mask shape") if self.shared_mask_shape else None, epoch,
                None if self.fixed_task is None else eval_mask(self.fixed_task, self.image_size, self.patch),
            ),
        ).with_epoch(per_worker)
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers)
        return _StreamLoader(loader, epoch, self._epochs, self._skips, name, self.epoch_batches)

    def train_dataloader(self) -> CombinedLoader:
        """All streams side by side, `epoch_batches` batches per epoch: batch[name] per stream."""
        return CombinedLoader({name: self._stream_loader(name) for name in self.streams}, mode="min_size")

    def eval_batches(
        self, split: str, task: str, batch_size: int = 256, limit: int | None = None
    ) -> Iterator[dict]:
        """Batches of one split in manifest order with the fixed mask of eval `task`; at most `limit` images."""
        valid = list(self._manifest["splits"])
        if split not in valid:
            raise ConfigError(f"unknown split {split!r}; valid splits: {valid}")
        if batch_size < 1 or (limit is not None and limit < 0):
            raise ConfigError(
                f"eval_batches(batch_size={batch_size}, limit={limit}): use batch_size >= 1, limit >= 0"
            )
        mask = eval_mask(task, self.image_size, self.patch)
        if split not in self._verified:
            verify_shards(self.data_dir, self._manifest, [split])
            self._verified.add(split)
        return self._eval_iter(split, mask, batch_size, limit)

    def _eval_iter(
        self, split: str, mask: torch.Tensor, batch_size: int, limit: int | None
    ) -> Iterator[dict]:
        urls = self._shard_urls([split])
        if not urls:
            return
        samples = wds.DataPipeline(
            wds.SimpleShardList(urls), wds.tarfile_to_samples(), _Decode(self.channels)
        )
        samples = islice(iter(samples), limit)
        while batch := list(islice(samples, batch_size)):
            out = _collate(batch)
            out["mask"] = mask.expand(len(batch), -1, -1, -1).clone()
            yield out

    def state_dict(self) -> dict:
        """The next epoch index of each stream, and where a checkpoint taken mid-epoch stopped.

        Saved in checkpoints so a resumed run sees the same batches as an uninterrupted one. The position
        comes from the trainer's step count (every step takes one batch of every stream), not from the
        loaders, which Lightning reads one batch ahead.
        """
        state: dict = {"epochs": dict(self._epochs)}
        trainer = getattr(self, "trainer", None)
        done = int(trainer.global_step) if trainer is not None and trainer.training else 0
        if done % self.epoch_batches:
            state["mid_epoch"] = {"epoch": done // self.epoch_batches, "batches": done % self.epoch_batches}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the streams' epoch counters (and mid-epoch position) from a checkpoint."""
        self._epochs.update({k: int(v) for k, v in state_dict.get("epochs", {}).items() if k in self._epochs})
        if mid := state_dict.get("mid_epoch"):
            for name in self._epochs:
                self._epochs[name] = int(mid["epoch"])
                self._skips[name] = int(mid["batches"])
