"""CIFAR-10 for the GAN: the binary reader on synthetic files in the exact layout, its checks, and the
cascade end to end on data=cifar10 (class) and data=cifar10_items (item) at tiny size."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from i2i_unlearning import cli, gan_runner
from i2i_unlearning.data.prepare import load_manifest, prepare
from i2i_unlearning.data.sources import CIFAR10Source
from i2i_unlearning.errors import DataError
from i2i_unlearning.families.gan import DCGAN
from i2i_unlearning.runs import run_dir

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_FILE, TEST_RECORDS = 20, 20
PATTERN_FILE, PATTERN_ROW, PATTERN_LABEL = 2, 3, 7  # data_batch_2.bin, record 3: train index 23


def pattern() -> np.ndarray:
    """A (32, 32, 3) image whose planes tell channels and axes apart: R = 8 * row, G = 8 * column, B = 200
    with one odd pixel at row 1, column 30."""
    y, x = np.mgrid[0:32, 0:32]
    image = np.stack([8 * y, 8 * x, np.full((32, 32), 200)], axis=-1).astype(np.uint8)
    image[1, 30, 2] = 7
    return image


def record(label: int, image: np.ndarray) -> np.ndarray:
    """One binary record: the label byte, then the R, G and B planes, each row-major."""
    return np.concatenate([[label], image.transpose(2, 0, 1).ravel()]).astype(np.uint8)


def write_cifar(root: Path, seed: int = 0) -> Path:
    """The binary distribution's files in ``root/cifar-10-batches-bin``: 5 x 20 train records, 20 test records,
    2 per class each, random pixels, and the pattern at data_batch_2.bin record 3."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = [(f"data_batch_{i}.bin", PER_FILE) for i in range(1, 6)] + [("test_batch.bin", TEST_RECORDS)]
    for n, (name, count) in enumerate(files, start=1):
        labels = rng.permutation(np.arange(count) % 10)
        rows = [record(int(lab), rng.integers(0, 256, (32, 32, 3))) for lab in labels]
        if n == PATTERN_FILE:
            rows[PATTERN_ROW] = record(PATTERN_LABEL, pattern())
        np.stack(rows).tofile(folder / name)
    (folder / "batches.meta.txt").write_text("\n".join(NAMES) + "\n\n")  # the real file ends in blank lines
    return folder


def file_labels(folder: Path, names: list[str]) -> np.ndarray:
    return np.concatenate([np.fromfile(folder / n, np.uint8).reshape(-1, 3073)[:, 0] for n in names])


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    return root


# ---- the reader ---------------------------------------------------------------------------------------
def test_reader_decodes_labels_channels_and_orientation(cifar_root):
    folder = cifar_root / "cifar-10-batches-bin"
    for root in (cifar_root, folder):  # the folder above cifar-10-batches-bin, or that folder itself
        src = CIFAR10Source(str(root))
        assert src.class_names == NAMES and src.channels == 3 and src.image_size == 32
        (x, y), (xt, yt) = src.load("train"), src.load("test")
        assert x.shape == (100, 32, 32, 3) and x.dtype == np.uint8 and xt.shape == (20, 32, 32, 3)
        assert y.dtype == np.int64
        assert np.array_equal(y, file_labels(folder, [f"data_batch_{i}.bin" for i in range(1, 6)]))
        assert np.array_equal(yt, file_labels(folder, ["test_batch.bin"]))
        i = (PATTERN_FILE - 1) * PER_FILE + PATTERN_ROW
        assert y[i] == PATTERN_LABEL and np.array_equal(x[i], pattern())
        assert x[i, 5, 2].tolist() == [40, 16, 200] and x[i, 1, 30, 2] == 7  # R = 8 * row, G = 8 * column
        assert not np.array_equal(x[i - 1], pattern())  # control: another record differs
    assert src.settings() == {"format": "binary", "records": {**{f"data_batch_{i}.bin": 20 for i in range(1, 6)},
                                                               "test_batch.bin": 20}}


def test_prepared_shards_keep_the_rgb_planes(cifar_root, tmp_path):
    src = CIFAR10Source(str(cifar_root))
    data_dir = prepare(src, tmp_path, forget_classes=[], retain_classes=NAMES, proxy_classes=[], shard_size=16,
                       forget_kind="item", forget_items=[(PATTERN_FILE - 1) * PER_FILE + PATTERN_ROW])
    manifest = load_manifest(data_dir)
    assert manifest["channels"] == 3 and manifest["splits"]["retain_train"]["count"] == 99
    x, y, keys = gan_runner.load_split(data_dir, manifest, "forget_train")
    assert keys == ["0000023"] and y.tolist() == [PATTERN_LABEL]
    expected = torch.from_numpy(pattern()).permute(2, 0, 1).float() / 255.0
    assert x.shape == (1, 3, 32, 32) and torch.equal(x[0], expected)


@pytest.mark.parametrize(("name", "damage"), [("data_batch_3.bin", "truncate"), ("test_batch.bin", "extend"),
                                              ("data_batch_5.bin", "empty")])
def test_a_file_of_the_wrong_size_fails_naming_it(tmp_path, name, damage):
    folder = write_cifar(tmp_path)
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes({"truncate": raw[:-1], "extend": raw + b"\0", "empty": b""}[damage])
    with pytest.raises(DataError, match=rf"{name}.*multiple of 3073"):
        CIFAR10Source(str(tmp_path)).settings()


@pytest.mark.parametrize("name", ["data_batch_4.bin", "test_batch.bin", "batches.meta.txt"])
def test_a_missing_file_fails_naming_it(tmp_path, name):
    folder = write_cifar(tmp_path)
    (folder / name).unlink()
    with pytest.raises(DataError, match=rf"{name} is missing.*data.source.root"):
        CIFAR10Source(str(tmp_path)).settings()


def test_bad_class_list_and_bad_label_fail_naming_the_file(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "batches.meta.txt").write_text("\n".join(NAMES[:9]))
    with pytest.raises(DataError, match="batches.meta.txt names 9 classes"):
        CIFAR10Source(str(tmp_path)).settings()
    (folder / "batches.meta.txt").write_text("\n".join(NAMES))
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[3073] = 10  # the second record's label byte
    (folder / "test_batch.bin").write_bytes(bytes(raw))
    src = CIFAR10Source(str(tmp_path))
    assert len(src.load("train")[0]) == 100
    with pytest.raises(DataError, match="test_batch.bin has label 10"):
        src.load("test")


def test_a_truncated_file_fails_the_run_before_any_data_work(tmp_path):
    folder = write_cifar(tmp_path / "cifar")
    (folder / "data_batch_1.bin").write_bytes((folder / "data_batch_1.bin").read_bytes()[:5000])
    cfg = compose_cfg(tiny_overrides(tmp_path, "gan", "cascaded", extra=["data=cifar10",
                                                                          f"data.source.root={tmp_path / 'cifar'}"]))
    with pytest.raises(DataError, match="data_batch_1.bin is 5000 bytes"):
        cli.main(cfg)
    assert not (tmp_path / "cache").exists()  # nothing prepared, nothing trained


# ---- the GAN on 32 px RGB ------------------------------------------------------------------------------
def test_dcgan_generates_and_scores_rgb_images():
    torch.manual_seed(0)
    model = DCGAN(channels=3, width=8).eval()
    samples = model.sample(5)
    assert samples.shape == (5, 3, 32, 32) and 0.0 <= samples.min() and samples.max() <= 1.0
    assert model.score(samples).shape == (5,)


@pytest.mark.parametrize(("data", "extra"), [("cifar10", []), ("cifar10_items", ["data.forget_item_count=8"])])
def test_cascade_runs_end_to_end_on_cifar10(shared_tmp, cifar_root, data, extra):
    cfg = compose_cfg(tiny_overrides(shared_tmp, "gan", "cascaded", extra=[
        f"data={data}", f"data.source.root={cifar_root}", *extra]))
    assert cfg.model.channels == 3 and cfg.model.image_size == 32
    cli.main(cfg)
    run = run_dir(cfg)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["dataset"] == data
    metrics = m["metrics"]
    keys = ["forget_class_share", "forget_fid"] if data == "cifar10" else ["mia_auc", "retrain_mia_auc"]
    for key in ("retain_fid", "retain_is", "downstream_acc", "speedup", *keys):
        assert np.isfinite(metrics[key]), key
    assert 0.0 <= m["feature_net_test_acc"] <= 1.0  # the feature net trained on the RGB images
    assert m["forget_kind"] == ("class" if data == "cifar10" else "item")
    assert (run / "grid.png").exists() and (run / "checkpoint.pt").exists()


def test_gan_cifar10_preset_is_a_32px_rgb_dcgan(tmp_path):
    cfg = compose_cfg(["experiment=gan_cifar10", "data=cifar10_items"])
    assert (cfg.model.name, cfg.data.name, cfg.model.channels, cfg.model.image_size) == ("gan", "cifar10_items", 3, 32)
    assert (cfg.model.width, cfg.model.train.batch_size, cfg.model.train.lr) == (128, 128, 2e-4)
    assert compose_cfg(["experiment=gan_cifar10"]).data.forget_classes == ["automobile"]
