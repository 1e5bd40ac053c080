"""webdataset tar shards: one PNG image and its class index per sample, checked against sha256 sums."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from i2i_unlearning.errors import ConfigError, DataError


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 image (H,W), (H,W,1) or (H,W,3) as PNG ("L" or "RGB")."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """Decode PNG bytes into uint8 (H,W,C) with C = channels (1 or 3)."""
    image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
    array = np.array(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_shards(
    out_dir: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    shard_size: int,
    keys: Sequence[int] | None = None,
) -> list[dict]:
    """Write in-memory images as `{split}-{i:05d}.tar` shards of at most `shard_size` samples (`ShardWriter`);
    keys default to the running index. Returns [{"name", "count", "sha256"}] (empty for an empty split)."""
    if len(images) != len(labels):
        raise ConfigError(f"write_shards({split!r}): {len(images)} images but {len(labels)} labels")
    keys = range(len(images)) if keys is None else keys
    writer = ShardWriter(out_dir, split, shard_size)
    for i in tqdm(range(len(images)), desc=f"writing {split}", unit="img", disable=None):
        writer.add(int(keys[i]), encode_png(images[i]), int(labels[i]))
    return writer.close()


def read_shard(path: Path, channels: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read one shard back in file order: (keys, images uint8 (N,H,W,C), labels int64 (N,))."""
    keys, images, labels = [], [], []
    for sample in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()):
        keys.append(sample["__key__"])
        images.append(decode_png(sample["png"], channels))
        labels.append(int(sample["cls"]))
    return (
        keys,
        np.stack(images) if images else np.zeros((0, 0, 0, channels), np.uint8),
        np.array(labels, np.int64),
    )


def verify_shards(data_dir: Path, manifest: dict, splits: list[str]) -> None:
    """Check that every shard of `splits` exists and matches the manifest's sha256; raise DataError otherwise."""
    data_dir = Path(data_dir)
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = data_dir / shard["name"]
            if not path.is_file():
                raise DataError(
                    f"shard {path} of split {split!r} is missing; delete the data dir {data_dir} and re-run prepare"
                )
            if sha256_file(path) != shard["sha256"]:
                raise DataError(
                    f"shard {path} of split {split!r} is corrupt (sha256 differs from manifest.json); "
                    f"delete the data dir {data_dir} and re-run prepare"
                )


class ShardWriter:
    """`{split}-{i:05d}.tar` shards of at most `shard_size` already-encoded PNG samples, written one by one
    through `webdataset.ShardWriter`: each sample is {"__key__": "%07d", "png", "cls"}, tar headers carry a
    fixed mtime (the same data gives byte-identical shards), and a shard is checksummed once it is closed."""

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ConfigError(f"shard_size={shard_size}: use a positive number of samples per shard")
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, shard_size
        self.shards: list[dict] = []
        self._writer: wds.ShardWriter | None = None  # opened by the first sample: an empty split writes nothing

    def add(self, key: int, png: bytes, label: int) -> None:
        """Append one sample."""
        if self._writer is None:
            self._writer = wds.ShardWriter(str(self.out_dir / f"{self.split}-%05d.tar"), maxcount=self.shard_size,
                                           post=self._record, verbose=0, encoder=False, mtime=0)
        self._writer.write({"__key__": f"{int(key):07d}", "png": png, "cls": b"%d" % int(label)})

    def _record(self, fname: str) -> None:
        path = Path(fname)
        self.shards.append({"name": path.name, "count": self._writer.count, "sha256": sha256_file(path)})

    def close(self) -> list[dict]:
        """Close the last shard; returns [{"name", "count", "sha256"}] in write order."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.shards
