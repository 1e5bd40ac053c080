"""Evaluation is a Lightning test loop: 2 ranks give the 1-rank scores, metric states add up over ranks,
and scorer memory stays flat in the image count."""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import compose_cfg, prepared_runner, tiny_overrides
from PIL import Image

from i2i_unlearning.metrics.audit import InfoNCE, PairedMoments
from i2i_unlearning.metrics.evaluate import InceptionScoreStream, Slots, SplitScorer
from i2i_unlearning.metrics.restoration import rank_share
from i2i_unlearning.runner import run_evaluation, write_eval_artefacts


def _evaluate(cfg, runner, out_dir, **trainer):
    """metrics, floors, grid.png pixels and embeddings of one evaluation of the original model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    original = runner.reference("original")[0]
    net = runner.nets[0]
    metrics, floors = run_evaluation(cfg, runner.eval_dm, original, original, net, root=out_dir,
                                     artefacts=partial(write_eval_artefacts, out_dir), **trainer)
    grid = np.asarray(Image.open(out_dir / "grid.png"), dtype=np.int16)
    return metrics, floors, grid, dict(np.load(out_dir / "embeddings.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mae", "diffusion"])  # deterministic restore / sampled restore + states
def test_two_rank_evaluation_equals_one_rank(shared_tmp, model):
    cfg = compose_cfg(tiny_overrides(shared_tmp, model=model, method="original",
                                     extra=["metrics.eval_batch_size=5", "data.eval_per_class=12"]))
    runner = prepared_runner(cfg, shared_tmp / f"ddp-eval-{model}")
    runner.nets = runner.scoring_nets()
    one = _evaluate(cfg, runner, shared_tmp / f"ddp-eval-{model}" / "one")
    two = _evaluate(cfg, runner, shared_tmp / f"ddp-eval-{model}" / "two",
                    accelerator="cpu", devices=2, strategy="ddp_spawn")

    metrics_one, metrics_two = one[0], two[0]
    assert metrics_one["retain_n"] == 24 and "forget_mia_auc" in metrics_one  # 5 batches: split between ranks
    assert metrics_one.keys() == metrics_two.keys()
    for key, value in metrics_one.items():  # equal up to float32 round-off (ranks run other thread counts)
        if key.endswith(("_kl", "_mi")):  # Gaussian fits of 128-d embeddings from 12-24 images: ill-conditioned,
            continue  # round-off in the features moves them (their merge over ranks is tested exactly below)
        assert metrics_two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert one[1] == pytest.approx(two[1])  # floors
    diff = np.abs(one[2] - two[2])  # the grid as written: a pixel of a sampled restore may differ by one level
    assert diff.mean() < 0.01 and diff.max() <= (0 if model == "mae" else 3), (diff.mean(), diff.max())
    assert one[3].keys() == two[3].keys() and one[3]
    for name, emb in one[3].items():
        assert abs(emb - two[3][name]).max() < 1e-4, name


def _sync(metrics):
    """What a DDP sync does to the metrics' states: every state gathered over the 'ranks' and reduced."""
    first = metrics[0]
    for name, reduce in first._reductions.items():
        stacked = torch.stack([getattr(m, name) for m in metrics])
        setattr(first, name, reduce(stacked) if reduce is not None else stacked)
    return first


def test_metric_states_merged_over_ranks_equal_one_process():
    """PairedMoments, InfoNCE, the IS sums and Slots fed a stream split over 3 'ranks' (contiguous runs, chunks
    of InfoNCE cut between them, one rank empty) give the one-process values after their states are
    gathered and reduced as torchmetrics does under DDP."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(300, 6, generator=g, dtype=torch.float64)
    logits = torch.randn(300, 4, generator=g)
    shares = [range(0, 70), range(70, 70), range(70, 300)]

    def feed(metric, share, update):
        idx = torch.arange(share.start, share.stop)
        for s in range(0, len(idx), 16):
            update(metric, idx[s:s + 16])
        return metric

    cases = {
        "moments": (lambda: PairedMoments(6), lambda m, i: m.update(x[i] + 5.0, y[i]),
                    lambda m: (m.mean("x"), m.cov("xx"), m.cov("xy"))),
        "nce": (lambda: InfoNCE(6, batch=64), lambda m, i: m.update(x[i], y[i], i), lambda m: m.compute()),
        "is": (lambda: InceptionScoreStream(4, 7), lambda m, i: m.update(logits[i], i), lambda m: m.compute()),
        "slots": (lambda: Slots(100, (6,)), lambda m, i: m.update(x[i].float(), i), lambda m: m.compute()),
    }
    for name, (make, update, read) in cases.items():
        whole = read(feed(make(), range(0, 300), update))
        merged = read(_sync([feed(make(), share, update) for share in shares]))
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (whole, merged)), strict=True):
            assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-10, atol=1e-12), name
    # control: InfoNCE over chunks that ignore the positions (each rank restarting at 0) differs
    apart = [feed(InfoNCE(6, batch=64), share, lambda m, i: m.update(x[i], y[i])) for share in shares]
    assert _sync(apart).compute() != pytest.approx(read(feed(InfoNCE(6, batch=64), range(0, 300),
                                                               lambda m, i: m.update(x[i], y[i], i))))


def test_rank_shares_cover_the_plan_once_without_padding():
    for n in (0, 1, 5, 7, 24):
        for world in (1, 2, 3, 8):
            shares = [rank_share(n, r, world) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


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
            scorer.score(x.clamp(0, 1) * 0.9, x, torch.zeros(32, dtype=torch.long))
        sizes[n] = scorer.state_nbytes()
        assert int(scorer.n) == n  # every image counted (compute() on 2048-d features is another test's)
    assert sizes[512] == sizes[64] > 0
