"""Audits: membership inference, Gaussian KL and mutual information, distance to retrain."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from i2i_unlearning.data.degrade import eval_mask
from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.families.mae import MAE
from i2i_unlearning.metrics.audit import (
    InfoNCE,
    PairedMoments,
    attack_auc,
    canonical_correlations,
    gaussian_kl,
    gaussian_mi,
    membership_audit,
    sample_scores,
    threshold_auc,
)
from i2i_unlearning.report.summary import distance_to_retrain, format_markdown, write_summary

# Sampling error of an AUC with n = m = 300 and no signal: sqrt((n + m + 1) / (12 n m)) = 0.024; 3.5 sigma.
AUC_TOL = 0.085


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # torch.distributions samples from the global generator


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int, d: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) e: I(x; y) = -d/2 log(1 - rho^2) nats."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y, -d / 2 * math.log(1 - rho**2)


# ---- membership inference ----------------------------------------------------------------------
def test_mia_auc_is_chance_when_members_and_non_members_share_a_distribution():
    members = torch.randn(300, 2, generator=gen(0)).exp()
    nonmembers = torch.randn(300, 2, generator=gen(1)).exp()
    audit = membership_audit(members, nonmembers)
    assert set(audit) == {"mia_auc", "mia_auc_err", "mia_auc_emb"}
    for name, value in audit.items():
        assert abs(value - 0.5) < AUC_TOL, (name, value)


def test_threshold_auc_keeps_its_direction():
    low, high = torch.rand(50, generator=gen(0)), 1 + torch.rand(50, generator=gen(1))
    assert threshold_auc(low, high, "low") == 1.0  # members scored lower: a perfect "low" attack
    assert threshold_auc(low, high, "high") == 0.0  # not folded to max(auc, 1 - auc)
    assert attack_auc(low[:, None], high[:, None]) == 1.0  # the regression learns the direction itself
    with pytest.raises(ConfigError, match="member_if"):
        threshold_auc(low, high, "lower")
    with pytest.raises(DataError, match=">= 2 members"):
        attack_auc(low[:1, None], high[:, None])


def test_mia_auc_is_high_for_a_tiny_model_overfitted_on_planted_images():
    """Planted images: random borders (the key) and a flat centre of a random grey (the secret), 8 of them.

    The model trained on them restores their centre far better than that of fresh images of the same
    distribution; a control model trained on 8 other images does not tell the planted ones apart.
    """
    size, n = 16, 8
    mask = eval_mask("center_half", size, 4).expand(n, -1, -1, -1)

    def images(seed: int) -> torch.Tensor:
        g = gen(seed)
        border, centre = torch.rand(n, 1, size, size, generator=g), torch.rand(n, 1, 1, 1, generator=g)
        return border * (1 - mask) + centre * mask

    def overfit(x: torch.Tensor) -> MAE:
        torch.manual_seed(0)
        model = MAE(image_size=size, channels=1, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                    decoder_dim=16, decoder_depth=1, decoder_heads=1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            loss = model.task_loss(x, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    planted, fresh = images(0), images(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small train fastest on one thread (and do not fight a busy CPU)
    try:
        original, control = overfit(planted), overfit(images(1))
    finally:
        torch.set_num_threads(threads)

    def audit(model: MAE) -> dict[str, float]:
        scores = [sample_scores(model, original, x, mask, model.restore(x, mask)) for x in (planted, fresh)]
        return membership_audit(*scores)

    leaky, clean = audit(original), audit(control)
    assert leaky["mia_auc_err"] >= 0.85 and leaky["mia_auc"] >= 0.8
    assert leaky["mia_auc_emb"] == 0.5  # the original's distance to itself is 0 for every image: no signal
    assert clean["mia_auc_err"] < leaky["mia_auc_err"] - 0.3


def test_sample_scores_measure_the_hole_and_the_embedding_gap():
    model = MAE(image_size=16, channels=1, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_dim=8,
                decoder_depth=1, decoder_heads=1).eval()
    x = torch.rand(3, 1, 16, 16, generator=gen(0))
    mask = eval_mask("center_half", 16, 4).expand(3, -1, -1, -1)
    out = x.clone()
    out[0] = out[0] + 0.5 * mask[0]  # image 0: +0.5 inside the hole only
    out[1] = out[1] + 0.5 * (1 - mask[1])  # image 1: changed outside the hole only
    scores = sample_scores(model, model, x, mask, out)
    assert scores.shape == (3, 2) and scores.dtype == torch.float64
    assert scores[0, 0].item() == pytest.approx(0.25) and scores[1, 0] == 0 and scores[2, 0] == 0
    assert torch.all(scores[:, 1] == 0)  # the same encoder on both sides
    with pytest.raises(ConfigError, match="mask"):
        sample_scores(model, model, x, mask[:, :, :8], out)


# ---- Gaussian KL ---------------------------------------------------------------------------------
def random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen(seed), dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)


def test_gaussian_kl_matches_the_closed_form():
    d = 5
    mp = torch.randn(d, generator=gen(0), dtype=torch.float64)
    mq = torch.randn(d, generator=gen(1), dtype=torch.float64)
    cp, cq = random_spd(d, 2), random_spd(d, 3)
    expected = float(kl_divergence(MultivariateNormal(mp, cp), MultivariateNormal(mq, cq)))
    assert gaussian_kl(mp, cp, mq, cq) == pytest.approx(expected, rel=1e-9)
    assert gaussian_kl(mp, cp, mp, cp) == pytest.approx(0.0, abs=1e-12)


def test_kl_of_identical_sets_is_zero_and_of_sampled_gaussians_matches_the_truth():
    x = torch.randn(500, 16, generator=gen(0))
    same = PairedMoments(16)
    same.update(x, x.clone())
    assert same.kl(dims=None) == pytest.approx(0.0, abs=1e-9)
    assert same.kl() == pytest.approx(0.0, abs=1e-9)

    # Two known 3-d Gaussians, 20k samples each: the estimate is within 3 % of the true KL (its sampling
    # error and the ridge's bias are both well under 1 %).
    d, n = 3, 20_000
    mp, mq = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    cp, cq = random_spd(d, 4), random_spd(d, 5)
    p = MultivariateNormal(mp, cp).sample((n,))
    q = MultivariateNormal(mq, cq).sample((n,))
    truth = float(kl_divergence(MultivariateNormal(mp, cp), MultivariateNormal(mq, cq)))
    moments = PairedMoments(3)
    for i in range(0, n, 777):  # streaming, uneven batches
        moments.update(p[i:i + 777], q[i:i + 777])
    assert moments.kl(dims=None) == pytest.approx(truth, rel=0.03)
    assert truth > 0.5  # control: the sets differ


# ---- mutual information --------------------------------------------------------------------------
def test_gaussian_mi_matches_the_analytic_value_on_correlated_gaussians():
    """d = 4, rho = 0.6: I = 0.893 nats. Tolerance 0.05 nats for 20k pairs (the estimator's bias is about
    d^2 / 2n = 0.0004, its sampling sd about 0.01)."""
    x, y, truth = correlated(20_000, 4, 0.6, seed=0)
    moments = PairedMoments(4)
    moments.update(x, y)
    assert moments.mi(dims=None) == pytest.approx(truth, abs=0.05)
    rho = canonical_correlations(moments.cov("xx"), moments.cov("yy"), moments.cov("xy"))
    assert torch.allclose(rho, torch.full((4,), 0.6, dtype=torch.float64), atol=0.02)
    # The canonical-correlation form equals the log-det form 1/2 log(det Sx det Sy / det S).
    joint = torch.cat([torch.cat([moments.cov("xx"), moments.cov("xy")], 1),
                       torch.cat([moments.cov("xy").T, moments.cov("yy")], 1)])
    logdet = 0.5 * (torch.logdet(moments.cov("xx")) + torch.logdet(moments.cov("yy")) - torch.logdet(joint))
    assert gaussian_mi(moments.cov("xx"), moments.cov("yy"), moments.cov("xy")) == pytest.approx(float(logdet))

    independent = PairedMoments(4)
    independent.update(x, torch.randn(x.shape, generator=gen(9), dtype=torch.float64))
    assert independent.mi(dims=None) < 0.01


def test_mi_in_principal_directions_finds_the_correlated_subspace():
    """4 correlated unit-variance dimensions (I = 0.893) plus 12 independent low-variance ones, rotated:
    in the top 4 principal directions of y the estimate is the analytic value."""
    x, y, truth = correlated(20_000, 4, 0.6, seed=1)
    g = gen(2)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q
    pad = lambda a: torch.cat([a, 0.05 * torch.randn(len(a), 12, generator=g, dtype=torch.float64)], 1)  # noqa: E731
    moments = PairedMoments(16)
    moments.update(pad(x) @ rotation, pad(y) @ rotation)
    assert moments.mi(dims=4) == pytest.approx(truth, abs=0.05)
    assert moments.kl(dims=4) < 0.01  # x and y have one distribution


def test_infonce_is_a_lower_bound_near_the_analytic_value():
    """InfoNCE with cosine critics over chunks of 128: at most I (+ sampling error 0.05 nats) and log 128,
    and for d = 4, rho = 0.6 (I = 0.893) at least 60 % of I. For independent pairs it is slightly negative
    (a valid bound on I = 0: even the flattest critic, t = 1, pays the variance of cos in 4-d)."""
    x, y, truth = correlated(4096, 4, 0.6, seed=3)
    bound = InfoNCE(4)
    for i in range(0, len(x), 300):  # uneven updates: chunks do not follow the eval batches
        bound.update(x[i:i + 300], y[i:i + 300])
    value = bound.compute()
    assert 0.6 * truth <= value <= truth + 0.05
    whole = InfoNCE(4)
    whole.update(x, y)
    assert whole.compute() == pytest.approx(value, rel=1e-9)

    independent = InfoNCE(4)
    independent.update(x, torch.randn(x.shape, generator=gen(4), dtype=torch.float64))
    assert -0.2 < independent.compute() < 0.05

    identical = InfoNCE(4)
    identical.update(x, x.clone())
    assert identical.compute() <= math.log(128) + 1e-9


def test_tiny_sets_fail_with_a_clear_error():
    one = PairedMoments(3)
    one.update(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(DataError, match=">= 2 pairs"):
        one.kl()
    nce = InfoNCE(3)
    nce.update(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(DataError, match=">= 2 pairs"):
        nce.compute()


# ---- distance to retrain -------------------------------------------------------------------------
def run_json(method: str, seed: int = 0, **metrics) -> dict:
    return {"family": "mae", "method": method, "dataset": "fashion_mnist", "seed": seed, "status": "ok",
            "error": None, "task": "center_half", "metrics": metrics}


# original and retrain differ by 100 in forget FID, 10 in retain FID, 0.2 / 0.1 in MIA AUC.
ORIGINAL = dict(forget_fid=200.0, retain_fid=40.0, forget_mia_auc=0.7, retain_mia_auc=0.6, forget_kl=1.0)
RETRAIN = dict(forget_fid=300.0, retain_fid=50.0, forget_mia_auc=0.5, retain_mia_auc=0.6, forget_kl=1.0)
OURS = dict(forget_fid=320.0, retain_fid=45.0, forget_mia_auc=0.6, retain_mia_auc=0.6, forget_kl=3.0)


def test_distance_to_retrain_normalises_by_the_original_to_retrain_gap():
    rows = [{**run_json(m), **values} for m, values in (("original", ORIGINAL), ("retrain", RETRAIN), ("ours", OURS))]
    rows.append({**run_json("ours", seed=1), **OURS})  # no seed-1 references: the only ones (seed 0) are used
    out = {(r["method"], r["seed"]): r for r in distance_to_retrain(rows)}
    ours = out[("ours", 0)]
    # fid: scale max(100, 10) = 100 -> forget 20/100, retain 5/100; mia_auc: scale 0.2 -> forget 0.1/0.2,
    # retain 0; kl: scale 0 (original = retrain) -> left out.
    assert ours["forget_fid_rt_d"] == 20.0 and ours["retain_fid_rt_d"] == -5.0
    assert ours["forget_kl_rt_d"] == 2.0
    assert ours["forget_dist_to_retrain"] == pytest.approx((0.2 + 0.5) / 2)
    assert ours["retain_dist_to_retrain"] == pytest.approx((0.05 + 0.0) / 2)
    assert ours["dist_to_retrain"] == pytest.approx((0.2 + 0.5 + 0.05 + 0.0) / 4)
    assert out[("retrain", 0)]["dist_to_retrain"] == 0.0
    assert out[("original", 0)]["forget_dist_to_retrain"] == pytest.approx(1.0)
    assert out[("ours", 1)]["dist_to_retrain"] == pytest.approx(ours["dist_to_retrain"])  # the only references
    alone = distance_to_retrain([{**run_json("ours"), **OURS}])[0]
    assert alone["dist_to_retrain"] is None and alone["forget_fid_rt_d"] is None


def test_summary_ranks_methods_by_distance_to_retrain(tmp_path):
    root = tmp_path / "sweep"
    for name, values in (("original", ORIGINAL), ("retrain", RETRAIN), ("ours", OURS)):
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps(run_json(name, **values)))
    csv_path, md_path = write_summary(root)
    with csv_path.open() as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert float(rows["retrain"]["dist_to_retrain"]) == 0.0
    assert {"forget_mia_auc", "forget_dist_to_retrain", "forget_fid_rt_d"} <= set(rows["ours"])
    md = md_path.read_text()
    audit = md.split("## Audits and distance to retrain")[1]
    order = [line.split("|")[2].strip() for line in audit.splitlines() if line.startswith("| mae")]
    assert order == ["retrain", "ours", "original"]  # 0, 0.19, 0.5
    assert "## Audits" not in format_markdown([{**run_json("ours"), "run_dir": "x"}])  # no audit columns
