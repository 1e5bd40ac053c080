"""Per-split scores of restored images against their ground truth: FID, IS, embedding cosine, class accuracy.

FID is torchmetrics' implementation fed with a feature model's embeddings (default: the data set's own
`FeatureNet` in place of Inception); IS is computed from running sums (`InceptionScoreStream`) so memory
stays flat. Every metric reads the same single pass of the feature model per image tensor (`BatchFeatures`).
The scorers are torchmetrics Metrics: their states add up over DDP ranks when they are computed, and
per-image values kept in order (`Slots`) fill their stream positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.metrics.audit import InfoNCE, PairedMoments
from i2i_unlearning.metrics.features import FeatureModel


def prepare_images(x: Tensor, channels: int, size: int | None) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images with 1 or 3 channels -> float [0, 1], `channels` x `size` x `size`
    (bilinear; `size` None: kept at their size)."""
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
    if size is not None and tuple(x.shape[-2:]) != (size, size):
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
        size = None if getattr(self.model, "resizes_input", False) else self.model.image_size
        result = self.model.embed_with_logits(prepare_images(x, self.model.in_channels, size))
        self._last = (x, x._version, result)
        return result

    @torch.no_grad()
    def num_classes(self) -> int:
        """The width of the model's logits (one probe pass on a blank image)."""
        m = self.model
        device = next(self.parameters(), torch.zeros(0)).device
        blank = torch.zeros(1, m.in_channels, m.image_size, m.image_size, device=device)
        return int(m.embed_with_logits(blank)[1].shape[1])


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


class InceptionScoreStream(Metric):
    """Inception Score from running sums (a torchmetrics Metric): memory flat in the number of images.

    Image i of the stream belongs to split ``i % splits``; per split it keeps the sum of p(y|x) and of
    sum_y p log p, which give that split's mean KL(p(y|x) || p(y)) exactly. IS = mean over non-empty splits of
    exp(mean KL). Independent of how the images are batched, and of how they are spread over DDP ranks when
    `update` is given each image's stream position.
    """

    full_state_update = False

    def __init__(self, num_classes: int, splits: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        if splits < 1:
            raise ConfigError(f"inception score splits={splits}: need >= 1")
        self.splits = splits
        self.add_state("p_sum", torch.zeros(splits, num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("plogp_sum", torch.zeros(splits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(splits, dtype=torch.float64), dist_reduce_fx="sum")
        self._next = 0  # the position of the next image when `update` is given none

    @torch.no_grad()
    def update(self, logits: Tensor, index: Tensor | None = None) -> None:
        """Add (B, K) class logits of B images at stream positions `index` (by default: after the last ones)."""
        if logits.dim() != 2 or logits.shape[1] != self.p_sum.shape[1]:
            raise ConfigError(f"InceptionScoreStream got logits {tuple(logits.shape)}: need (B, {self.p_sum.shape[1]})")
        p = logits.detach().to(self.p_sum).softmax(dim=1)
        if index is None:
            index = torch.arange(self._next, self._next + len(p))
        self._next = int(index.max()) + 1 if len(index) else self._next
        split = index.to(self.p_sum.device) % self.splits
        self.p_sum.index_add_(0, split, p)
        self.plogp_sum.index_add_(0, split, torch.special.xlogy(p, p).sum(dim=1))
        self.count.index_add_(0, split, torch.ones(len(p), dtype=torch.float64, device=p.device))

    def compute(self) -> float:
        """Mean IS over the non-empty splits."""
        used = self.count > 0
        if not bool(used.any()):
            raise DataError("InceptionScoreStream saw no images; enlarge the eval split")
        marginal = self.p_sum[used] / self.count[used, None]
        kl = self.plogp_sum[used] / self.count[used] - torch.special.xlogy(marginal, marginal).sum(dim=1)
        return float(kl.exp().mean())


class Slots(Metric):
    """The values at stream positions [0, size), (size, *shape): the first images' embeddings, per-image
    scores, a grid's images. Whichever rank sees a position fills it; the others hold zeros there, so the
    ranks' states add up to the whole (ordered gathering by a sum)."""

    full_state_update = False

    def __init__(self, size: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("values", torch.zeros(size, *shape, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("filled", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, values: Tensor, index: Tensor) -> None:
        """Keep ``values[j]`` (B, *shape) at position ``index[j]``; positions past the size are dropped."""
        keep = index < len(self.filled)
        at = index[keep].to(self.filled.device)
        self.values[at] = values[keep.to(values.device)].detach().to(self.values)
        self.filled[at] += 1

    def compute(self) -> Tensor:
        """The values of the positions seen: a prefix of the stream, each position filled once."""
        k = int((self.filled > 0).sum())
        if not (bool((self.filled[:k] == 1).all()) and k == int(self.filled.sum())):
            raise DataError("Slots: positions filled twice or with gaps; the eval batches overlap between ranks")
        return self.values[:k]


class _Given(nn.Module):
    """A torchmetrics `feature=` module for features computed beforehand: returns its input."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class SplitScorer(Metric):
    """Streaming scores of one split (retain or forget), restored outputs against their ground truth: a
    torchmetrics Metric whose states (and its children's) add up over DDP ranks.

    `compute()` gives fid (ground truth = real, outputs = fake; torchmetrics), is (of the outputs), cos (mean
    paired cosine of embeddings), class_acc (outputs classified as their true label) and n. With `audit=True`
    also kl (KL of the Gaussian fits of output vs ground-truth embeddings), mi (Gaussian mutual information
    of each output's embedding and its ground truth's), both in the ground truth's top principal
    directions, and mi_nce (InfoNCE lower bound on the whole embedding), see `audit.py`.

    FID / IS / class accuracy read `net` (embedding and logits); cosine, the audit and the kept embeddings read
    `embed_net` (e.g. CLIP), `net` by default. `features(outputs, ground_truth)` runs the networks on a batch,
    `update(features, labels, index)` folds them into running sums at the images' stream positions (so the
    IS splits, InfoNCE chunks and kept embeddings do not depend on the ranks); `score` does both. Memory
    stays flat in the number of images. With ``sync=True`` `compute` first adds up the states of all DDP
    ranks (every rank must call it); by default it scores what this process saw.
    """

    full_state_update = False

    def __init__(self, net: FeatureModel, device: str | torch.device = "cpu", is_splits: int = 10,
                 audit: bool = False, keep_embeddings: int = 0, embed_net: FeatureModel | None = None,
                 sync: bool = False) -> None:
        super().__init__(sync_on_compute=sync)
        self.net = BatchFeatures(net)
        self.embed_net = None if embed_net is None else BatchFeatures(embed_net)
        width = (embed_net or net).embed_dim
        self.fid = FrechetInceptionDistance(feature=_Given(net.embed_dim), sync_on_compute=sync)
        self.fid.orig_dtype = torch.float32  # set by its first update, which a rank with no image of this split lacks
        self.inception = InceptionScoreStream(self.net.num_classes(), is_splits, sync_on_compute=sync)
        self.moments = PairedMoments(width, sync_on_compute=sync) if audit else None
        self.nce = InfoNCE(width, sync_on_compute=sync) if audit else None
        # the first images' embeddings (output, truth), for the report's t-SNE figure
        self.kept = Slots(keep_embeddings, (2, width), sync_on_compute=sync) if keep_embeddings else None
        self.add_state("cos_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self._next = 0  # the position of the next image when `update` is given none
        self.to(device)

    @torch.no_grad()
    def features(self, outputs: Tensor, ground_truth: Tensor) -> dict[str, Tensor]:
        """The feature-network outputs a batch is scored by (float32): one pass per net and image tensor."""
        if outputs.shape != ground_truth.shape or outputs.dim() != 4:
            raise ConfigError(
                f"SplitScorer got outputs {tuple(outputs.shape)} and ground truth {tuple(ground_truth.shape)}: "
                "need two equal (B, C, H, W) batches"
            )
        device = self.n.device
        outputs, ground_truth = outputs.to(device), ground_truth.to(device)
        truth, _ = self.net(ground_truth)
        out, logits = self.net(outputs)
        feats = {"truth": truth, "out": out, "logits": logits}
        if self.embed_net is not None:
            feats["truth_embed"], _ = self.embed_net(ground_truth)
            feats["out_embed"], _ = self.embed_net(outputs)
        return {k: v.float() for k, v in feats.items()}

    @torch.no_grad()
    def update(self, feats: dict[str, Tensor], labels: Tensor, index: Tensor | None = None) -> None:
        """Fold a batch's `features(...)`, its (B,) int64 labels and its images' stream positions (B,)
        (by default the positions after the last batch's) into the running scores."""
        if labels.shape != (feats["out"].shape[0],):
            raise ConfigError(f"SplitScorer got labels {tuple(labels.shape)} for {feats['out'].shape[0]} images")
        if index is None:
            index = torch.arange(self._next, self._next + len(labels))
        self._next = int(index[-1]) + 1
        self.fid.update(feats["truth"], real=True)
        self.fid.update(feats["out"], real=False)
        self.inception.update(feats["logits"], index)
        self.correct += (feats["logits"].argmax(dim=1) == labels.to(self.correct.device)).sum()
        self.n += labels.numel()
        emb_out, emb_gt = feats.get("out_embed", feats["out"]), feats.get("truth_embed", feats["truth"])
        self.cos_sum += F.cosine_similarity(emb_out, emb_gt, dim=1).double().sum()
        if self.moments is not None:
            self.moments.update(emb_out, emb_gt)
            self.nce.update(emb_out, emb_gt, index)
        if self.kept is not None:
            self.kept.update(torch.stack([emb_out, emb_gt], dim=1), index)

    def score(self, outputs: Tensor, ground_truth: Tensor, labels: Tensor) -> None:
        """Add a batch: outputs and ground truth (B, C, H, W) in [0, 1], labels (B,) int64."""
        if labels.shape != (outputs.shape[0],):
            raise ConfigError(
                f"SplitScorer.score got outputs {tuple(outputs.shape)}, ground truth {tuple(ground_truth.shape)}, "
                f"labels {tuple(labels.shape)}: need two equal (B, C, H, W) batches and (B,) labels"
            )
        self.update(self.features(outputs, ground_truth), labels)

    def state_nbytes(self) -> int:
        """Bytes held by the metric states: flat in the number of images (the kept embeddings and InfoNCE's
        partial chunks are bounded)."""
        return sum(getattr(m, name).numel() * getattr(m, name).element_size()
                   for m in self.modules() if isinstance(m, Metric) for name in m._defaults)

    def embeddings(self) -> dict[str, Tensor]:
        """{"output", "truth"}: (N, D) embeddings of the first ``keep_embeddings`` outputs and truths."""
        if self.kept is None:
            return {}
        kept = self.kept.compute()
        return {"output": kept[:, 0], "truth": kept[:, 1]} if len(kept) else {}

    def compute(self) -> dict[str, float | int]:
        """{"fid", "is", "cos", "class_acc", "n"} (+ "kl", "mi", "mi_nce" when auditing) over everything seen."""
        n = int(self.n)
        if n < 2:
            raise DataError(f"SplitScorer saw {n} image(s); FID needs at least 2 per split: enlarge the eval split")
        # FID is a squared distance; tiny negatives are eigenvalue round-off.
        scores = {
            "fid": max(float(self.fid.compute()), 0.0),
            "is": self.inception.compute(),
            "cos": float(self.cos_sum) / n,
            "class_acc": int(self.correct) / n,
            "n": n,
        }
        if self.moments is not None:
            scores.update(self.moments.compute(), mi_nce=self.nce.compute())
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
