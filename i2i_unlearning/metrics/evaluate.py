"""Per-split scores of restored images against their ground truth: FID, IS, embedding cosine, class accuracy.

FID and IS are torchmetrics' implementations with a feature model (default: the data set's own
`FeatureNet`) in place of Inception. Every metric reads the same single pass of the feature model
per batch (`BatchFeatures`), so scoring costs one forward per image tensor.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.metrics.audit import InfoNCE, PairedMoments
from i2i_unlearning.metrics.features import FeatureModel


def prepare_images(x: Tensor, channels: int, size: int) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images with 1 or 3 channels -> float [0, 1], `channels` x `size` x `size`."""
    if x.dim() != 4:
        raise ConfigError(f"images of shape {tuple(x.shape)}: expected (B, C, H, W)")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ConfigError(
                f"images with {x.shape[1]} channels cannot feed a {channels}-channel feature model"
            )
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class BatchFeatures(nn.Module):
    """Runs a feature model once per input batch and returns (embedding, logits); always in eval mode.

    The last batch's result is kept (keyed by tensor identity and version), so FID, IS and the scorer's
    cosine / accuracy, which all see the same tensor, share one forward pass.
    """

    def __init__(self, model: FeatureModel) -> None:
        super().__init__()
        if not isinstance(model, FeatureModel):
            raise ConfigError(
                f"{type(model).__name__} is not a feature model: it needs embed_dim, in_channels, image_size "
                "and embed_with_logits(x)"
            )
        self.model = model
        self._last: tuple[Tensor, int, tuple[Tensor, Tensor]] | None = None
        self.eval()

    def train(self, mode: bool = True) -> BatchFeatures:
        """Stay in eval mode whatever a parent asks (BatchNorm statistics must not move)."""
        return super().train(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) uint8 or [0, 1] float -> ((B, D) embedding, (B, K) logits)."""
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        result = self.model.embed_with_logits(
            prepare_images(x, self.model.in_channels, self.model.image_size)
        )
        self._last = (x, x._version, result)
        return result

    def forget_last(self) -> None:
        """Drop the kept batch (frees its memory)."""
        self._last = None


class FeatureExtractor(nn.Module):
    """A torchmetrics `feature=` module: the embedding (for FID) or the logits (for IS) of a feature model."""

    def __init__(self, features: BatchFeatures, logits: bool = False) -> None:
        super().__init__()
        self.features = features
        self.logits = logits
        # torchmetrics' FID reads `num_features` instead of probing the module with a 299 px dummy image.
        self.num_features = features.model.embed_dim

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, D) embedding or (B, K) logits."""
        return self.features(x)[1 if self.logits else 0]


def _as_batch_features(model: FeatureModel | BatchFeatures) -> BatchFeatures:
    return model if isinstance(model, BatchFeatures) else BatchFeatures(model)


def fid_metric(model: FeatureModel | BatchFeatures) -> FrechetInceptionDistance:
    """torchmetrics FID on the model's embedding; `update(images in [0, 1], real=...)`; local (no DDP sync)."""
    return FrechetInceptionDistance(
        feature=FeatureExtractor(_as_batch_features(model)), normalize=True, sync_on_compute=False
    )


def inception_score_metric(model: FeatureModel | BatchFeatures, splits: int = 10) -> InceptionScore:
    """torchmetrics IS on the model's logits; `update(images in [0, 1])`; local (no DDP sync)."""
    if splits < 1:
        raise ConfigError(f"inception score splits={splits}: need >= 1")
    with warnings.catch_warnings():
        # It keeps every image's logits: K floats per image, small for a data-set classifier.
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        # normalize=False: with True it casts to uint8 even for a custom feature module.
        return InceptionScore(
            feature=FeatureExtractor(_as_batch_features(model), logits=True),
            splits=splits,
            normalize=False,
            sync_on_compute=False,
        )


def inception_score_mean(metric: InceptionScore, splits: int) -> float:
    """Mean IS over `splits` (clamped to the image count), with a fixed split shuffle so it is reproducible."""
    n = sum(int(f.shape[0]) for f in metric.features)
    metric.splits = max(1, min(splits, n))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, _ = metric.compute()
    return float(mean)


class SplitScorer:
    """Streaming scores of one split (retain or forget): restored outputs against their ground truth.

    `compute()` gives fid (ground truth = real, outputs = fake), is (of the outputs), cos (mean paired
    cosine of embeddings), class_acc (outputs classified as their true label) and n. With `audit=True`
    also kl (KL of the Gaussian fits of output vs ground-truth embeddings), mi (Gaussian mutual information
    of each output's embedding and its ground truth's), both in the ground truth's top principal
    directions, and mi_nce (InfoNCE lower bound on the whole embedding), see `audit.py`.
    Memory stays flat in the number of images apart from IS's K logits per image. Runs in one process
    (no DDP sync).
    """

    def __init__(self, net: FeatureModel, device: str | torch.device = "cpu", is_splits: int = 10,
                 audit: bool = False, keep_embeddings: int = 0) -> None:
        self.device = torch.device(device)
        self.features = BatchFeatures(net).to(self.device)
        self.is_splits = is_splits
        self._fid = fid_metric(self.features).to(self.device)
        self._is = inception_score_metric(self.features, splits=is_splits).to(self.device)
        self._cos_sum = 0.0
        self._correct = 0
        self._n = 0
        self._moments, self._nce = (PairedMoments(), InfoNCE()) if audit else (None, None)
        self._keep = keep_embeddings  # the first images' embeddings, for the report's t-SNE figure
        self._kept: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def update(self, outputs: Tensor, ground_truth: Tensor, labels: Tensor) -> None:
        """Add a batch: outputs and ground truth (B, C, H, W) in [0, 1], labels (B,) int64."""
        if outputs.shape != ground_truth.shape or outputs.dim() != 4 or labels.shape != (outputs.shape[0],):
            raise ConfigError(
                f"SplitScorer.update got outputs {tuple(outputs.shape)}, ground truth {tuple(ground_truth.shape)}, "
                f"labels {tuple(labels.shape)}: need two equal (B, C, H, W) batches and (B,) labels"
            )
        outputs, ground_truth = outputs.to(self.device), ground_truth.to(self.device)
        emb_gt, _ = self.features(ground_truth)
        self._fid.update(ground_truth, real=True)
        emb_out, logits = self.features(outputs)
        self._fid.update(outputs, real=False)
        self._is.update(outputs)
        self.features.forget_last()
        self._cos_sum += float(F.cosine_similarity(emb_out, emb_gt, dim=1).double().sum())
        self._correct += int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
        self._n += int(labels.numel())
        if self._moments is not None:
            self._moments.update(emb_out, emb_gt)
            self._nce.update(emb_out, emb_gt)
        room = self._keep - sum(len(o) for o, _ in self._kept)
        if room > 0:
            self._kept.append((emb_out[:room].float().cpu(), emb_gt[:room].float().cpu()))

    def embeddings(self) -> dict[str, Tensor]:
        """{"output", "truth"}: (N, D) feature embeddings of the first ``keep_embeddings`` outputs and truths."""
        if not self._kept:
            return {}
        return {"output": torch.cat([o for o, _ in self._kept]), "truth": torch.cat([t for _, t in self._kept])}

    def compute(self) -> dict[str, float | int]:
        """{"fid", "is", "cos", "class_acc", "n"} (+ "kl", "mi", "mi_nce" when auditing) over everything seen."""
        if self._n < 2:
            raise DataError(
                f"SplitScorer saw {self._n} image(s); FID needs at least 2 per split: enlarge the eval split"
            )
        with torch.no_grad():
            # FID is a squared distance; tiny negatives are eigenvalue round-off.
            fid = max(float(self._fid.compute()), 0.0)
            inception = inception_score_mean(self._is, self.is_splits)
        scores = {
            "fid": fid,
            "is": inception,
            "cos": self._cos_sum / self._n,
            "class_acc": self._correct / self._n,
            "n": self._n,
        }
        if self._moments is not None:
            scores.update(kl=self._moments.kl(), mi=self._moments.mi(), mi_nce=self._nce.compute())
        return scores


@torch.no_grad()
def class_acc(net: FeatureModel, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Share of `images` the feature model classifies as `labels` (e.g. the grey / noise-filled input floors)."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ConfigError(
            f"class_acc got {images.shape[0]} images and {labels.shape[0]} labels: need the same non-zero count"
        )
    features = BatchFeatures(net)
    device = next(features.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        _, logits = features(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size].cpu()).sum())
    return correct / images.shape[0]
