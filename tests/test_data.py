"""Data package: sources, shards, prepare, degradation masks and the datamodule (tiny synthetic data)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from i2i_unlearning.data.datamodule import ForgetRetainDataModule
from i2i_unlearning.data.degrade import (
    EVAL_TASKS,
    center_mask,
    eval_mask,
    fill,
    noise_image,
    outpaint_mask,
    random_block_mask,
    random_patch_mask,
    train_mask,
)
from i2i_unlearning.data.prepare import SPLIT_NAMES, load_manifest, prepare
from i2i_unlearning.data.shards import read_shard, verify_shards, write_shards
from i2i_unlearning.data.sources import FashionMNISTSource, SyntheticSource
from i2i_unlearning.errors import ConfigError, DataError

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
UNLEARN_STREAMS = {"forget": ["forget_train"], "retain": ["retain_train"]}


def small_source(**kw) -> SyntheticSource:
    return SyntheticSource(**{"num_classes": 5, "per_class_train": 12, "per_class_test": 6, "size": 28, **kw})


def small_prepare(out_root: Path, source=None, **kw) -> Path:
    args = {"forget_classes": ["class_0"], "retain_classes": ["class_1", "class_2"], "shard_size": 10, **kw}
    return prepare(source or small_source(), out_root, **args)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return small_prepare(tmp_path_factory.mktemp("prepared"))


def read_split(data_dir: Path, split: str, channels: int = 1):
    """All (keys, images, labels) of a split, in manifest shard order."""
    parts = [
        read_shard(data_dir / s["name"], channels) for s in load_manifest(data_dir)["splits"][split]["shards"]
    ]
    return (
        [k for p in parts for k in p[0]],
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )


def make_dm(data_dir: Path, **kw) -> ForgetRetainDataModule:
    args = {"streams": UNLEARN_STREAMS, "batch_size": 6, "epoch_batches": 3, "shuffle_buffer": 16, **kw}
    return ForgetRetainDataModule(data_dir, **args)


def epoch(dm_or_loader) -> list[dict]:
    loader = (
        dm_or_loader.train_dataloader() if isinstance(dm_or_loader, ForgetRetainDataModule) else dm_or_loader
    )
    return [batch for batch, _, _ in loader]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        for name in x:
            if x[name]["key"] != y[name]["key"] or not torch.equal(x[name]["image"], y[name]["image"]):
                return False
            if not torch.equal(x[name]["mask"], y[name]["mask"]):
                return False
    return True


# ---------------------------------------------------------------- sources and shards


def test_synthetic_source_is_deterministic_and_separable():
    source = small_source()
    train_x, train_y = source.load("train")
    again_x, _ = small_source().load("train")
    test_x, test_y = source.load("test")
    assert train_x.dtype == np.uint8 and train_x.shape == (60, 28, 28) and train_y.dtype == np.int64
    assert np.array_equal(train_x, again_x)
    assert not np.array_equal(train_x, small_source(seed=1).load("train")[0])

    # a class-mean template of each class's power spectrum separates the test images
    def spectrum(x):
        return np.abs(np.fft.fft2(x.astype(float) - x.mean(axis=(1, 2), keepdims=True))).reshape(len(x), -1)

    templates = np.stack([spectrum(train_x[train_y == c]).mean(0) for c in range(5)])
    feats = spectrum(test_x)
    predicted = np.argmax(feats @ templates.T / np.linalg.norm(templates, axis=1), axis=1)
    assert (predicted == test_y).mean() > 0.9
    rgb, _ = small_source(channels=3).load("test")
    assert rgb.shape == (30, 28, 28, 3)


def test_fashion_mnist_missing_root_names_file_and_install_hint(tmp_path):
    source = FashionMNISTSource(root=str(tmp_path / "nowhere"))
    assert source.class_names[0] == "t_shirt_top" and source.class_names[-1] == "ankle_boot"
    with pytest.raises(DataError) as err:
        source.load("train")
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.source.root=" in message


@pytest.mark.parametrize("channels", [1, 3])
def test_shards_round_trip(tmp_path, channels):
    images, labels = small_source(channels=channels).load("test")
    shards = write_shards(tmp_path, "demo", images, labels, shard_size=8, keys=list(range(100, 130)))
    assert [s["name"] for s in shards] == [f"demo-{i:05d}.tar" for i in range(4)]
    assert [s["count"] for s in shards] == [8, 8, 8, 6]
    parts = [read_shard(tmp_path / s["name"], channels) for s in shards]
    back = np.concatenate([p[1] for p in parts])
    assert np.array_equal(back.reshape(images.shape), images)
    assert np.array_equal(np.concatenate([p[2] for p in parts]), labels)
    assert [k for p in parts for k in p[0]] == [f"{i:07d}" for i in range(100, 130)]
    # same data -> byte-identical shards (fixed tar mtime), so sha256 sums are reproducible
    again = write_shards(tmp_path / "..", "again", images, labels, shard_size=8, keys=list(range(100, 130)))
    assert [s["sha256"] for s in again] == [s["sha256"] for s in shards]
    assert write_shards(tmp_path, "empty", images[:0], labels[:0], shard_size=8) == []


# ---------------------------------------------------------------- prepare


def test_prepare_manifest_counts_classes_and_padding(data_dir):
    manifest = load_manifest(data_dir)
    assert data_dir.name == f"synthetic-{manifest['config_hash']}" and len(manifest["config_hash"]) == 12
    assert manifest["forget_classes"] == ["class_0"]
    assert manifest["retain_classes"] == ["class_1", "class_2"]
    assert manifest["proxy_classes"] == ["class_3", "class_4"]  # None -> every other class
    assert manifest["image_size"] == 32 and manifest["channels"] == 1
    assert list(manifest["splits"]) == list(SPLIT_NAMES)
    expected = {"train": 12, "eval": 6}
    source_train, _ = small_source().load("train")
    for split, info in manifest["splits"].items():
        role, part = split.split("_")
        names = manifest[f"{role}_classes"]
        assert info["classes"] == {n: expected[part] for n in names}
        assert info["count"] == expected[part] * len(names) == sum(s["count"] for s in info["shards"])
        keys, images, labels = read_split(data_dir, split)
        # labels are the source's own class indices, and a split holds only its classes
        assert sorted(set(labels.tolist())) == [int(n.split("_")[1]) for n in names]
        assert images.shape == (info["count"], 32, 32, 1)
        assert not images[:, :2].any() and not images[:, -2:].any() and not images[:, :, :2].any()
        if part == "train":  # keys are source indices: the padded image is the source image
            first = int(keys[0])
            assert np.array_equal(images[0, 2:30, 2:30, 0], source_train[first])


def test_prepare_is_deterministic_and_reuses(tmp_path, data_dir, caplog):
    again = small_prepare(tmp_path)
    assert again.name == data_dir.name
    assert load_manifest(again)["splits"] == load_manifest(data_dir)["splits"]  # same shards, same sha256
    stamp = (again / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="i2i_unlearning.data.prepare"):
        assert small_prepare(tmp_path) == again
    assert "reusing" in caplog.text
    assert (again / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == [again.name]  # no temp dirs left


def test_prepare_caps_are_seeded(tmp_path):
    first = small_prepare(tmp_path, train_per_class=5, eval_per_class=3)
    second = small_prepare(tmp_path, train_per_class=5, eval_per_class=3, seed=1)
    assert first != second
    info = load_manifest(first)["splits"]["retain_train"]
    assert info["count"] == 10 and info["classes"] == {"class_1": 5, "class_2": 5}
    assert load_manifest(first)["splits"]["forget_eval"]["count"] == 3
    assert set(read_split(first, "retain_train")[0]) != set(read_split(second, "retain_train")[0])


class _NoLoad(SyntheticSource):
    def load(self, split):
        raise AssertionError("prepare loaded images before validating its arguments")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"forget_classes": ["class_9"]}, ["class_9", "class_0", "valid names"]),
        ({"forget_classes": ["class_1"]}, ["overlap", "class_1"]),
        ({"proxy_classes": ["class_0", "class_3"]}, ["proxy_classes", "class_0"]),
        ({"retain_classes": []}, ["retain_classes", "empty"]),
        ({"image_size": 24}, ["image_size=24", "28"]),
        ({"train_per_class": 0}, ["train_per_class=0"]),
    ],
)
def test_prepare_rejects_bad_arguments_before_loading(tmp_path, kwargs, words):
    with pytest.raises(ConfigError) as err:
        small_prepare(tmp_path, source=_NoLoad(num_classes=5), **kwargs)
    for word in words:
        assert word in str(err.value)
    assert not any(tmp_path.iterdir())


class _Crashes(SyntheticSource):
    def load(self, split):
        if split == "test":
            raise RuntimeError("disk fell off")
        return super().load(split)


def test_prepare_crash_leaves_no_data_dir(tmp_path):
    with pytest.raises(RuntimeError, match="disk fell off"):
        small_prepare(tmp_path, source=_Crashes(num_classes=5, per_class_train=12, per_class_test=6))
    assert all(p.suffix == ".lock" for p in tmp_path.iterdir())  # no data dir, no temp dir: the lock only


def test_empty_proxy_split_and_empty_stream(tmp_path):
    data = small_prepare(tmp_path, source=small_source(num_classes=3))
    manifest = load_manifest(data)
    assert manifest["proxy_classes"] == [] and manifest["splits"]["proxy_train"] == {
        "count": 0,
        "classes": {},
        "shards": [],
    }
    with pytest.raises(ConfigError, match="'proxy' has no samples"):
        make_dm(data, streams={"forget": ["forget_train"], "proxy": ["proxy_train"]})


def test_corrupt_or_missing_shard_fails_fast(tmp_path, data_dir):
    broken = Path(shutil.copytree(data_dir, tmp_path / data_dir.name))
    shard = broken / load_manifest(broken)["splits"]["retain_train"]["shards"][1]["name"]
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{shard.name}.*corrupt"):
        make_dm(broken)
    make_dm(broken, streams={"forget": ["forget_train"]})  # other splits still load
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard.name}.*missing.*re-run prepare"):
        verify_shards(broken, load_manifest(broken), ["retain_train"])
    (broken / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json is missing"):
        make_dm(broken)


# ---------------------------------------------------------------- degradation


def test_eval_task_geometry():
    half, quarter, outpaint = (
        eval_mask(t, 32, patch=4) for t in ("center_half", "center_quarter", "outpaint_half")
    )
    for mask in (half, quarter, outpaint):
        assert mask.shape == (1, 1, 32, 32) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert half.sum() == 16 * 16 and half[0, 0, 8:24, 8:24].all()
    assert quarter.sum() == 8 * 8 and quarter[0, 0, 12:20, 12:20].all()
    assert outpaint.sum() == 32 * 32 - 16 * 16 and not outpaint[0, 0, 8:24, 8:24].any()
    assert torch.equal(outpaint, 1 - center_mask(32, 0.5)) and torch.equal(outpaint, outpaint_mask(32, 0.5))
    assert set(EVAL_TASKS) == {"center_half", "center_quarter", "outpaint_half"}
    with pytest.raises(ConfigError, match="center_half"):
        eval_mask("center_third", 32)
    with pytest.raises(ConfigError, match="not aligned"):
        eval_mask("center_quarter", 28, patch=4)  # hole of 7 px at offset 10


def test_outpaint_border_tasks():
    thin, half = eval_mask("outpaint_border_0.125", 32, patch=4), eval_mask("outpaint_border_0.25", 32, patch=4)
    assert thin.sum() == 32 * 32 - 24 * 24 and not thin[0, 0, 4:28, 4:28].any() and thin[0, 0, :4].all()
    assert torch.equal(half, eval_mask("outpaint_half", 32, patch=4))
    for bad in ("outpaint_border_0.5", "outpaint_border_x", "outpaint_border_-0.1"):
        with pytest.raises(ConfigError, match="0 < r < 0.5"):
            eval_mask(bad, 32)


def test_random_patch_mask_equal_counts_and_alignment():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        mask = random_patch_mask(16, 32, 4, (0.5, 0.9), generator=g)
        assert mask.shape == (16, 1, 32, 32)
        patches = mask.unfold(2, 4, 4).unfold(3, 4, 4)  # (B,1,8,8,4,4)
        assert torch.equal(patches.amax(dim=(-1, -2)), patches.amin(dim=(-1, -2)))  # whole patches only
        counts = patches[..., 0, 0].sum(dim=(1, 2, 3))
        assert (counts == counts[0]).all() and 0.5 * 64 - 0.5 <= counts[0] <= 0.9 * 64 + 0.5
        assert len({tuple(m.flatten().tolist()) for m in mask}) > 1  # different patches per sample
    assert random_patch_mask(3, 32, 4, (0.25, 0.25)).sum(dim=(1, 2, 3)).eq(16 * 16).all()
    a = random_patch_mask(4, 32, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, random_patch_mask(4, 32, 4, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ConfigError):
        random_patch_mask(4, 30, 4)
    blocks = random_block_mask(8, 32, 4, generator=g)
    counts = blocks.sum(dim=(1, 2, 3))
    assert blocks.shape == (8, 1, 32, 32) and (counts > 0).all() and (counts == counts[0]).all()
    assert len({tuple(m.flatten().tolist()) for m in blocks}) > 1  # positions differ per sample
    kept = random_block_mask(8, 32, 4, keep=True, generator=torch.Generator().manual_seed(3))
    assert (kept.sum(dim=(1, 2, 3)) >= 32 * 32 - 24 * 24).all()  # only a block of <= 3/4 side is known
    kinds = {train_mask(2, 32, 4, (0.5, 0.5), generator=torch.Generator().manual_seed(s)).sum().item()
             for s in range(12)}
    assert len(kinds) > 1
    with pytest.raises(ConfigError, match="swirl"):
        train_mask(2, 32, 4, (0.5, 0.5), kinds=("swirl",))


def test_noise_image_statistics_and_fill():
    g = torch.Generator().manual_seed(0)
    images = (0.4 + 0.1 * torch.randn(8, 1, 32, 32, generator=g)).clamp(0, 1)
    noise = noise_image(images, "normal", generator=g)
    assert noise.shape == images.shape and 0.0 <= noise.min() and noise.max() <= 1.0
    assert abs(noise.mean() - images.mean()) < 0.01 and abs(noise.std() - images.std()) < 0.01
    assert not torch.equal(noise, images)
    uniform = noise_image(images, "uniform", generator=g)
    assert 0.0 <= uniform.min() and uniform.max() <= 1.0 and abs(uniform.mean() - 0.5) < 0.02
    constant = noise_image(images, "constant")
    assert torch.allclose(constant, torch.full_like(images, images.mean().item()))
    with pytest.raises(ConfigError, match="normal"):
        noise_image(images, "pink")

    mask = center_mask(32, 0.5).expand(8, -1, -1, -1)
    hole, known = mask.bool().expand_as(images), ~mask.bool().expand_as(images)
    for how, value in (("grey", 0.5), ("zero", 0.0)):
        out = fill(images, mask, how)
        assert torch.equal(out[known], images[known]) and (out[hole] == value).all()
    noisy = fill(images, mask, "noise", generator=g)
    assert torch.equal(noisy[known], images[known]) and abs(noisy[hole].mean() - images.mean()) < 0.02
    with pytest.raises(ConfigError, match="grey"):
        fill(images, mask, "blur")


# ---------------------------------------------------------------- datamodule


def test_stream_batches(data_dir):
    dm = make_dm(data_dir)
    assert (dm.image_size, dm.channels, dm.num_classes) == (32, 1, 5)
    assert dm.class_names == [f"class_{i}" for i in range(5)]
    loader = dm.train_dataloader()
    iter(loader)  # a CombinedLoader knows its length once iterated (lazy: this starts nothing)
    assert len(loader) == 3
    batches = epoch(loader)
    assert len(batches) == 3
    allowed = {"forget": {0}, "retain": {1, 2}}
    for batch in batches:
        assert set(batch) == {"forget", "retain"}
        for name, part in batch.items():
            assert set(part) == {"image", "label", "mask", "key"}
            assert part["image"].shape == (6, 1, 32, 32) and part["image"].dtype == torch.float32
            assert 0.0 <= part["image"].min() and part["image"].max() <= 1.0 and part["image"].max() > 0.5
            assert part["label"].dtype == torch.int64 and set(part["label"].tolist()) <= allowed[name]
            assert part["mask"].shape == (6, 1, 32, 32) and part["mask"].dtype == torch.float32
            counts = part["mask"].sum(dim=(1, 2, 3))
            assert (counts == counts[0]).all()
            assert len(part["key"]) == 6 and all(len(k) == 7 for k in part["key"])
    retain_labels = torch.cat([b["retain"]["label"] for b in batches])
    assert set(retain_labels.tolist()) == {1, 2}


def test_streams_take_their_own_batch_sizes(data_dir):
    batches = epoch(make_dm(data_dir, batch_size={"forget": 3, "retain": 5}).train_dataloader())
    assert [(b["forget"]["image"].shape[0], b["retain"]["image"].shape[0]) for b in batches] == [(3, 5)] * 3
    with pytest.raises(ConfigError, match="batch size 0 for stream 'forget'"):
        make_dm(data_dir, batch_size={"retain": 5})


def test_single_stream_is_still_keyed_by_name(data_dir):
    dm = make_dm(
        data_dir, streams={"train": ["forget_train", "retain_train", "proxy_train"]}, epoch_batches=4
    )
    batches = epoch(dm)
    assert len(batches) == 4 and all(set(b) == {"train"} for b in batches)
    assert len(set(torch.cat([b["train"]["label"] for b in batches]).tolist())) >= 3


def test_same_seed_same_batches_and_resume(data_dir):
    first, second = make_dm(data_dir, seed=3), make_dm(data_dir, seed=3)
    loader = first.train_dataloader()
    a1 = epoch(loader)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    a2 = epoch(loader)
    b1 = epoch(second)
    assert same_batches(a1, b1)
    assert not same_batches(a1, a2)  # a new epoch draws new shards, order and masks
    assert not same_batches(a1, epoch(make_dm(data_dir, seed=4)))
    resumed = make_dm(data_dir, seed=3)
    resumed.load_state_dict(state)
    assert same_batches(a2, epoch(resumed))


def test_every_image_is_drawn_equally_often(data_dir):
    shards = load_manifest(data_dir)["splits"]["forget_train"]["shards"]
    assert [s["count"] for s in shards] == [10, 2]
    small = set(read_shard(data_dir / shards[1]["name"], 1)[0])
    batches = epoch(make_dm(data_dir, streams={"forget": ["forget_train"]}, epoch_batches=40))
    keys = [k for b in batches for k in b["forget"]["key"]]
    rate_small = sum(k in small for k in keys) / len(small)
    rate_large = sum(k not in small for k in keys) / 10
    # whole shards are read per draw, so a size-weighted shard choice would starve the 2-image shard
    assert 0.5 < rate_small / rate_large < 2


def test_ranks_draw_different_data_with_equal_epochs(data_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    runs = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        runs.append(epoch(make_dm(data_dir, epoch_batches=5)))
    assert [len(r) for r in runs] == [5, 5]  # a fixed epoch length: no rank waits on another
    keys = [[k for b in r for k in b["retain"]["key"]] for r in runs]
    assert keys[0] != keys[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_streams_share_mask_shape_not_positions(data_dir, workers):
    """Step k of the forget and retain streams hides as many patches (one batched MAE call), at
    different positions; the hidden count still varies from step to step."""
    dm = make_dm(data_dir, num_workers=workers, epoch_batches=6, mask_kinds=("patches", "block"),
                 shared_mask_shape=True)
    batches = epoch(dm)
    hidden = []
    for b in batches:
        f, r = (b[s]["mask"].sum(dim=(1, 2, 3)) for s in ("forget", "retain"))
        assert torch.equal(f, r)
        hidden.append(int(f[0]))
    assert not all(torch.equal(b["forget"]["mask"], b["retain"]["mask"]) for b in batches)
    assert len(set(hidden)) > 1
    default = epoch(make_dm(data_dir, num_workers=workers, epoch_batches=6, mask_kinds=("patches", "block")))
    assert any(b["forget"]["mask"].sum() != b["retain"]["mask"].sum() for b in default)  # off: drawn apart


def test_worker_processes_are_deterministic(data_dir):
    runs = [epoch(make_dm(data_dir, num_workers=2, epoch_batches=4)) for _ in range(2)]
    assert len(runs[0]) == 4 and same_batches(runs[0], runs[1])


def test_stream_validation(data_dir):
    with pytest.raises(ConfigError, match="unknown split 'forget_test'.*forget_train"):
        make_dm(data_dir, streams={"forget": ["forget_test"]})
    with pytest.raises(ConfigError, match="patch=5"):
        make_dm(data_dir, patch=5)


def test_eval_batches_fixed_order_and_mask(data_dir):
    dm = make_dm(data_dir)
    keys, images, labels = read_split(data_dir, "retain_eval")
    batches = list(dm.eval_batches("retain_eval", "center_half", batch_size=5))
    assert [len(b["key"]) for b in batches] == [5, 5, 2]
    assert [k for b in batches for k in b["key"]] == keys
    got = torch.cat([b["image"] for b in batches])
    assert torch.equal(got, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.from_numpy(labels))
    expected = eval_mask("center_half", 32, 4)
    assert all(torch.equal(m, expected[0]) for b in batches for m in b["mask"])
    again = [k for b in dm.eval_batches("retain_eval", "center_half", batch_size=5) for k in b["key"]]
    assert again == keys
    limited = list(dm.eval_batches("forget_eval", "outpaint_half", batch_size=4, limit=5))
    assert [len(b["key"]) for b in limited] == [4, 1]
    with pytest.raises(ConfigError, match="center_half"):
        dm.eval_batches("retain_eval", "nope")
    with pytest.raises(ConfigError, match="retain_eval"):
        dm.eval_batches("retain_test", "center_half")


def test_lightning_fit_sees_every_epoch_and_resumes(data_dir, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["forget"]["key"] + batch["retain"]["key"])
            return self.layer(batch["forget"]["image"].mean().view(1, 1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(epochs):
        return L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    dm, model = make_dm(data_dir), Probe()
    trainer(2).fit(model, datamodule=dm)
    assert len(model.seen) == 6 and dm.state_dict() == {"epochs": {"forget": 2, "retain": 2}}
    reference = make_dm(data_dir).train_dataloader()
    expected = [b["forget"]["key"] + b["retain"]["key"] for b in epoch(reference) + epoch(reference)]
    assert model.seen == expected  # Lightning's probing iter() used up no epoch

    # stop after one epoch, resume from the checkpoint: the second epoch sees the same data
    first = trainer(1)
    first.fit(Probe(), datamodule=make_dm(data_dir))
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Probe()
    trainer(2).fit(resumed, datamodule=make_dm(data_dir), ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.seen == expected[3:]


@pytest.mark.skipif(
    not FMNIST_ROOT.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_fashion_mnist_prepare_small(tmp_path):
    data = prepare(
        FashionMNISTSource(str(FMNIST_ROOT)),
        tmp_path,
        forget_classes=["coat"],
        retain_classes=["sandal", "bag"],
        train_per_class=8,
        eval_per_class=4,
    )
    manifest = load_manifest(data)
    assert manifest["dataset"] == "fashion_mnist" and manifest["proxy_classes"][0] == "t_shirt_top"
    assert manifest["splits"]["retain_train"]["classes"] == {"sandal": 8, "bag": 8}
    assert manifest["splits"]["proxy_eval"]["count"] == 7 * 4
    _, images, labels = read_split(data, "forget_train")
    assert images.shape == (8, 32, 32, 1) and set(labels.tolist()) == {4}
    assert images[:, 2:30, 2:30].mean() > 20 and not images[:, :2].any()
