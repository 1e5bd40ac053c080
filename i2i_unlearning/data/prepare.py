"""Split a source's classes into forget / retain / proxy x train / eval and write them as shards + manifest.

The data dir is named by a hash of every setting that changes its content, written beside its final
place and moved there atomically, so it is built once, reused by every run, and never left half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from i2i_unlearning.atomic import locked, share
from i2i_unlearning.data.shards import ShardWriter, write_shards
from i2i_unlearning.data.sources import ImageSource
from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.hashing import stable_hash
from i2i_unlearning.names import check_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROLES = ("forget", "retain", "proxy")
SPLIT_NAMES = tuple(f"{role}_{part}" for role in ROLES for part in ("train", "eval"))
VAL_PER_CLASS = 16  # validation images per forget / retain class when data.val_per_class is unset
_SOURCE_SPLIT = {"train": "train", "eval": "test"}


def load_manifest(data_dir: str | Path) -> dict:
    """Read `data_dir/manifest.json`; DataError if it is missing or unreadable."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"{path} is missing: {data_dir} is not a prepared data dir. Run prepare to build it "
            "(if the dir is left over from an interrupted run, delete it first)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); delete {data_dir} and re-run prepare") from exc
    for name, split in manifest.get("splits", {}).items():  # the counts a run plans its steps by must add up
        counts = {"count": split.get("count"), "its shards' counts": sum(s["count"] for s in split.get("shards", [])),
                  "its classes' counts": sum(split.get("classes", {}).values())}
        if len(set(counts.values())) != 1:
            raise DataError(f"{path}: split {name!r} does not add up ({counts}); the manifest was edited or "
                            f"damaged: delete {data_dir} and re-run prepare")
    return manifest


def _as_names(value: Sequence[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def draw_classes(
    source: ImageSource, forget: Sequence[str] | None, retain: Sequence[str] | None,
    forget_count: int | None, retain_count: int | None, seed: int,
) -> tuple[list[str], list[str], dict | None]:
    """(forget, retain, draw record): a list left null is drawn with ``seed`` from the classes not named
    elsewhere (``forget_count`` / ``retain_count`` classes, uniformly, forget first); record None when
    both lists are given. The paper: ImageNet 100 + 100 of 1000 classes, Places 50 + 50."""
    forget, retain = (None if forget is None else _as_names(forget)), (None if retain is None else _as_names(retain))
    if forget is not None and retain is not None:
        return forget, retain, None
    for role, names, count in (("forget", forget, forget_count), ("retain", retain, retain_count)):
        if names is None and (count is None or count < 1):
            raise ConfigError(
                f"data.{role}_classes is null, so it is drawn: set data.num_{role}_classes to a positive "
                f"number of classes (got {count}), or list the classes"
            )
    valid = list(source.class_names)
    taken = set(forget or []) | set(retain or [])
    pool = [c for c in valid if c not in taken]
    need = (forget_count if forget is None else 0) + (retain_count if retain is None else 0)
    if need > len(pool):
        raise ConfigError(
            f"drawing {need} classes (num_forget_classes={forget_count}, num_retain_classes={retain_count}) "
            f"but {source.name} has only {len(pool)} classes left to draw from ({len(valid)} in all)"
        )
    drawn = [pool[i] for i in np.random.default_rng([seed, 104729]).permutation(len(pool))[:need]]
    record = {"seed": seed, "drawn": [r for r, names in (("forget", forget), ("retain", retain)) if names is None],
              "num_forget_classes": forget_count, "num_retain_classes": retain_count}
    if forget is None:
        forget, drawn = drawn[:forget_count], drawn[forget_count:]
    if retain is None:
        retain = drawn[:retain_count]
    return forget, retain, record


def _resolve_classes(
    source: ImageSource, forget: Sequence[str], retain: Sequence[str], proxy: Sequence[str] | None,
    allow_empty_forget: bool = False,
) -> dict[str, list[str]]:
    """Validate the class lists and return them in the source's class order; proxy None = the rest."""
    valid = list(source.class_names)
    lists = {"forget": _as_names(forget), "retain": _as_names(retain)}
    if proxy is not None:
        lists["proxy"] = _as_names(proxy)
    for role, names in lists.items():
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ConfigError(
                f"unknown class {unknown} in {role}_classes of {source.name}; valid names: {valid}"
            )
    for role in ("retain",) if allow_empty_forget else ("forget", "retain"):
        if not lists[role]:
            raise ConfigError(f"{role}_classes is empty; name at least one class of {source.name}: {valid}")
    overlap = set(lists["forget"]) & set(lists["retain"])
    if overlap:
        raise ConfigError(
            f"forget_classes and retain_classes overlap in {sorted(overlap, key=valid.index)}; "
            "a class is either forgotten or retained, never both"
        )
    if proxy is None:
        lists["proxy"] = [n for n in valid if n not in lists["forget"] and n not in lists["retain"]]
    overlap = set(lists["proxy"]) & (set(lists["forget"]) | set(lists["retain"]))
    if overlap:
        raise ConfigError(
            f"proxy_classes overlap the forget or retain classes in {sorted(overlap, key=valid.index)}; "
            "proxy classes must be neither forgotten nor retained"
        )
    return {role: [n for n in valid if n in set(names)] for role, names in lists.items()}


def _check_sizes(
    source: ImageSource,
    image_size: int,
    train_per_class: int | None,
    eval_per_class: int | None,
    shard_size: int,
    seed: int,
    proxy_caps: dict | None = None,
) -> None:
    proxy_caps = proxy_caps or {}
    if image_size < source.image_size:
        raise ConfigError(
            f"image_size={image_size} is smaller than the {source.image_size}-pixel images of {source.name}; "
            f"use image_size >= {source.image_size} (images are zero-padded, never cropped)"
        )
    for name, cap in (("train_per_class", train_per_class), ("eval_per_class", eval_per_class)):
        if cap is not None and cap < 1:
            raise ConfigError(f"{name}={cap}: use a positive number of images per class, or null for all")
    for name, cap in proxy_caps.items():
        if cap is not None and cap < 0:
            raise ConfigError(f"{name}={cap}: use a number of images per proxy class >= 0, or null")
    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size}: use a positive number of samples per shard")
    if seed < 0:
        raise ConfigError(f"seed={seed}: use a non-negative integer seed")


def _pad(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (N,H,W[,C]) images, centred, to (N,size,size[,C])."""
    h, w = images.shape[1:3]
    if h > size or w > size:
        raise ConfigError(
            f"image_size={size} is smaller than the source's {h}x{w} images; use image_size >= {max(h, w)}"
        )
    out = np.zeros((len(images), size, size, *images.shape[3:]), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = images
    return out


def _select(
    labels: np.ndarray, classes: list[int], cap: int | None, seed: int, split_index: int
) -> np.ndarray:
    """Indices of the chosen classes, each capped to `cap` by a seeded draw, in a seeded random order."""
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if cap is not None and cap < len(idx):
            idx = np.sort(np.random.default_rng([seed, split_index, c]).choice(idx, cap, replace=False))
        chosen.append(idx)
    indices = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return np.random.default_rng([seed, split_index]).permutation(indices)


def _check_item_settings(
    kind: str, forget_classes: Sequence[str] | None, keys: Sequence[int] | None, count: int | None
) -> dict | None:
    """None for class unlearning; for item unlearning the validated {"keys", "count"} of the forget set."""
    if kind == "class":
        return None
    if kind != "item":
        raise ConfigError(f"data.forget_kind={kind!r}: use 'class' (whole classes) or 'item' (training images)")
    if _as_names(forget_classes):
        raise ConfigError(
            f"data.forget_kind=item forgets training images, not classes, but forget_classes={list(forget_classes)}; "
            "set data.forget_classes=[] and list the classes in play as retain_classes"
        )
    if (keys is None) == (count is None):
        raise ConfigError(
            f"data.forget_kind=item needs exactly one of forget_items (image keys) and forget_item_count "
            f"(a seeded draw); got forget_items={keys}, forget_item_count={count}"
        )
    if count is not None and count < 1:
        raise ConfigError(f"data.forget_item_count={count}: use a positive number of training images")
    if keys is not None and (not keys or len(set(keys)) != len(keys) or min(keys) < 0):
        raise ConfigError(f"data.forget_items={list(keys)}: list distinct non-negative image keys (at least one)")
    return {"keys": None if keys is None else sorted(int(k) for k in keys), "count": count}


def _item_split(train: np.ndarray, items: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(forget, retain) indices of the training images `train`: the listed keys, or a seeded draw of `count`.

    Keys are the source's train indices (the shard keys). Retain is every other training image.
    """
    if items["keys"] is not None:
        forget = np.asarray(items["keys"], dtype=np.int64)
        missing = sorted(set(forget.tolist()) - set(train.tolist()))
        if missing:
            raise ConfigError(
                f"data.forget_items lists keys {missing[:10]} that are not training images of the retained "
                f"classes (train keys lie in [0, {int(train.max())}]); list keys of training images"
            )
    else:
        if items["count"] >= len(train):
            raise ConfigError(
                f"data.forget_item_count={items['count']} leaves no retain images ({len(train)} training images)"
            )
        forget = np.random.default_rng([seed, 7919]).choice(train, items["count"], replace=False)
    is_forget = np.isin(train, forget)
    return train[is_forget], train[~is_forget]


def config_kwargs(d) -> dict:
    """`prepare` keyword arguments of a Hydra data config (``cfg.data``): the class split and, for item
    unlearning (``forget_kind: item``), the forgotten items. Keys absent from a config take their defaults."""
    def names(value):
        return None if value is None else list(value)

    kind = d.get("forget_kind", "class")
    items = names(d.get("forget_items"))
    return dict(
        forget_kind=kind, forget_items=items,
        forget_item_count=d.get("forget_item_count") if kind == "item" and items is None else None,
        forget_classes=names(d.forget_classes), retain_classes=names(d.retain_classes),
        proxy_classes=names(d.proxy_classes), image_size=d.image_size, train_per_class=d.train_per_class,
        eval_per_class=d.eval_per_class, shard_size=d.shard_size, seed=d.get("split_seed", 0),
        proxy_per_class=d.get("proxy_per_class"), proxy_eval_per_class=d.get("proxy_eval_per_class"),
        num_forget_classes=d.get("num_forget_classes"), num_retain_classes=d.get("num_retain_classes"),
        class_seed=d.get("class_seed", 0), workers=d.get("num_workers", 0),
    )


def _is_current(data_dir: Path, hash12: str) -> bool:
    try:
        return load_manifest(data_dir).get("config_hash") == hash12
    except DataError:
        return False


def check_split_config(
    source: ImageSource, forget_classes: list[str] | None, retain_classes: list[str] | None,
    proxy_classes: list[str] | None = None, image_size: int = 32, train_per_class: int | None = None,
    eval_per_class: int | None = None, shard_size: int = 2000, seed: int = 0, forget_kind: str = "class",
    forget_items: Sequence[int] | None = None, forget_item_count: int | None = None,
    proxy_per_class: int | None = None, proxy_eval_per_class: int | None = None,
    num_forget_classes: int | None = None, num_retain_classes: int | None = None, class_seed: int = 0,
    workers: int = 0,
) -> tuple[dict | None, dict[str, list[str]], dict | None]:
    """Validate `prepare`'s settings against the source's class list, without loading an image or making a
    directory; returns (item settings or None, the class lists in source order, the class draw or None)."""
    items = _check_item_settings(forget_kind, forget_classes, forget_items, forget_item_count)
    draw = None
    if items is None:
        forget_classes, retain_classes, draw = draw_classes(
            source, forget_classes, retain_classes, num_forget_classes, num_retain_classes, class_seed)
        classes = _resolve_classes(source, forget_classes, retain_classes, proxy_classes)
    else:  # item unlearning: every named class is retained, the forget set is a set of its images
        classes = _resolve_classes(source, [], retain_classes, proxy_classes, allow_empty_forget=True)
    proxy_caps = {"proxy_per_class": proxy_per_class, "proxy_eval_per_class": proxy_eval_per_class}
    _check_sizes(source, image_size, train_per_class, eval_per_class, shard_size, seed, proxy_caps)
    return items, classes, draw


def prepare(
    source: ImageSource,
    out_root: str | Path,
    forget_classes: list[str],
    retain_classes: list[str],
    proxy_classes: list[str] | None = None,
    image_size: int = 32,
    train_per_class: int | None = None,
    eval_per_class: int | None = None,
    shard_size: int = 2000,
    seed: int = 0,
    forget_kind: str = "class",
    forget_items: Sequence[int] | None = None,
    forget_item_count: int | None = None,
    proxy_per_class: int | None = None,
    proxy_eval_per_class: int | None = None,
    num_forget_classes: int | None = None,
    num_retain_classes: int | None = None,
    class_seed: int = 0,
    workers: int = 0,
) -> Path:
    """Build (or reuse) the data dir `out_root/{source.name}-{hash12}` and return its path.

    Train splits come from the source's train split and eval splits from its test split, capped per
    class by a seeded draw and zero-padded to image_size. Shard labels are the source's class indices.
    `forget_kind="item"` forgets training images instead of classes (see `_item_split`).
    Everything is validated before any image is loaded.

    Class unlearning: a null ``forget_classes`` / ``retain_classes`` is drawn with ``class_seed``
    (``num_forget_classes`` / ``num_retain_classes`` classes, see `draw_classes`; the draw is saved in
    the manifest). ``proxy_per_class`` / ``proxy_eval_per_class`` cap the proxy splits (null: as
    ``train_per_class`` / ``eval_per_class``; 0: empty). Image-folder sources (those with ``index``) are
    streamed: only the selected files are decoded, by ``workers`` processes (never part of the hash).
    """
    items, classes, draw = check_split_config(
        source, forget_classes, retain_classes, proxy_classes, image_size, train_per_class, eval_per_class,
        shard_size, seed, forget_kind, forget_items, forget_item_count, proxy_per_class, proxy_eval_per_class,
        num_forget_classes, num_retain_classes, class_seed, workers)
    proxy_caps = {"proxy_per_class": proxy_per_class, "proxy_eval_per_class": proxy_eval_per_class}
    config = {
        "format": FORMAT_VERSION,
        "source": {"name": source.name, **source.settings()},
        "classes": classes,
        "image_size": image_size,
        "train_per_class": train_per_class,
        "eval_per_class": eval_per_class,
        "shard_size": shard_size,
        "seed": seed,
    }
    if items is not None:  # class-kind configs keep the hash they always had
        config["forget_items"] = items
    config.update({k: v for k, v in proxy_caps.items() if v is not None})  # new settings: only when set
    hash12 = stable_hash(config)
    check_name(source.name, "data.source.name")  # a path component of the data dir
    caps = {"train": {"forget": train_per_class, "retain": train_per_class,
                      "proxy": train_per_class if proxy_per_class is None else proxy_per_class},
            "eval": {"forget": eval_per_class, "retain": eval_per_class,
                     "proxy": eval_per_class if proxy_eval_per_class is None else proxy_eval_per_class}}

    def build(tmp: Path) -> dict:
        manifest = _build(source, tmp, classes, image_size, caps, shard_size, seed, items, workers)
        if draw is not None:
            manifest["class_draw"] = draw
        return manifest

    return _build_once(Path(out_root) / f"{source.name}-{hash12}", hash12, build)


def _build_once(data_dir: Path, hash12: str, build) -> Path:
    """``data_dir`` as ``build(tmp)`` writes it (shards, and the manifest it returns), built once under a lock in
    a temporary dir beside it and moved there atomically; reused when its manifest has ``hash12``."""
    out_root = data_dir.parent
    with locked(out_root / f".{data_dir.name}.lock", f"the data {data_dir.name}"):  # built once, others wait
        for orphan in out_root.glob(f".{data_dir.name}.tmp-*"):  # a killed preparation's: nobody else builds now
            log.info("removing %s, left by an interrupted preparation", orphan)
            shutil.rmtree(orphan, ignore_errors=True)
        if data_dir.exists():
            if _is_current(data_dir, hash12):
                log.info("reusing prepared data %s", data_dir)
                return data_dir
            raise DataError(
                f"{data_dir} exists but its manifest.json is missing or belongs to other settings; "
                "delete that dir and re-run prepare"
            )

        log.info("preparing data %s", data_dir)
        out_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.tmp-", dir=out_root))
        share(tmp, directory=True)
        try:
            manifest = build(tmp)
            manifest["config_hash"] = hash12
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            try:
                os.replace(tmp, data_dir)
            except OSError:
                if not _is_current(data_dir, hash12):
                    raise
                log.info("reusing prepared data %s (built concurrently by another process)", data_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared data %s", data_dir)
    return data_dir


def prepare_validation(source: ImageSource, out_root: str | Path, val_per_class: int, **kwargs) -> Path:
    """The validation data dir of the data dir ``prepare(source, out_root, **kwargs)`` returns (prepared first
    when missing): splits ``forget_val`` and ``retain_val`` of ``val_per_class`` images per forget / retain class,
    drawn (seeded) from the source's test images that the eval selection did not take.

    Disjoint from the evaluation images by construction and never a training image; the data dir itself, its
    feature network and the reference models trained on it are untouched (the same hash). Cached beside it as
    ``<data dir>-val<N>``. A class with fewer spare test images than ``val_per_class`` is a ConfigError.
    """
    if kwargs.get("forget_kind", "class") != "class":
        raise ConfigError("data.val_per_class (method.val_every): a validation split is drawn for class unlearning "
                          "only (data.forget_kind=class); drop method.val_every and method.stop_at")
    if not isinstance(val_per_class, int) or isinstance(val_per_class, bool) or val_per_class < 2:
        raise ConfigError(f"data.val_per_class={val_per_class!r}: use an integer >= 2 (FID needs two images)")
    data_dir = prepare(source, out_root, **kwargs)
    base = load_manifest(data_dir)
    hash12 = stable_hash({"format": FORMAT_VERSION, "data": base["config_hash"], "val_per_class": val_per_class})
    seed, cap, size = int(base["seed"]), kwargs.get("eval_per_class"), int(base["image_size"])

    def build(tmp: Path) -> dict:
        from i2i_unlearning.data.image_folder import ParallelDecoder

        names = list(source.class_names)
        streamed = hasattr(source, "index")
        if streamed:
            paths, labels = source.index("test")
        else:
            images, labels = source.load("test")
        splits = {}
        with ParallelDecoder(kwargs.get("workers", 0) if streamed else 0) as decode:
            for role in ("forget", "retain"):
                classes = [names.index(n) for n in base[f"{role}_classes"]]
                taken = _select(labels, classes, cap, seed, SPLIT_NAMES.index(f"{role}_eval"))
                indices = _spare(labels, classes, taken, val_per_class, seed, names, cap)
                split = f"{role}_val"
                if streamed:
                    indices, shards, _ = _stream_split(source, "test", paths, labels, indices, split, tmp, size,
                                                       kwargs.get("shard_size", 2000), decode)
                else:
                    shards = write_shards(tmp, split, _pad(images[indices], size), labels[indices],
                                          kwargs.get("shard_size", 2000), keys=indices.tolist())
                splits[split] = {"count": int(len(indices)),
                                 "classes": {n: int(np.sum(labels[indices] == names.index(n)))
                                             for n in base[f"{role}_classes"]},
                                 "shards": shards}
        return {"dataset": base["dataset"], "class_names": names, "channels": base["channels"], "image_size": size,
                "forget_classes": base["forget_classes"], "retain_classes": base["retain_classes"],
                "proxy_classes": [], "splits": splits, "seed": seed, "val_per_class": val_per_class,
                "data_dir": data_dir.name}

    return _build_once(data_dir.with_name(f"{data_dir.name}-val{val_per_class}"), hash12, build)


def _spare(labels: np.ndarray, classes: list[int], taken: np.ndarray, per_class: int, seed: int,
           names: list[str], cap: int | None) -> np.ndarray:
    """``per_class`` indices of each class in ``classes`` outside ``taken``, by a seeded draw, in a seeded order."""
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        spare = np.setdiff1d(idx, taken)
        if len(spare) < per_class:
            raise ConfigError(
                f"data.val_per_class={per_class}: class {names[c]} has {len(idx)} test images and the eval split "
                f"takes {len(idx) - len(spare)} of them (data.eval_per_class={cap}); lower data.val_per_class or "
                f"set data.eval_per_class to at most {len(idx) - per_class}"
            )
        chosen.append(np.sort(np.random.default_rng([seed, 7907, c]).choice(spare, per_class, replace=False)))
    return np.random.default_rng([seed, 7907]).permutation(np.concatenate(chosen))


def _build(
    source: ImageSource,
    out_dir: Path,
    classes: dict[str, list[str]],
    image_size: int,
    caps: dict[str, dict[str, int | None]],
    shard_size: int,
    seed: int,
    items: dict | None = None,
    workers: int = 0,
) -> dict:
    """Write every split's shards into out_dir and return the manifest (without hash).

    Array sources are loaded a split at a time; image-folder sources (with ``index``) are streamed."""
    from i2i_unlearning.data.image_folder import ParallelDecoder

    names = list(source.class_names)
    streamed = hasattr(source, "index")
    splits, corrupt, files = {}, {}, {}
    with ParallelDecoder(workers if streamed else 0) as decode:
        for source_split in ("train", "test"):
            if streamed:
                paths, labels = source.index(source_split)
            else:
                images, labels = source.load(source_split)
            part = "train" if source_split == "train" else "eval"
            chosen = {
                role: _select(labels, [names.index(n) for n in classes[role]], caps[part][role], seed,
                              SPLIT_NAMES.index(f"{role}_{part}"))
                for role in ROLES
            }
            if items is not None and part == "train":
                chosen["forget"], chosen["retain"] = _item_split(chosen["retain"], items, seed)
                forget_keys = sorted(int(k) for k in chosen["forget"])
            for role in ROLES:
                split = f"{role}_{part}"
                indices = chosen[role]
                if streamed:
                    indices, shards, bad = _stream_split(source, source_split, paths, labels, indices, split,
                                                         out_dir, image_size, shard_size, decode)
                    if bad:
                        corrupt[split] = bad
                    files[split] = {f"{int(i):07d}": paths[i] for i in indices}
                else:
                    shards = write_shards(out_dir, split, _pad(images[indices], image_size), labels[indices],
                                          shard_size, keys=indices.tolist())
                split_labels = labels[indices]
                splits[split] = {
                    "count": int(len(indices)),
                    "classes": {
                        n: int(np.sum(split_labels == names.index(n)))
                        for n in (classes["retain"] if items is not None and role == "forget" else classes[role])
                    },
                    "shards": shards,
                }
    manifest = {
        "dataset": source.name,
        "class_names": names,
        "channels": source.channels,
        "image_size": image_size,
        "forget_classes": classes["forget"],
        "retain_classes": classes["retain"],
        "proxy_classes": classes["proxy"],
        "splits": {split: splits[split] for split in SPLIT_NAMES},
        "seed": seed,
        **({} if items is None else {"forget_kind": "item", "forget_items": forget_keys}),
    }
    if streamed:  # which file each key came from, and what could not be decoded
        (out_dir / "files.json").write_text(json.dumps(files, indent=0))
        manifest["files"] = "files.json"
        manifest["corrupt"] = corrupt
    return manifest


def _stream_split(source, source_split: str, paths: list[str], labels: np.ndarray, indices: np.ndarray,
                  split: str, out_dir: Path, image_size: int, shard_size: int, decode) -> tuple:
    """Decode the chosen files of an image-folder source in parallel and write them as shards as they come.

    Returns (indices written, shard records, [{"file", "error"}] of corrupt files). A corrupt file is
    logged by name and skipped (``source.on_corrupt == "skip"``) or, after the split is read, fatal."""
    writer = ShardWriter(out_dir, split, shard_size)
    kept, bad = [], []
    results = decode((source.path(source_split, paths[i]) for i in indices), image_size, source.channels)
    for i, (png, error) in tqdm(zip(indices, results, strict=True), total=len(indices), desc=f"decoding {split}",
                                unit="img", disable=None):
        if png is None:
            log.warning("%s: cannot decode %s (%s)", split, source.path(source_split, paths[i]), error)
            bad.append({"file": str(Path(source.dirs[source_split]) / paths[i]), "error": error})
            continue
        writer.add(int(i), png, int(labels[i]))
        kept.append(int(i))
    shards = writer.close()
    if bad and source.on_corrupt == "fail":
        listing = "; ".join(f"{source.root / b['file']} ({b['error']})" for b in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} corrupt image file(s) in {split} of {source.name}: {listing}{more}. Replace or delete "
            "them, or set data.source.on_corrupt=skip to leave them out"
        )
    return np.asarray(kept, dtype=np.int64), shards, bad
