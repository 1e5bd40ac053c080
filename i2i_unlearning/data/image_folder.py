"""Class-per-folder image trees (ImageNet, Places-365, any ``root/<split>/<class>/<image>`` layout).

Unlike the array sources in ``sources.py``, an image-folder source is never loaded into memory: it
lists its files (``index``) and ``prepare`` decodes only the selected ones, in parallel worker
processes, each image once: decode, convert to RGB (or grey), resize its shorter side to the prepared
size (bicubic) and centre-crop a square, then encode the shard PNG. A file that cannot be decoded is
reported by its path and skipped or fatal (``on_corrupt``); files whose extension is not an image
extension are ignored.

This module imports no torch; worker processes only decode with PIL.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from i2i_unlearning.data.sources import SPLITS, ImageSource
from i2i_unlearning.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
LAYOUTS = ("flat", "nested")
ON_CORRUPT = ("skip", "fail")


def load_square(path: str | Path, size: int, channels: int) -> np.ndarray:
    """Decode one image file into uint8 (size, size[, 3]): shorter side resized to ``size`` (bicubic),
    then centre-cropped. Raises whatever PIL raises for an unreadable file."""
    with Image.open(path) as img:
        img.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode at a reduced scale >= size
        img = img.convert("RGB" if channels == 3 else "L")
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def png_of_file(job: tuple[str, int, int]) -> tuple[bytes | None, str | None]:
    """Worker task: (path, size, channels) -> (PNG bytes of the square image, None) or (None, error)."""
    path, size, channels = job
    try:
        array = load_square(path, size, channels)
    except Exception as exc:  # any decoder failure means a corrupt file; reported by name
        return None, f"{type(exc).__name__}: {exc}"
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue(), None


class ImageFolderSource(ImageSource):
    """Images in class folders: ``root/<train_dir>/<class>/*.jpg`` and ``root/<eval_dir>/<class>/*.jpg``.

    ``layout="flat"``: every sub-folder of the split dir is a class (ImageNet: the wnid folders
    ``n01440764/`` ...; class names sort as ImageNet's class indices). ``layout="nested"``: every folder
    below the split dir that directly holds image files is a class, named by its path relative to the
    split dir (Places-365: ``a/airfield``, ``a/apartment_building/outdoor``). The classes are those of
    the train dir; the eval dir must use the same names (a class missing there has no eval images).
    The eval dir plays the source's "test" split.
    """

    def __init__(
        self,
        root: str,
        name: str = "image_folder",
        train_dir: str = "train",
        eval_dir: str = "val",
        layout: str = "flat",
        channels: int = 3,
        extensions: list[str] | tuple[str, ...] = IMAGE_EXTENSIONS,
        on_corrupt: str = "skip",
    ):
        if layout not in LAYOUTS:
            raise ConfigError(f"data.source.layout={layout!r}: use one of {list(LAYOUTS)}")
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"data.source.on_corrupt={on_corrupt!r}: use one of {list(ON_CORRUPT)}")
        if channels not in (1, 3):
            raise ConfigError(f"data.source.channels={channels}: use 3 (RGB) or 1 (grey)")
        if root is None or str(root) in ("", "???"):
            raise ConfigError(f"data.source.root is not set for {name}: point it at the folder holding "
                              f"{train_dir}/ and {eval_dir}/")
        self.root = Path(root)
        self.name = name
        self.dirs = {"train": train_dir, "test": eval_dir}
        self.layout = layout
        self.channels = channels
        self.extensions = tuple(sorted({str(e).lower() if str(e).startswith(".") else f".{str(e).lower()}"
                                        for e in extensions}))
        self.on_corrupt = on_corrupt
        self.image_size = 0  # any size: prepare resizes and centre-crops to its image_size
        self._index: dict[str, tuple[list[str], np.ndarray]] = {}
        self._classes: list[str] | None = None

    # ---- listing -------------------------------------------------------------------------
    def _split_dir(self, split: str) -> Path:
        self._check_split(split)
        path = self.root / self.dirs[split]
        if not path.is_dir():
            raise DataError(
                f"{self.name}: the {'training' if split == 'train' else 'evaluation'} folder {path} is missing; "
                f"set data.source.root to the folder holding {self.dirs['train']}/ and {self.dirs['test']}/ "
                "(see README 'Paper-scale runs' for the layout)"
            )
        return path

    def _is_image(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.extensions and not name.startswith(".")

    def _scan(self, split: str) -> dict[str, list[str]]:
        """{class name: sorted image file names relative to the split dir} (os.scandir, no stat per file)."""
        top = self._split_dir(split)
        found: dict[str, list[str]] = {}
        if self.layout == "flat":
            for entry in sorted(os.scandir(top), key=lambda e: e.name):
                if entry.is_dir() and not entry.name.startswith("."):
                    found[entry.name] = sorted(
                        f"{entry.name}/{f.name}" for f in os.scandir(entry.path)
                        if f.is_file() and self._is_image(f.name)
                    )
        else:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                images = sorted(f for f in filenames if self._is_image(f))
                rel = Path(dirpath).relative_to(top).as_posix()
                if images and rel != ".":
                    found[rel] = [f"{rel}/{f}" for f in images]
        return found

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """Class folders of the train dir, sorted (ImageNet wnids sort as the standard class indices)."""
        if self._classes is None:
            classes = sorted(c for c, files in self._scan("train").items() if files)
            if not classes:
                raise DataError(
                    f"{self.name}: no class folder with image files ({', '.join(self.extensions)}) in "
                    f"{self._split_dir('train')} (layout={self.layout!r})"
                )
            self._classes = classes
        return self._classes

    def index(self, split: str) -> tuple[list[str], np.ndarray]:
        """(file paths relative to the split dir, labels int64) of "train" or "test", sorted; labels index
        `class_names`. Folders of the eval dir that are not train classes are ignored."""
        if split not in self._index:
            lookup = {c: i for i, c in enumerate(self.class_names)}
            files, labels = [], []
            for cls, names in self._scan(split).items():
                if cls in lookup:
                    files += names
                    labels += [lookup[cls]] * len(names)
            self._index[split] = files, np.asarray(labels, dtype=np.int64)
        return self._index[split]

    def path(self, split: str, rel: str) -> Path:
        return self.root / self.dirs[split] / rel

    def settings(self) -> dict:
        """What changes the prepared images: the layout, channels and a fingerprint of the file listing with
        each file's size and modification time (paths relative to root, so a tree moved with its times kept
        keeps its prepared shards; a file replaced after preparation makes a new data dir)."""
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update(f"[{self.dirs[split]}]\n".encode())
            for rel in self.index(split)[0]:
                st = os.stat(self.path(split, rel))
                digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return {"layout": self.layout, "channels": self.channels, "dirs": self.dirs,
                "files_sha256": digest.hexdigest()[:16]}

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Not supported: an image tree is streamed by `prepare`, never held in memory."""
        raise ConfigError(f"{self.name} is an image-folder source: prepare streams it (it has no load())")


def _png_batch(jobs: list[tuple[str, int, int]]) -> list[tuple[bytes | None, str | None]]:
    return [png_of_file(job) for job in jobs]


class ParallelDecoder:
    """Decode image files to square PNGs in order, with ``workers`` processes (0: in this process).

    At most ``4 * workers`` chunks of ``chunk`` files are in flight, so memory stays bounded however long
    the file list is. Use as a context manager (the pool is shut down on exit).
    """

    def __init__(self, workers: int = 0, chunk: int = 16):
        if workers < 0:
            raise ConfigError(f"data.num_workers={workers}: use 0 (decode in this process) or more")
        self.workers, self.chunk = int(workers), int(chunk)
        self._pool = None

    def __enter__(self) -> ParallelDecoder:
        if self.workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork where the platform has it, as torch's DataLoader does: workers start at once and need no
            # importable __main__; they only decode with PIL (no torch, no CUDA, no locks of the parent)
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __call__(self, paths, size: int, channels: int):
        """Yield (png bytes or None, error or None) for each path, in order."""
        jobs = ((str(p), size, channels) for p in paths)
        if self._pool is None:
            yield from map(png_of_file, jobs)
            return
        from collections import deque
        from concurrent.futures.process import BrokenProcessPool
        from itertools import islice

        chunks = iter(lambda: list(islice(jobs, self.chunk)), [])
        pending = deque(self._pool.submit(_png_batch, c) for c in islice(chunks, 4 * self.workers))
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool as exc:
                raise DataError(
                    f"an image-decoding worker process died ({exc}); run prepare with data.num_workers=0 to decode "
                    "in this process and see the error"
                ) from None
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(self._pool.submit(_png_batch, nxt))
            yield from results
