"""Feature network (training, cache) and the per-split scorer (FID, IS, cosine, class accuracy)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import plain_fit

from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.metrics import features as features_mod
from i2i_unlearning.metrics.evaluate import (
    BatchFeatures,
    FeatureExtractor,
    SplitScorer,
    class_acc,
    fid_metric,
)
from i2i_unlearning.metrics.features import FeatureNet, load_or_train_feature_net, train_feature_net

SIZE, CLASSES = 16, 3


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable grey images: horizontal stripes, vertical stripes or a centre block, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    stripes = ((torch.arange(SIZE) // 2) % 2).float()
    block = torch.zeros(SIZE, SIZE)
    block[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 1
    patterns = torch.stack(
        [stripes.view(SIZE, 1).expand(SIZE, SIZE), stripes.view(1, SIZE).expand(SIZE, SIZE), block]
    )
    images = 0.8 * patterns[labels].unsqueeze(1) + 0.2 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    return images.clamp(0, 1), labels


def batches(images, labels, size=32):
    return lambda: [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


@pytest.fixture(scope="module")
def data():
    return make_data(256, seed=0), make_data(96, seed=1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    (x_train, y_train), (x_test, y_test) = data
    cache = tmp_path_factory.mktemp("feature_cache")
    kwargs = dict(
        train_batches=batches(x_train, y_train),
        test_batches=batches(x_test, y_test),
        channels=1,
        num_classes=CLASSES,
        image_size=SIZE,
        epochs=2,
        fit=plain_fit(),
    )
    net, meta = load_or_train_feature_net(cache, "synthetic-c1-s16", **kwargs)
    return net, meta, cache, kwargs


def score(net, outputs, truth, labels, batch_size, is_splits=4):
    scorer = SplitScorer(net, is_splits=is_splits)
    for i in range(0, len(truth), batch_size):
        scorer.score(outputs[i : i + batch_size], truth[i : i + batch_size], labels[i : i + batch_size])
    return scorer.compute()


def test_feature_net_shapes():
    net = FeatureNet(channels=3, num_classes=5, image_size=32).eval()
    x = torch.rand(4, 3, 32, 32)
    assert net(x).shape == (4, 5)
    assert net.embed(x).shape == (4, net.embed_dim) == (4, 128)
    embedding, logits = net.embed_with_logits(x)
    assert torch.allclose(logits, net(x)) and torch.allclose(embedding, net.embed(x))


def test_trained_net_is_accurate_and_cached(trained):
    net, meta, cache, _ = trained
    assert not net.training
    assert meta["test_acc"] > 0.9
    assert (cache / "feature_net-synthetic-c1-s16.pt").exists()
    on_disk = json.loads((cache / "feature_net-synthetic-c1-s16.json").read_text())
    assert set(on_disk) == {"test_acc", "epochs", "channels", "num_classes", "image_size", "train_s"}
    assert on_disk["epochs"] == 2 and on_disk["image_size"] == SIZE
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_second_call_loads_instead_of_training(trained, monkeypatch):
    net, meta, cache, kwargs = trained

    def no_training(**_):
        raise AssertionError("the cached feature net should have been loaded")

    monkeypatch.setattr(features_mod, "train_feature_net", no_training)
    loaded, loaded_meta = load_or_train_feature_net(cache, "synthetic-c1-s16", **kwargs)
    assert loaded_meta == meta
    assert not loaded.training
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_cache_with_other_settings_is_refused(trained):
    _, _, cache, kwargs = trained
    with pytest.raises(ConfigError, match="num_classes"):
        load_or_train_feature_net(cache, "synthetic-c1-s16", **{**kwargs, "num_classes": 7})
    with pytest.raises(ConfigError, match="cache key"):
        load_or_train_feature_net(cache, "../escape", **kwargs)


def test_training_is_seeded_and_leaves_global_rng_alone(data):
    (x, y), (x_test, y_test) = data
    args = dict(channels=1, num_classes=CLASSES, image_size=SIZE, epochs=1, seed=3, fit=plain_fit())
    rng_before = torch.random.get_rng_state()
    first, acc_first = train_feature_net(batches(x[:96], y[:96]), batches(x_test, y_test), **args)
    second, acc_second = train_feature_net(batches(x[:96], y[:96]), batches(x_test, y_test), **args)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert acc_first == acc_second
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_training_rejects_labels_outside_classes(data):
    (x, y), _ = data
    with pytest.raises(DataError, match="num_classes=2"):
        train_feature_net(batches(x, y), batches(x, y), channels=1, num_classes=2, image_size=SIZE, epochs=1,
                          fit=plain_fit())


def test_perfect_outputs_score_as_ground_truth(trained, data):
    net = trained[0]
    _, (truth, labels) = data
    scores = score(net, truth.clone(), truth, labels, batch_size=32)
    assert set(scores) == {"fid", "is", "cos", "class_acc", "n"}
    assert scores["n"] == len(truth)
    assert scores["fid"] == pytest.approx(0.0, abs=1e-3)
    assert scores["cos"] == pytest.approx(1.0, abs=1e-5)
    assert scores["class_acc"] == class_acc(net, truth, labels)
    assert 1.0 < scores["is"] <= CLASSES


def test_noise_outputs_score_far_worse(trained, data):
    net = trained[0]
    _, (truth, labels) = data
    perfect = score(net, truth.clone(), truth, labels, batch_size=32)
    noise = score(net, torch.rand(truth.shape, generator=torch.Generator().manual_seed(0)), truth, labels, 32)
    assert noise["fid"] > 10.0 and noise["fid"] > 1000 * max(perfect["fid"], 1e-3)
    assert noise["cos"] < perfect["cos"] - 0.1
    assert noise["class_acc"] < perfect["class_acc"]
    assert noise["is"] < perfect["is"]


def test_scores_do_not_depend_on_batching(trained, data):
    net = trained[0]
    _, (truth, labels) = data
    outputs = (truth + 0.3 * torch.rand(truth.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    whole = score(net, outputs, truth, labels, batch_size=len(truth))
    for batch_size in (7, 32):
        split = score(net, outputs, truth, labels, batch_size=batch_size)
        assert split["n"] == whole["n"]
        for key in ("fid", "is", "cos", "class_acc"):
            assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5), key


def test_one_feature_pass_per_image_tensor(trained, data):
    net = trained[0]
    _, (truth, labels) = data
    calls = []
    original = net.embed_with_logits
    scorer = SplitScorer(net)  # probes the logits' width once, here

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    net.embed_with_logits = counting
    try:
        scorer.score(truth[:16].clone(), truth[:16], labels[:16])
    finally:
        del net.embed_with_logits
    assert calls == [16, 16]  # ground truth once, outputs once: FID, IS, cosine and accuracy share them


def test_a_model_that_resizes_itself_gets_the_images_at_their_size():
    """BatchFeatures resizes to image_size (bilinear) unless the model says it resizes itself (the FID network)."""

    class Probe(torch.nn.Module):
        embed_dim, in_channels, image_size = 4, 3, 12

        def __init__(self, resizes_input: bool):
            super().__init__()
            self.resizes_input, self.sizes = resizes_input, []

        def embed_with_logits(self, x):
            self.sizes.append(tuple(x.shape[-2:]))
            return x.new_zeros(len(x), 4), x.new_zeros(len(x), 2)

    images = torch.rand(2, 1, 20, 20)  # grey: widened to RGB either way
    for resizes, size in ((True, (20, 20)), (False, (12, 12))):
        probe = Probe(resizes)
        BatchFeatures(probe)(images)
        assert probe.sizes == [size]


def test_tiny_split_clamps_inception_splits(trained, data):
    net = trained[0]
    _, (truth, labels) = data
    scores = score(net, truth[:3], truth[:3], labels[:3], batch_size=3, is_splits=10)
    assert scores["n"] == 3 and scores["is"] == pytest.approx(1.0)  # one image per split
    assert torch.isfinite(torch.tensor(scores["fid"]))


def test_scorer_rejects_bad_input(trained, data):
    net = trained[0]
    _, (truth, labels) = data
    scorer = SplitScorer(net)
    with pytest.raises(ConfigError, match="ground truth"):
        scorer.score(truth[:4], truth[:5], labels[:4])
    with pytest.raises(DataError, match="at least 2"):
        scorer.compute()
    with pytest.raises(ConfigError, match="not a feature model"):
        SplitScorer(torch.nn.Linear(2, 2))


def test_feature_extractor_takes_what_torchmetrics_sends(trained, data):
    net = trained[0]
    extractor = FeatureExtractor(BatchFeatures(net))
    rgb_uint8 = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    assert extractor(rgb_uint8).shape == (2, net.embed_dim)
    extractor.train()
    assert not net.training  # BatchNorm statistics never move under the metrics
    _, (truth, _) = data
    fid = fid_metric(net)  # unpaired use (e.g. generated samples vs retain data)
    fid.update(truth[:48], real=True)
    fid.update(truth[48:], real=False)
    assert 0.0 <= float(fid.compute()) < 50.0
