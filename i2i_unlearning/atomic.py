"""Safe files on shared storage: atomic writes (a temp file beside the target, then a rename, so a crash
never leaves a half-written output and a reader never sees one), modes that follow the process umask (a
teammate can read a shared cache), and inter-process locks around whatever is built once and shared."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("i2iu")


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(path: Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would (``mkstemp`` / ``mkdtemp`` make it private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold the inter-process lock ``path`` (a ``.lock`` file) while a block builds or reads ``what``.

    Another process waiting for it says so once. DDP ranks of one job take it on rank 0 only: the other
    ranks follow their rank 0 (they train with it), so they must not wait for it.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, mode=0o666 & ~umask())
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("waiting for %s: another process holds %s", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        share(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def torch_save(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))
