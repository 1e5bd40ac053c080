"""Unlearning recipes as config: the public code's optimiser, schedule, clipping, EMA and batch composition."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from test_methods import tiny_mae

from i2i_unlearning.errors import ConfigError
from i2i_unlearning.runner import unlearn_settings
from i2i_unlearning.training import make_trainer
from i2i_unlearning.unlearning import methods as M
from i2i_unlearning.unlearning.module import UnlearnModule


def paper_method(preset: str):
    return instantiate(compose_cfg([f"experiment={preset}", "logger=none"]).method)


@pytest.mark.parametrize("preset", ["imagenet_mae", "imagenet_vqgan"])
def test_mage_recipe(preset):
    method = paper_method(preset)
    method.set_epochs(forget_images=100 * 100, retain_images=100 * 100)  # the ImageNet preset's 100 x 100 each
    assert method.steps == math.ceil(6 * 20_000 / 128) == 938
    assert (method.batch_size, method.forget_batch_size, method.gradient_clip_val, method.ema_decay) == (64, 64, 3.0,
                                                                                                         None)
    model = tiny_mae()
    opt = method.optimizer(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    decays = {g["weight_decay"]: {p.ndim > 1 for p in g["params"]} for g in opt.param_groups}
    assert decays == {0.05: {True}, 0.0: {False}}  # no decay on biases and norm weights
    sched = method.scheduler(opt, total_steps=method.steps)
    lrs = []
    for _ in range(method.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warmup = round(938 * 5 / 6)
    assert lrs[0] == pytest.approx(5e-5 / warmup) and lrs[warmup - 1] == pytest.approx(5e-5)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup], strict=True))
    assert all(a > b for a, b in zip(lrs[warmup:-1], lrs[warmup + 1:], strict=True)) and lrs[-1] < 1e-7


def test_palette_recipe():
    method = paper_method("places_diffusion")
    method.set_epochs(forget_images=50 * 5000, retain_images=50 * 5000)
    assert method.steps == math.ceil(3 * 500_000 / 96)
    assert (method.batch_size, method.forget_batch_size, method.gradient_clip_val, method.ema_decay, method.alpha,
            method.scheduler) == (48, 48, None, 0.9999, 0.1, None)
    opt = method.optimizer(list(tiny_mae().parameters()))
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 5e-5 and opt.defaults["weight_decay"] == 0.0


def test_bad_recipe_values_fail_by_name():
    for kw, name in [({"forget_batch_size": 0}, "method.forget_batch_size"), ({"ema_decay": 1.5}, "method.ema_decay"),
                     ({"epochs": 0}, "method.epochs")]:
        with pytest.raises(ConfigError, match=name):
            M.Ours("ours", **kw)


def fit_steps(method, batches, steps):
    """``steps`` unlearning steps of ``method`` from the same tiny MAE through the run's Trainer settings."""
    module = UnlearnModule(tiny_mae(), method)
    cfg = compose_cfg(["logger=none"])
    torch.manual_seed(0)
    trainer = make_trainer(cfg, steps, **{"gradient_clip_val": None, **unlearn_settings(method)})
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batches] * steps, batch_size=None))
    return module, trainer


@pytest.fixture(scope="module")
def mixed_batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    return {"retain": {"image": torch.rand(6, 1, 16, 16, generator=g), "mask": mask.expand(6, -1, -1, -1).clone()},
            "forget": {"image": torch.rand(2, 1, 16, 16, generator=g), "mask": mask.expand(2, -1, -1, -1).clone()}}


def test_ema_result_and_clipping(mixed_batch):
    sgd = partial(torch.optim.SGD, lr=1.0)
    first, _ = fit_steps(M.Ours("ours", optimizer=sgd), mixed_batch, 1)
    plain, _ = fit_steps(M.Ours("ours", optimizer=sgd), mixed_batch, 3)
    frozen_avg, _ = fit_steps(M.Ours("ours", optimizer=sgd, ema_decay=1.0), mixed_batch, 3)
    # decay 1: the average keeps its first value (the weights after step 1), and that is the result
    for a, b in zip(frozen_avg.student.parameters(), first.student.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(b, c) for b, c in zip(first.student.parameters(), plain.student.parameters(),
                                                     strict=True))
    start = [p.detach().clone() for p in tiny_mae().parameters()]
    clipped, _ = fit_steps(M.Ours("ours", optimizer=sgd, gradient_clip_val=1e-3), mixed_batch, 1)
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(clipped.student.parameters(), start, strict=True)])
    assert 0 < moved.norm() <= 1e-3 * (1 + 1e-4)  # SGD at lr 1: the step is the clipped gradient
    unclipped = torch.cat([(p.detach() - s).flatten() for p, s in zip(first.student.parameters(), start,
                                                                       strict=True)])
    assert unclipped.norm() > 10 * moved.norm()
