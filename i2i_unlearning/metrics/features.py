"""Feature networks for FID / IS / cosine / class accuracy.

The paper scores with Inception (FID, IS) and OpenCLIP (cosine). Here the default
feature network is a small classifier trained once on the data set itself, so the
metrics work offline on 32 px grey or colour images. Any other feature network
(Inception, CLIP with local weights) plugs in by satisfying `FeatureModel`: the
scorer in `evaluate.py` only uses that protocol.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from i2i_unlearning.atomic import locked, torch_save, write_json
from i2i_unlearning.errors import ConfigError, DataError

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]

log = logging.getLogger("i2iu")


@runtime_checkable
class FeatureModel(Protocol):
    """What a feature network offers the scorer: its input format and, in one pass, embedding and logits.

    The scorer resizes images to ``image_size`` (bilinear) unless the model sets ``resizes_input = True``
    (the FID network, which resizes as clean-fid does): then it gets them at their own size."""

    embed_dim: int
    in_channels: int
    image_size: int

    def embed_with_logits(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FeatureNet(nn.Module):
    """Small CNN classifier for (B, C, S, S) images in [0, 1]; its penultimate layer is the embedding."""

    def __init__(
        self, channels: int = 1, num_classes: int = 10, image_size: int = 32, embed_dim: int = 128
    ) -> None:
        super().__init__()
        if channels < 1 or num_classes < 2 or image_size < 8 or embed_dim < 1:
            raise ConfigError(
                f"FeatureNet(channels={channels}, num_classes={num_classes}, image_size={image_size}, "
                f"embed_dim={embed_dim}): need channels >= 1, num_classes >= 2, image_size >= 8, embed_dim >= 1"
            )
        self.in_channels = channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.trunk = nn.Sequential(_block(channels, 32), _block(32, 64), _block(64, 128))
        # Flatten, not global pooling: where a part sits matters for clothing (measured 0.88 vs 0.53-0.71
        # test accuracy on Fashion-MNIST after 3 epochs).
        side = image_size // 8
        self.embedding = nn.Sequential(nn.Linear(128 * side * side, embed_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(embed_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> (B, embed_dim) penultimate features."""
        h = self.trunk(x * 2.0 - 1.0)
        return self.embedding(h.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> (B, num_classes) logits."""
        return self.head(self.embed(x))

    def embed_with_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Embedding and logits from a single pass (what the scorer needs per batch)."""
        e = self.embed(x)
        return e, self.head(e)


def _shift(x: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """Random translation by up to `max_shift` pixels (replicate padding), one offset per batch."""
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def _check_batch(x: Tensor, y: Tensor, channels: int, num_classes: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels or y.shape != (x.shape[0],):
        raise DataError(
            f"feature-net batch has images {tuple(x.shape)} and labels {tuple(y.shape)}; "
            f"expected (B, {channels}, H, W) float images and (B,) int64 labels"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"feature-net labels span [{int(y.min())}, {int(y.max())}] but num_classes={num_classes}; "
            "pass the data set's class count"
        )


@torch.no_grad()
def accuracy(net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Share of images whose argmax logit equals the label (net put in eval mode)."""
    net.eval()
    device = next(net.parameters()).device
    correct = total = 0
    for x, y in batches:
        pred = net(x.to(device)).argmax(dim=1).cpu()
        correct += int((pred == y).sum())
        total += int(y.numel())
    if total == 0:
        raise DataError("accuracy: the batches hold no images; check the test split")
    return correct / total


class FeatureNetTraining(L.LightningModule):
    """Trains a `FeatureNet` with Adam: cross-entropy on images shifted by up to 2 px, one seeded offset per
    batch. The shift generator's state goes into every checkpoint, so a resumed run draws the same shifts."""

    def __init__(self, net: FeatureNet, lr: float, seed: int) -> None:
        super().__init__()
        self.net, self.lr = net, float(lr)
        self.shift_generator = torch.Generator().manual_seed(seed)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _check_batch(x, y, self.net.in_channels, self.net.num_classes)
        loss = F.cross_entropy(self.net(_shift(x.float(), self.shift_generator).to(self.device)), y.to(self.device))
        self.log("feature_net/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["shift_generator"] = self.shift_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.shift_generator.set_state(checkpoint["shift_generator"])


class EpochBatches(L.LightningDataModule):
    """``epochs`` passes of ``train_batches()`` as one stream; resumed, it skips the steps already trained
    (the batches are the same: ``train_batches`` draws its order from a seeded generator of its own)."""

    def __init__(self, train_batches: Batches, epochs: int) -> None:
        super().__init__()
        self.train_batches, self.epochs, self.start = train_batches, int(epochs), 0

    def train_dataloader(self) -> Iterable[tuple[Tensor, Tensor]]:
        return _Skip(self)

    def state_dict(self) -> dict:
        return {"step": int(self.trainer.global_step)}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["step"])


class _Skip:
    def __init__(self, data: EpochBatches) -> None:
        self.data = data

    def __iter__(self):
        stream = (b for _ in range(self.data.epochs) for b in self.data.train_batches())
        for i, batch in enumerate(stream):
            if i >= self.data.start:
                yield batch


def train_feature_net(
    train_batches: Batches,
    test_batches: Batches,
    channels: int,
    num_classes: int,
    image_size: int,
    fit: Callable[[L.LightningModule, L.LightningDataModule], None],
    epochs: int = 3,
    lr: float = 2e-3,
    seed: int = 0,
) -> tuple[FeatureNet, float]:
    """Train a FeatureNet (`FeatureNetTraining`) with ``fit(module, data)`` (a Lightning fit, resumable where
    the caller makes it so); return it on CPU in eval mode + its test accuracy.

    Seeded (initialisation, augmentation) without touching the global RNG; the batch order is the caller's.
    """
    if epochs < 1 or lr <= 0:
        raise ConfigError(f"train_feature_net(epochs={epochs}, lr={lr}): need epochs >= 1 and lr > 0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = FeatureNetTraining(FeatureNet(channels, num_classes, image_size), lr, seed)
        data = EpochBatches(train_batches, epochs)
        fit(module, data)
        if module.trainer.global_step == 0:
            raise DataError("train_feature_net: train_batches() yielded no images; check the train split")
    net = module.net.cpu()
    test_acc = accuracy(net, test_batches())
    return net.eval(), test_acc


def load_or_train_feature_net(cache_dir: Path, key: str, **train_kwargs) -> tuple[FeatureNet, dict]:
    """Load `cache_dir/feature_net-{key}.pt` (+ its .json) or train one with `train_feature_net` and cache it.

    `key` must name the data set and anything else that changes the net (e.g. "fashion_mnist-c1-s32").
    """
    if not re.fullmatch(r"[A-Za-z0-9._=-]+", key):
        raise ConfigError(f"feature-net cache key {key!r}: use only letters, digits and . _ = -")
    weights = Path(cache_dir) / f"feature_net-{key}.pt"
    with locked(weights.with_suffix(".lock"), f"the feature net {weights.name}"):  # trained once, others wait
        return _cached_feature_net(weights, train_kwargs)


def _cached_feature_net(weights: Path, train_kwargs: dict) -> tuple[FeatureNet, dict]:
    meta_path = weights.with_suffix(".json")
    if weights.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            net = FeatureNet(meta["channels"], meta["num_classes"], meta["image_size"])
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DataError(
                f"cached feature net {weights} (or {meta_path.name}) is unreadable ({exc}); delete both to retrain"
            ) from exc
        for name in ("channels", "num_classes", "image_size"):
            if name in train_kwargs and train_kwargs[name] != meta[name]:
                raise ConfigError(
                    f"cached feature net {weights} has {name}={meta[name]} but {train_kwargs[name]} was asked; "
                    "use a cache key that names this setting, or delete the cached files"
                )
        return net.eval(), meta

    args = inspect.signature(train_feature_net).bind(**train_kwargs)
    args.apply_defaults()
    log.info("training the feature net %s: %s epochs", weights.name, args.arguments["epochs"])
    start = time.perf_counter()
    net, test_acc = train_feature_net(**args.arguments)
    meta = {
        "test_acc": test_acc,
        "epochs": args.arguments["epochs"],
        "channels": net.in_channels,
        "num_classes": net.num_classes,
        "image_size": net.image_size,
        "train_s": time.perf_counter() - start,
    }
    # The JSON is written last: a .pt without its .json is never taken for a finished cache.
    torch_save(weights, net.state_dict())
    write_json(meta_path, meta)
    return net, meta


def tensor_batches(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   seed: int, train_batch: int = 128, test_batch: int = 512):
    """(train_batches, test_batches) callables over in-memory tensors: shuffled (seeded) and in order."""
    gen = torch.Generator().manual_seed(seed)

    def train_batches():
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), train_batch):
            yield x_train[perm[i:i + train_batch]], y_train[perm[i:i + train_batch]]

    def test_batches():
        for i in range(0, len(x_test), test_batch):
            yield x_test[i:i + test_batch], y_test[i:i + test_batch]

    return train_batches, test_batches
