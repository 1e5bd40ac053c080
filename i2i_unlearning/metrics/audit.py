"""Audits that show forgetting: membership inference, Gaussian KL and mutual information.

Pure functions and streaming accumulators, no model or data code:

* Membership inference (MIA). Per-sample scores of members (training images the original saw) and
  non-members (held-out images of the same classes): the restore error inside the hole and the
  distance of the model's encoder embedding from the original encoder's (`sample_scores`).
  `threshold_auc` is the ROC AUC of thresholding one score in a fixed direction (0.5 = no signal,
  below 0.5 = the opposite tendency, never folded); `attack_auc` is the cross-validated ROC AUC of a
  logistic regression on the log scores, the attacker learning the direction on the training folds.
* `gaussian_kl`: KL(P || Q) between two Gaussians, closed form, float64, from means and covariances.
* `gaussian_mi`: I(X; Y) of a jointly Gaussian pair from its canonical correlations,
  I = -1/2 sum_i log(1 - rho_i^2).
* `PairedMoments`: streaming means, covariances and cross-covariance of paired features (memory
  flat in the number of samples), from which `kl` and `mi` are read, by default in the `PCA_DIMS`
  top principal directions of y (the ground truth): a Gaussian fit of d dimensions from n samples is
  biased by about d^2 / 2n nats (MI) and is rank-deficient when n < d, so 128 feature dimensions
  from a few hundred images would measure mostly the estimator.
* `InfoNCE`: the InfoNCE lower bound on I(X; Y) over fixed-size chunks of pairs.

`PairedMoments` and `InfoNCE` are torchmetrics Metrics whose states merge over DDP ranks.

Every covariance gets a ridge of `RIDGE` times its mean variance (the KL: the mean over both sets),
so rank-deficient feature sets (dead ReLU units, fewer samples than dimensions) stay finite.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from torchmetrics import Metric

from i2i_unlearning.errors import ConfigError, DataError

RIDGE = 1e-3  # ridge added to covariances, relative to their mean variance
PCA_DIMS = 32  # KL and Gaussian MI are read in the top principal directions of the ground-truth features
NCE_BATCH = 128  # pairs per InfoNCE chunk: the bound is at most log(NCE_BATCH) = 4.85 nats
NCE_TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)  # the cosine critics cos(u, v) / t, best one reported
# Per-sample membership scores (columns of `sample_scores`) and the side of the threshold that says
# "member": a memorised image is restored better (low error); a forget image the unlearning trained on
# is pushed further from the original's embedding than an unseen one (high distance).
SCORES = ("err", "emb")
MEMBER_IF = {"err": "low", "emb": "high"}


# ---- membership inference --------------------------------------------------------------------
def _flat(embedding: Tensor | list[Tensor]) -> Tensor:
    parts = embedding if isinstance(embedding, (list, tuple)) else [embedding]
    return torch.cat([p.flatten(1).double() for p in parts], dim=1)


@torch.no_grad()
def sample_scores(model, original, image: Tensor, mask: Tensor, output: Tensor) -> Tensor:
    """(B, 2) float64 per-sample scores: [restore error, embedding distance to the original].

    Restore error: mean squared error of `output` against `image` over the missing pixels (mask 1).
    Embedding distance: mean squared difference of `model.embed(image, mask)` and
    `original.embed(image, mask)` under the same random state, a list of embeddings flattened and concatenated.
    """
    if output.shape != image.shape or mask.shape != (image.shape[0], 1, *image.shape[2:]):
        raise ConfigError(
            f"sample_scores got image {tuple(image.shape)}, mask {tuple(mask.shape)}, output "
            f"{tuple(output.shape)}: need equal (B, C, H, W) image and output and a (B, 1, H, W) mask"
        )
    hole = mask.double().expand_as(image)
    err = ((output.double() - image.double()) ** 2 * hole).flatten(1).sum(1) / hole.flatten(1).sum(1).clamp_min(1)
    state = model.sample_state(image, mask)  # one draw for both (a diffusion model's timestep and noise)
    ours, theirs = _flat(model.embed(image, mask, state=state)), _flat(original.embed(image, mask, state=state))
    emb = (ours - theirs).pow(2).mean(1)
    return torch.stack([err, emb], dim=1).cpu()


def _labelled(members, nonmembers) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    if len(a) < 1 or len(b) < 1:
        raise DataError(f"membership audit got {len(a)} member and {len(b)} non-member scores: needs both")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("membership audit: the scores hold NaN or inf; check the model's outputs")
    return np.concatenate([a, b]), np.concatenate([np.ones(len(a)), np.zeros(len(b))])


def threshold_auc(members, nonmembers, member_if: str) -> float:
    """ROC AUC of the attack "member when the score is low" (`member_if="low"`) or "high" ("high").

    Members and non-members from one distribution give 0.5 up to sampling error; values below 0.5 mean
    the score leans the other way and are reported as they are.
    """
    if member_if not in ("low", "high"):
        raise ConfigError(f"member_if={member_if!r}: use 'low' or 'high'")
    scores, labels = _labelled(members, nonmembers)
    return float(roc_auc_score(labels, -scores if member_if == "low" else scores))


def attack_auc(members, nonmembers, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic-regression membership attack on per-sample score vectors.

    (n, k) member and (m, k) non-member scores; the attack (standardised features, L2 logistic
    regression) is fitted on the training folds of a seeded stratified K-fold and scored on the held-out
    fold; the result is the mean held-out AUC. `folds` is lowered to the smaller class count (>= 2).
    """
    x, y = _labelled(members, nonmembers)
    x = x.reshape(len(x), -1)
    k = min(folds, int(y.sum()), int(len(y) - y.sum()))
    if k < 2:
        raise DataError(
            f"membership attack needs >= 2 members and >= 2 non-members for cross-validation; got "
            f"{int(y.sum())} and {int(len(y) - y.sum())}: enlarge the eval split"
        )
    aucs = []
    for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        attack = make_pipeline(StandardScaler(), LogisticRegression()).fit(x[train], y[train])
        aucs.append(roc_auc_score(y[test], attack.decision_function(x[test])))
    return float(np.mean(aucs))


def membership_audit(members: Tensor, nonmembers: Tensor, seed: int = 0) -> dict[str, float]:
    """MIA AUCs from (n, 2) member and (m, 2) non-member `sample_scores`.

    `mia_auc`: the logistic-regression attack on the log scores (`attack_auc`); `mia_auc_err`,
    `mia_auc_emb`: threshold attacks on one score each, in the `MEMBER_IF` direction.
    """
    members, nonmembers = torch.as_tensor(members).double(), torch.as_tensor(nonmembers).double()
    out = {"mia_auc": attack_auc(members.clamp_min(1e-12).log(), nonmembers.clamp_min(1e-12).log(), seed=seed)}
    for i, name in enumerate(SCORES):
        out[f"mia_auc_{name}"] = threshold_auc(members[:, i], nonmembers[:, i], MEMBER_IF[name])
    return out


# ---- Gaussian KL and mutual information ------------------------------------------------------
def _ridge(*covs: Tensor) -> float:
    return RIDGE * float(torch.stack([c.diagonal().mean() for c in covs]).mean()) + 1e-12


def _logdet(a: Tensor) -> Tensor:
    return 2 * torch.linalg.cholesky(a).diagonal().log().sum()


def gaussian_kl(mean_p: Tensor, cov_p: Tensor, mean_q: Tensor, cov_q: Tensor, ridge: float = 0.0) -> float:
    """KL(N(mean_p, cov_p) || N(mean_q, cov_q)) in nats, float64, `ridge` added to both diagonals."""
    mean_p, mean_q, cov_p, cov_q = (t.double() for t in (mean_p, mean_q, cov_p, cov_q))
    d = mean_p.numel()
    eye = torch.eye(d, dtype=torch.float64)
    cov_p, cov_q = cov_p + ridge * eye, cov_q + ridge * eye
    chol_q = torch.linalg.cholesky(cov_q)
    diff = (mean_q - mean_p).reshape(d, 1)
    trace = torch.cholesky_solve(cov_p, chol_q).diagonal().sum()
    maha = (diff * torch.cholesky_solve(diff, chol_q)).sum()
    kl = 0.5 * (trace + maha - d + _logdet(cov_q) - _logdet(cov_p))
    return max(float(kl), 0.0)  # KL >= 0; a tiny negative is round-off


def _inv_sqrt(a: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(a)
    return vecs @ torch.diag(vals.clamp_min(1e-300).rsqrt()) @ vecs.T


def canonical_correlations(cov_x: Tensor, cov_y: Tensor, cov_xy: Tensor, ridge_x: float = 0.0,
                           ridge_y: float = 0.0) -> Tensor:
    """Canonical correlations (descending) of a pair with covariances `cov_x`, `cov_y`, cross `cov_xy`:
    the singular values of cov_x^-1/2 cov_xy cov_y^-1/2, each covariance with its ridge."""
    cov_x, cov_y, cov_xy = cov_x.double(), cov_y.double(), cov_xy.double()
    wx = _inv_sqrt(cov_x + ridge_x * torch.eye(len(cov_x), dtype=torch.float64))
    wy = _inv_sqrt(cov_y + ridge_y * torch.eye(len(cov_y), dtype=torch.float64))
    return torch.linalg.svdvals(wx @ cov_xy @ wy)


def gaussian_mi(cov_x: Tensor, cov_y: Tensor, cov_xy: Tensor, ridge_x: float = 0.0, ridge_y: float = 0.0) -> float:
    """I(X; Y) in nats of a jointly Gaussian pair: -1/2 sum log(1 - rho_i^2) over canonical correlations."""
    rho = canonical_correlations(cov_x, cov_y, cov_xy, ridge_x, ridge_y).clamp(max=1 - 1e-12)
    return float(-0.5 * torch.log1p(-rho**2).sum())


def _stacked(*states: Tensor) -> list[Tensor]:
    """States with a leading rank dimension: as they are after a DDP sync (``dist_reduce_fx=None`` stacks
    the ranks' states), with one added on a single process."""
    return list(states) if states[0].dim() > 0 else [s.unsqueeze(0) for s in states]


class PairedMoments(Metric):
    """Streaming first and second moments of paired features (x_i, y_i), float64: a torchmetrics Metric.

    Memory is O(d^2) whatever the number of pairs. Each rank takes its sums around its first batch's
    means (shifted data, so the covariances do not suffer cancellation); after a DDP sync the ranks' sums
    are moved onto one shift and added (the pairwise form of the streaming update), so the moments do not
    depend on how the pairs were spread over ranks.
    """

    full_state_update = False

    def __init__(self, dim_x: int, dim_y: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        dim_y = dim_x if dim_y is None else dim_y
        f64 = torch.float64
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx=None)
        for name, shape in (("shift_x", (dim_x,)), ("shift_y", (dim_y,)), ("sum_x", (dim_x,)), ("sum_y", (dim_y,)),
                            ("xx", (dim_x, dim_x)), ("yy", (dim_y, dim_y)), ("xy", (dim_x, dim_y))):
            self.add_state(name, torch.zeros(shape, dtype=f64), dist_reduce_fx=None)

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Add (B, d) features `x` and their (B, e) partners `y`."""
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ConfigError(f"PairedMoments.update got {tuple(x.shape)} and {tuple(y.shape)}: need (B, d), (B, e)")
        if (x.shape[1], y.shape[1]) != (len(self.sum_x), len(self.sum_y)):
            raise ConfigError(f"PairedMoments.update got widths {x.shape[1]}, {y.shape[1]}; it was made for "
                              f"{len(self.sum_x)}, {len(self.sum_y)}")
        x, y = x.detach().to(self.sum_x), y.detach().to(self.sum_y)
        if int(self.n) == 0:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
        x, y = x - self.shift_x, y - self.shift_y
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.xy += x.T @ y
        self.n += x.shape[0]

    def _moments(self) -> tuple[int, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(n, shifts, sums, outer products) over all ranks, around the first non-empty rank's shift."""
        n, cx, cy, sx, sy, xx, yy, xy = _stacked(self.n, self.shift_x, self.shift_y, self.sum_x, self.sum_y,
                                                 self.xx, self.yy, self.xy)
        if len(n) == 1:
            outer = {"xx": xx[0], "yy": yy[0], "xy": xy[0]}
            return int(n[0]), {"x": cx[0], "y": cy[0]}, {"x": sx[0], "y": sy[0]}, outer
        ref = int((n > 0).long().argmax())
        shift, total_n = {"x": cx[ref], "y": cy[ref]}, int(n.sum())
        delta = {"x": cx - cx[ref], "y": cy - cy[ref]}  # per rank: its shift minus the common one
        raw = {"x": sx, "y": sy}
        nn = n.to(sx)[:, None]
        sums = {k: (raw[k] + nn * delta[k]).sum(0) for k in "xy"}
        outer = {}
        for key, value in (("xx", xx), ("yy", yy), ("xy", xy)):
            a, b = key
            moved = value + torch.einsum("ri,rj->rij", raw[a], delta[b]) + torch.einsum("ri,rj->rij", delta[a], raw[b])
            outer[key] = (moved + nn[:, :, None] * torch.einsum("ri,rj->rij", delta[a], delta[b])).sum(0)
        return total_n, shift, sums, outer

    def mean(self, which: str) -> Tensor:
        """Mean of "x" or "y"."""
        n, shift, sums, _ = self._moments()
        return shift[which] + sums[which] / n

    def cov(self, which: str) -> Tensor:
        """Unbiased covariance "xx", "yy" or cross-covariance "xy" (x rows, y columns)."""
        n, _, sums, outer = self._moments()
        if n < 2:
            raise DataError(f"covariances need >= 2 pairs; got {n}: enlarge the eval split")
        ma, mb = sums[which[0]] / n, sums[which[1]] / n
        return (outer[which] - n * torch.outer(ma, mb)) / (n - 1)

    def projected(self, dims: int | None = PCA_DIMS) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(mean x, mean y, cov xx, cov yy, cov xy) in the top `dims` principal directions of y
        (x and y of one width); all of them when `dims` is None or not below the width."""
        mx, my, cx, cy, cxy = self.mean("x"), self.mean("y"), self.cov("xx"), self.cov("yy"), self.cov("xy")
        if dims is not None and dims < len(cy):
            if cx.shape != cy.shape:
                raise ConfigError(f"projecting x {tuple(cx.shape)} onto y's directions needs equal widths")
            p = torch.linalg.eigh(cy).eigenvectors[:, -dims:]
            mx, my, cx, cy, cxy = mx @ p, my @ p, p.T @ cx @ p, p.T @ cy @ p, p.T @ cxy @ p
        return mx, my, cx, cy, cxy

    def kl(self, dims: int | None = PCA_DIMS) -> float:
        """KL(N_x || N_y) of the Gaussian fits of x and y, one ridge (from both) on both covariances."""
        mx, my, cx, cy, _ = (t.cpu() for t in self.projected(dims))
        return gaussian_kl(mx, cx, my, cy, ridge=_ridge(cx, cy))

    def mi(self, dims: int | None = PCA_DIMS) -> float:
        """Gaussian mutual information of x and y from their canonical correlations, each covariance ridged."""
        _, _, cx, cy, cxy = (t.cpu() for t in self.projected(dims))
        return gaussian_mi(cx, cy, cxy, _ridge(cx), _ridge(cy))

    def compute(self) -> dict[str, float]:
        """{"kl", "mi"} over every pair seen (on every rank)."""
        return {"kl": self.kl(), "mi": self.mi()}


class InfoNCE(Metric):
    """Streaming InfoNCE lower bound on I(X; Y) in nats, over consecutive chunks of `batch` pairs: a Metric.

    Per chunk of K pairs, with the cosine critic f(u, v) = cos(u - c, v - c) / t (c: the chunk's mean
    of y, a symmetric function of the y's, which keeps the bound valid), the bound is
    log K - CE(f(x_i, y_j) over j, target i), averaged over anchors and chunks. It is computed for every
    temperature t in `temperatures` and the largest is reported (each is a lower bound; the max of a
    few carries a small selection bias). At most log K. A final partial chunk counts only when no full
    chunk exists, so the value does not depend on the eval batch size.

    Chunks follow the pairs' positions in the whole stream (``index`` in `update`), not the batches, so
    ranks that each see a contiguous run of positions split some chunks between them: each rank keeps its
    first and its current chunk while they are partial (two slots, memory bounded), and `compute` joins
    the ranks' partial chunks after the DDP sync.
    """

    full_state_update = False

    def __init__(self, dim: int, batch: int = NCE_BATCH, temperatures: tuple[float, ...] = NCE_TEMPERATURES,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if batch < 2 or not temperatures or min(temperatures) <= 0:
            raise ConfigError(f"InfoNCE(batch={batch}, temperatures={temperatures}): need batch >= 2, t > 0")
        self.batch, self.temperatures = batch, tuple(temperatures)
        self.add_state("bound", torch.zeros(len(temperatures), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        # slot 0: this rank's first chunk when it began mid-chunk; slot 1: the chunk being filled
        self.add_state("pend_x", torch.zeros(2, batch, dim, dtype=torch.float64), dist_reduce_fx=None)
        self.add_state("pend_y", torch.zeros(2, batch, dim, dtype=torch.float64), dist_reduce_fx=None)
        self.add_state("pend_n", torch.zeros(2, dtype=torch.long), dist_reduce_fx=None)
        self.add_state("pend_chunk", torch.full((2,), -1, dtype=torch.long), dist_reduce_fx=None)
        self._next = 0  # the position of the next pair when `update` is given none

    def _bound(self, x: Tensor, y: Tensor) -> Tensor:
        """(T,) sum over the chunk's anchors of log K - CE, per temperature."""
        c = y.mean(0, keepdim=True)
        sim = F.normalize(x - c, dim=1, eps=1e-12) @ F.normalize(y - c, dim=1, eps=1e-12).T
        target = torch.arange(len(x), device=x.device)
        return torch.stack([len(x) * math.log(len(x)) - F.cross_entropy(sim / t, target, reduction="sum")
                            for t in self.temperatures])

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> None:
        """Add (B, d) features `x` and their (B, d) partners `y`, at stream positions `index` ((B,), one
        ascending run; by default the positions after the last update's)."""
        if x.dim() != 2 or x.shape != y.shape or x.shape[1] != self.pend_x.shape[-1]:
            raise ConfigError(f"InfoNCE.update got {tuple(x.shape)} and {tuple(y.shape)}: need two equal "
                              f"(B, {self.pend_x.shape[-1]})")
        start = self._next if index is None else int(index[0])
        if index is not None and not torch.equal(index.cpu(), torch.arange(start, start + len(x))):
            raise ConfigError("InfoNCE.update: the positions of a batch must be one ascending run")
        self._next = start + len(x)
        x, y = x.detach().to(self.pend_x), y.detach().to(self.pend_y)
        done = 0
        while done < len(x):
            pos = start + done
            take = min(len(x) - done, self.batch - pos % self.batch)
            self._fill(pos // self.batch, x[done:done + take], y[done:done + take])
            done += take

    def _fill(self, chunk: int, x: Tensor, y: Tensor) -> None:
        if int(self.pend_n[1]) and int(self.pend_chunk[1]) != chunk:  # the open chunk ended partial
            if int(self.pend_n[0]):
                raise ConfigError("InfoNCE.update: positions must follow each other without gaps on a rank")
            for state in (self.pend_x, self.pend_y, self.pend_n, self.pend_chunk):
                state[0] = state[1]
            self.pend_n[1], self.pend_chunk[1] = 0, -1
        k = int(self.pend_n[1])
        self.pend_chunk[1] = chunk
        self.pend_x[1, k:k + len(x)], self.pend_y[1, k:k + len(y)] = x, y
        self.pend_n[1] += len(x)
        if int(self.pend_n[1]) == self.batch:
            self.bound += self._bound(self.pend_x[1], self.pend_y[1])
            self.count += self.batch
            self.pend_n[1], self.pend_chunk[1] = 0, -1

    def compute(self) -> float:
        """The bound in nats (the best temperature's), over every full chunk seen (on every rank)."""
        px, py, pn, pc = self.pend_x, self.pend_y, self.pend_n, self.pend_chunk
        if pn.dim() == 1:  # one process: add the rank dimension a DDP sync adds
            px, py, pn, pc = (t.unsqueeze(0) for t in (px, py, pn, pc))
        pieces: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for rank in range(len(pn)):  # ranks hold ascending runs: rank order, then slot order, is position order
            for slot in (0, 1):
                k = int(pn[rank, slot])
                if k:
                    pieces.setdefault(int(pc[rank, slot]), []).append((px[rank, slot, :k], py[rank, slot, :k]))
        bound, count = self.bound.clone(), int(self.count)
        joined = {c: (torch.cat([x for x, _ in p]), torch.cat([y for _, y in p])) for c, p in sorted(pieces.items())}
        for x, y in joined.values():
            if len(x) == self.batch:  # a chunk split between ranks
                bound += self._bound(x, y)
                count += self.batch
        if count == 0:  # fewer pairs than one chunk: the bound over all of them
            x, y = joined.get(0, (torch.zeros(0), torch.zeros(0)))
            if len(x) < 2:
                raise DataError(f"InfoNCE needs >= 2 pairs; got {len(x)}: enlarge the eval split")
            return float(self._bound(x, y).max() / len(x))
        return float(bound.max() / count)
