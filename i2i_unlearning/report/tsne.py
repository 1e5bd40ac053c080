"""t-SNE figure: per family / dataset / task, one panel per method of the feature-network embeddings of
its restored outputs and their ground truth, retain and forget (each run's embeddings.npz)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from i2i_unlearning.atomic import write_atomic
from i2i_unlearning.errors import ConfigError, DataError
from i2i_unlearning.report.tables import lowest_seed_runs

EMBEDDINGS_FILE = "embeddings.npz"
# (array in embeddings.npz, legend label, colour, marker)
POINT_GROUPS = (
    ("retain_truth", "retain truth", "tab:blue", "o"),
    ("retain_output", "retain output", "tab:cyan", "x"),
    ("forget_truth", "forget truth", "tab:red", "o"),
    ("forget_output", "forget output", "tab:orange", "x"),
)
MAX_PERPLEXITY = 30.0
TSNE_ITERATIONS = 500


def load_embeddings(path: Path) -> dict[str, np.ndarray]:
    """The four (N, D) arrays of an embeddings.npz, checked: present, 2-D, non-empty, finite, one D."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key], dtype=np.float32) for key in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"t-SNE: cannot read {path}: {exc}; re-run the evaluation to rewrite it") from exc
    keys = [key for key, *_ in POINT_GROUPS]
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise DataError(f"t-SNE: {path} lacks {', '.join(missing)}; it needs the arrays {', '.join(keys)}")
    shapes = {key: arrays[key].shape for key in keys}
    bad = {k: s for k, s in shapes.items() if len(s) != 2 or s[0] == 0}
    dims = {s[1] for s in shapes.values() if len(s) == 2}
    if bad or len(dims) != 1:
        raise DataError(f"t-SNE: {path} has shapes {shapes}; each array must be (N > 0, D) with one D")
    if not all(np.isfinite(arrays[k]).all() for k in keys):
        raise DataError(f"t-SNE: {path} holds NaN or inf embeddings; re-run the evaluation of that run")
    return {key: arrays[key] for key in keys}


def subsample(arrays: dict[str, np.ndarray], max_points: int, seed: int) -> dict[str, np.ndarray]:
    """At most `max_points` rows per array, drawn without replacement (seeded), in their original order."""
    if max_points < 1:
        raise ConfigError(f"t-SNE: max_points={max_points}; pass a positive number of points per group")
    rng = np.random.default_rng(seed)
    out = {}
    for key, array in arrays.items():
        keep = np.sort(rng.choice(len(array), max_points, replace=False)) if len(array) > max_points else None
        out[key] = array if keep is None else array[keep]
    return out


def embed_2d(points: np.ndarray, seed: int) -> np.ndarray:
    """sklearn t-SNE to 2-D, seeded, 500 iterations; perplexity min(30, (n - 1) / 3), at least 1, so it
    fits n points. One OpenMP thread: for ~1000 points threads only add contention (on the project's
    loaded 2-core machine, 800 points took 43 s with 2 threads and 10 s with one) and one thread is
    also deterministic."""
    n = len(points)
    if n < 2:
        raise DataError(f"t-SNE needs at least 2 points, got {n}")
    perplexity = min(MAX_PERPLEXITY, max(1.0, (n - 1) / 3))
    init = "pca" if min(points.shape) >= 2 else "random"
    tsne = TSNE(n_components=2, perplexity=perplexity, init=init, max_iter=TSNE_ITERATIONS, random_state=seed)
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(points.astype(np.float64))


def save_tsne(path: Path, panels: list[tuple[str, dict[str, np.ndarray]]], title: str, seed: int = 0) -> Path:
    """One PNG: a t-SNE scatter per (caption, four arrays) panel, the four point groups in a shared legend."""
    if not panels:
        raise ConfigError("save_tsne needs at least one panel")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * rows + 0.8))
    for i, (caption, arrays) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        xy = embed_2d(np.concatenate([arrays[key] for key, *_ in POINT_GROUPS]), seed)
        start = 0
        for key, label, colour, marker in POINT_GROUPS:
            n = len(arrays[key])
            ax.scatter(*xy[start : start + n].T, s=10, c=colour, marker=marker, alpha=0.6, linewidths=0.8,
                       label=label)
            start += n
        ax.set_title(caption, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(POINT_GROUPS), markerscale=2, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)


def write_tsne(root: Path, out_dir: Path | None = None, max_points: int = 200, seed: int = 0) -> list[Path]:
    """tsne_<family>_<dataset>.png per group whose runs have embeddings.npz (the lowest seed per method,
    at most `max_points` points per point group); [] when no run has one."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    runs = lowest_seed_runs(root, EMBEDDINGS_FILE)
    paths = []
    for label, (group, picked) in runs.items():
        panels: list[tuple[str, Any]] = [
            (f"{method} (seed {s})", subsample(load_embeddings(f), max_points, seed)) for method, s, f in picked
        ]
        title = "t-SNE of feature embeddings: " + " / ".join(group)
        paths.append(save_tsne(out_dir / f"tsne_{label}.png", panels, title, seed))
    return paths
