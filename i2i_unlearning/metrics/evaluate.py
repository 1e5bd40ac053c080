"""Per-split scores of restored images against their ground truth: FID, IS, embedding cosine, class accuracy.

FID is torchmetrics' implementation fed with a feature model's embeddings (default: the data set's own
`FeatureNet` in place of Inception); IS is computed from running sums (`InceptionScoreStream`) so memory
stays flat. Every metric reads the same single pass of the feature model per image tensor (`BatchFeatures`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

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


class InceptionScoreStream:
    """Inception Score from running sums: memory flat in the number of images.

    Image i (in the order seen) belongs to split ``i % splits``; per split it keeps the sum of p(y|x) and of
    sum_y p log p, which give that split's mean KL(p(y|x) || p(y)) exactly. IS = mean over non-empty splits of
    exp(mean KL). Independent of how the images are batched.
    """

    def __init__(self, splits: int = 10) -> None:
        if splits < 1:
            raise ConfigError(f"inception score splits={splits}: need >= 1")
        self.splits = splits
        self._p_sum: Tensor | None = None  # (splits, K) float64
        self._plogp_sum = torch.zeros(splits, dtype=torch.float64)
        self._count = torch.zeros(splits, dtype=torch.float64)
        self._seen = 0

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Add (B, K) class logits of B images."""
        p = logits.detach().double().cpu().softmax(dim=1)
        if self._p_sum is None:
            self._p_sum = torch.zeros(self.splits, p.shape[1], dtype=torch.float64)
        split = torch.arange(self._seen, self._seen + len(p)) % self.splits
        self._p_sum.index_add_(0, split, p)
        self._plogp_sum.index_add_(0, split, torch.special.xlogy(p, p).sum(dim=1))
        self._count.index_add_(0, split, torch.ones(len(p), dtype=torch.float64))
        self._seen += len(p)

    def compute(self) -> float:
        """Mean IS over the non-empty splits."""
        if self._p_sum is None:
            raise DataError("InceptionScoreStream saw no images; enlarge the eval split")
        used = self._count > 0
        marginal = self._p_sum[used] / self._count[used, None]
        kl = self._plogp_sum[used] / self._count[used] - torch.special.xlogy(marginal, marginal).sum(dim=1)
        return float(kl.exp().mean())


class _Given(nn.Module):
    """A torchmetrics `feature=` module for features computed beforehand: returns its input."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class SplitScorer:
    """Streaming scores of one split (retain or forget): restored outputs against their ground truth.

    `compute()` gives fid (ground truth = real, outputs = fake; torchmetrics), is (of the outputs), cos (mean
    paired cosine of embeddings), class_acc (outputs classified as their true label) and n. With `audit=True`
    also kl (KL of the Gaussian fits of output vs ground-truth embeddings), mi (Gaussian mutual information
    of each output's embedding and its ground truth's), both in the ground truth's top principal
    directions, and mi_nce (InfoNCE lower bound on the whole embedding), see `audit.py`.

    FID / IS / class accuracy read `net` (embedding and logits); cosine, the audit and the kept embeddings read
    `embed_net` (e.g. CLIP), `net` by default. Scoring is split in two so that it can be spread over DDP ranks:
    `features(outputs, ground_truth)` runs the networks on a batch (on any rank), `add(features, labels)`
    folds them into running sums (in one fixed order, so the result does not depend on the number of ranks);
    `update` does both. Memory stays flat in the number of images.
    """

    def __init__(self, net: FeatureModel, device: str | torch.device = "cpu", is_splits: int = 10,
                 audit: bool = False, keep_embeddings: int = 0, embed_net: FeatureModel | None = None) -> None:
        self.device = torch.device(device)
        self.net = BatchFeatures(net).to(self.device)
        self.embed_net = None if embed_net is None else BatchFeatures(embed_net).to(self.device)
        self._fid = FrechetInceptionDistance(feature=_Given(net.embed_dim), sync_on_compute=False)
        self._is = InceptionScoreStream(is_splits)
        self._cos_sum = 0.0
        self._correct = 0
        self._n = 0
        self._moments, self._nce = (PairedMoments(), InfoNCE()) if audit else (None, None)
        self._keep = keep_embeddings  # the first images' embeddings, for the report's t-SNE figure
        self._kept: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def features(self, outputs: Tensor, ground_truth: Tensor) -> dict[str, Tensor]:
        """The feature-network outputs a batch is scored by (CPU tensors): one pass per net and image tensor."""
        if outputs.shape != ground_truth.shape or outputs.dim() != 4:
            raise ConfigError(
                f"SplitScorer got outputs {tuple(outputs.shape)} and ground truth {tuple(ground_truth.shape)}: "
                "need two equal (B, C, H, W) batches"
            )
        outputs, ground_truth = outputs.to(self.device), ground_truth.to(self.device)
        truth, _ = self.net(ground_truth)
        out, logits = self.net(outputs)
        feats = {"truth": truth, "out": out, "logits": logits}
        if self.embed_net is not None:
            feats["truth_embed"], _ = self.embed_net(ground_truth)
            feats["out_embed"], _ = self.embed_net(outputs)
        return {k: v.float().cpu() for k, v in feats.items()}

    @torch.no_grad()
    def add(self, feats: dict[str, Tensor], labels: Tensor) -> None:
        """Fold a batch's `features(...)` and its (B,) int64 labels into the running scores."""
        if labels.shape != (feats["out"].shape[0],):
            raise ConfigError(f"SplitScorer got labels {tuple(labels.shape)} for {feats['out'].shape[0]} images")
        self._fid.update(feats["truth"], real=True)
        self._fid.update(feats["out"], real=False)
        self._is.update(feats["logits"])
        self._correct += int((feats["logits"].argmax(dim=1) == labels.cpu()).sum())
        self._n += int(labels.numel())
        emb_out, emb_gt = feats.get("out_embed", feats["out"]), feats.get("truth_embed", feats["truth"])
        self._cos_sum += float(F.cosine_similarity(emb_out, emb_gt, dim=1).double().sum())
        if self._moments is not None:
            self._moments.update(emb_out, emb_gt)
            self._nce.update(emb_out, emb_gt)
        room = self._keep - sum(len(o) for o, _ in self._kept)
        if room > 0:
            self._kept.append((emb_out[:room].clone(), emb_gt[:room].clone()))

    def update(self, outputs: Tensor, ground_truth: Tensor, labels: Tensor) -> None:
        """Add a batch: outputs and ground truth (B, C, H, W) in [0, 1], labels (B,) int64."""
        if labels.shape != (outputs.shape[0],):
            raise ConfigError(
                f"SplitScorer.update got outputs {tuple(outputs.shape)}, ground truth {tuple(ground_truth.shape)}, "
                f"labels {tuple(labels.shape)}: need two equal (B, C, H, W) batches and (B,) labels"
            )
        self.add(self.features(outputs, ground_truth), labels)

    def state_nbytes(self) -> int:
        """Bytes held by the running sums: flat in the number of images (the kept embeddings and InfoNCE's
        partial chunk, both bounded, aside)."""
        tensors = [*self._fid.metric_state.values(), self._is._p_sum, self._is._plogp_sum, self._is._count]
        if self._moments is not None and self._moments.n:
            tensors += [*self._moments._shift, *self._moments._sum, *self._moments._outer.values()]
            tensors.append(self._nce._bound)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))

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
        scores = {
            "fid": fid,
            "is": self._is.compute(),
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
