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
    """Write `{split}-{i:05d}.tar` shards of at most `shard_size` samples into out_dir.

    Each sample is {"__key__": "%07d", "png": PNG bytes, "cls": class index}; keys default to the
    running index. Tar headers carry a fixed mtime so the same data gives byte-identical shards.
    Returns [{"name", "count", "sha256"}] in write order (empty for an empty split).
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size}: use a positive number of samples per shard")
    if len(images) != len(labels):
        raise ConfigError(f"write_shards({split!r}): {len(images)} images but {len(labels)} labels")
    keys = range(len(images)) if keys is None else keys
    out_dir = Path(out_dir)
    shards = []
    with tqdm(total=len(images), desc=f"writing {split}", unit="img", disable=None) as progress:
        for shard_index, start in enumerate(range(0, len(images), shard_size)):
            path = out_dir / f"{split}-{shard_index:05d}.tar"
            stop = min(start + shard_size, len(images))
            with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as sink:
                for i in range(start, stop):
                    sink.write(
                        {
                            "__key__": f"{keys[i]:07d}",
                            "png": encode_png(images[i]),
                            "cls": b"%d" % int(labels[i]),
                        }
                    )
            shards.append({"name": path.name, "count": stop - start, "sha256": sha256_file(path)})
            progress.update(stop - start)
    return shards


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
    """Incremental `{split}-{i:05d}.tar` shards of at most `shard_size` already-encoded PNG samples.

    The streaming counterpart of `write_shards` (same sample format, same fixed tar mtime): samples are
    added one by one, a shard is closed and checksummed as soon as it is full, so memory holds one sample.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ConfigError(f"shard_size={shard_size}: use a positive number of samples per shard")
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, shard_size
        self.shards: list[dict] = []
        self._sink = self._stream = self._path = None
        self._count = 0

    def add(self, key: int, png: bytes, label: int) -> None:
        """Append one sample ({"__key__": "%07d", "png", "cls"})."""
        if self._sink is None:
            self._path = self.out_dir / f"{self.split}-{len(self.shards):05d}.tar"
            self._stream = open(self._path, "wb")  # closed in _close_shard
            self._sink = wds.TarWriter(self._stream, encoder=False, mtime=0)
        self._sink.write({"__key__": f"{int(key):07d}", "png": png, "cls": b"%d" % int(label)})
        self._count += 1
        if self._count == self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        self._sink.close()
        self._stream.close()
        self.shards.append({"name": self._path.name, "count": self._count, "sha256": sha256_file(self._path)})
        self._sink = self._stream = self._path = None
        self._count = 0

    def close(self) -> list[dict]:
        """Close the last shard; returns [{"name", "count", "sha256"}] in write order."""
        if self._sink is not None:
            self._close_shard()
        return self.shards
