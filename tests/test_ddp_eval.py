"""Evaluation spread over DDP ranks gives the 1-rank scores; scorer memory stays flat in the image count."""

import pytest
import torch
from conftest import compose_cfg, prepared_runner, tiny_overrides
from omegaconf import OmegaConf

from i2i_unlearning import distributed
from i2i_unlearning.metrics.evaluate import SplitScorer
from i2i_unlearning.metrics.restoration import evaluate_on


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mae", "diffusion"])  # deterministic restore / sampled restore + states
def test_two_rank_evaluation_equals_one_rank(shared_tmp, model):
    cfg = compose_cfg(tiny_overrides(shared_tmp, model=model, method="original",
                                     extra=["metrics.eval_batch_size=5", "data.eval_per_class=12"]))
    runner = prepared_runner(cfg, shared_tmp / f"ddp-eval-{model}")
    runner.nets = runner.scoring_nets()
    dm, net, original = runner.eval_dm, runner.nets[0], runner.reference("original")[0]
    one = evaluate_on(torch.device("cpu"), cfg, dm, original, original, net)

    ddp = OmegaConf.merge(cfg.trainer, {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    two = distributed.launch(ddp, evaluate_on, cfg, dm, original, original, net)

    metrics_one, metrics_two = one[0], two[0]
    assert metrics_one["retain_n"] == 24 and "forget_mia_auc" in metrics_one  # 5 batches: uneven over 2 ranks
    assert metrics_one.keys() == metrics_two.keys()
    for key, value in metrics_one.items():  # equal up to float32 round-off (ranks run other thread counts)
        if key.endswith(("_kl", "_mi")):  # Gaussian fits of 128-d embeddings from 12-24 images: ill-conditioned,
            continue  # round-off in the features moves them; their summation order is the 1-rank one
        assert metrics_two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert one[1] == pytest.approx(two[1])  # floors
    for name, rows in one[2].items():  # the grid: same images (a pixel of a sampled restore may differ by
        diff = (rows - two[2][name]).abs()  # round-off amplified by DDIM's x0 at the noisiest step: ~1e-3)
        assert diff.mean() < 1e-5 and diff.max() < (1e-5 if model == "mae" else 1e-2), (name, diff.mean(), diff.max())
    for name, emb in one[3].items():
        assert abs(emb - two[3][name]).max() < 1e-4, name


def test_ordered_map_without_ranks_is_a_plain_map():
    assert list(distributed.ordered_map(lambda i, x: (i, x * 2), "abc")) == [(0, "aa"), (1, "bb"), (2, "cc")]
    assert distributed.world() == (0, 1)


@pytest.mark.slow
def test_scorer_state_is_flat_in_the_number_of_images():
    """An Inception-sized feature model (2048-d embedding, 1008 logits): the running state after 64 images
    takes the same bytes as after 512 (IS from sums, no per-image logits kept)."""

    class Wide(torch.nn.Module):
        embed_dim, in_channels, image_size = 2048, 1, 8

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 2048)
            self.head = torch.nn.Linear(2048, 1008)

        def embed_with_logits(self, x):
            e = self.proj(x.flatten(1))
            return e, self.head(e)

    torch.manual_seed(0)
    net = Wide()
    sizes = {}
    for n in (64, 512):
        scorer = SplitScorer(net, audit=True)
        for _ in range(n // 32):
            x = torch.rand(32, 1, 8, 8)
            scorer.update(x.clamp(0, 1) * 0.9, x, torch.zeros(32, dtype=torch.long))
        sizes[n] = scorer.state_nbytes()
        assert scorer.compute()["n"] == n
    assert sizes[512] == sizes[64] > 0
