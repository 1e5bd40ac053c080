"""The paper's layout: per family / dataset / task, rows = methods, columns = metrics per split as
mean ± std over seeds -> paper_table.md (the paper's columns) and paper_table.csv (long form, every metric)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from i2i_unlearning.atomic import write_text
from i2i_unlearning.errors import DataError
from i2i_unlearning.names import safe_label
from i2i_unlearning.report.summary import (
    MD_METRICS,
    collect_frame,
    csv_text,
    format_value,
    is_blank,
    is_number,
    markdown_table,
    numbers,
    ranked,
    sort_key,
)

Group = tuple[str, str, str]  # (family, dataset, task)
GROUP = ["family", "dataset", "task"]
KEYS = [*GROUP, "method"]
CSV_COLUMNS = ("family", "dataset", "task", "method", "metric", "mean", "std", "n", "failed")
# Markdown headers of the paper's columns, with the better direction per split.
MD_HEADERS = {
    "retain_fid": "retain FID ↓",
    "retain_is": "retain IS ↑",
    "retain_cos": "retain cos ↑",
    "retain_class_acc": "retain acc ↑",
    "forget_fid": "forget FID ↑",
    "forget_is": "forget IS ↓",
    "forget_cos": "forget cos ↓",
    "forget_class_acc": "forget acc ↓",
}


def _config_task(run: Path) -> str | None:
    try:
        task = OmegaConf.load(run / "config.yaml").get("task")
    except Exception:  # a missing or unreadable config leaves the task unknown; the caller falls back
        return None
    return str(task) if task else None


def _only(tasks: pd.Series) -> Any:
    return tasks.dropna().iloc[0] if tasks.nunique() == 1 else None


def load_runs(root: Path) -> pd.DataFrame:
    """summary.collect_frame(root), with the task of failed runs (their metrics.json has none) filled in from
    the run's config.yaml, or else from the only task its family and dataset were run on."""
    root = Path(root)
    runs = collect_frame(root)
    task = runs.get("task", pd.Series(index=runs.index, dtype=object)).copy()
    blank = is_blank(task)
    task[blank] = runs.loc[blank, "run_dir"].map(lambda run_dir: _config_task(root / run_dir))
    task = task.where(~is_blank(task))
    only = task.groupby([runs["family"], runs["dataset"]], dropna=False).transform(_only)
    return runs.assign(task=task.fillna(only))


def attributed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with a family and a method, their family / dataset / task / method as text ('?': missing)."""
    runs = runs[~is_blank(runs["family"]) & ~is_blank(runs["method"])]
    return runs.assign(**{key: runs[key].map(str).where(~is_blank(runs[key]), "?") for key in KEYS})


def group_label(group: Group, groups: Iterable[Group]) -> str:
    """File-name label `<family>_<dataset>`, plus `_<task>` when that family and dataset ran several tasks."""
    family, dataset, task = group
    tasks = {g[2] for g in groups if g[:2] == (family, dataset)}
    return safe_label(f"{family}_{dataset}" + (f"_{task}" if len(tasks) > 1 else ""))  # read from metrics.json


def _seed_key(seed: Any) -> tuple:
    return (0, seed, "") if is_number(seed) else (1, 0, str(seed))


def _metric_rank(metric: str) -> tuple[int, str]:
    return (MD_METRICS.index(metric) if metric in MD_METRICS else len(MD_METRICS)), metric


def _order(column: pd.Series) -> pd.Series:
    return ranked(column, _metric_rank) if column.name == "metric" else sort_key(column)


def aggregate(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(methods, stats) of load_runs' frame. methods: per family / dataset / task and method (METHOD_ORDER first)
    its ok `runs` and `failed` runs. stats (paper_table.csv's long form): per method and numeric metric the mean,
    sample std (n >= 2) and n over the ok runs. Failed runs are counted, never averaged.

    Every method lists the union of the metrics found in its group's ok runs, so a method whose runs all
    failed still has them (n = 0)."""
    runs = attributed(runs)
    ok = runs["status"].eq("ok")
    methods = runs[KEYS].assign(runs=ok, failed=~ok).groupby(KEYS, as_index=False)[["runs", "failed"]].sum()
    methods = methods.sort_values(KEYS, key=_order, ignore_index=True)
    values = numbers(runs[ok], KEYS, [column for column in runs if column not in (*KEYS, "seed")])
    by = values.groupby([*KEYS, "metric"])["value"]
    stats = pd.DataFrame({"mean": by.mean(skipna=False), "std": by.std(skipna=False), "n": by.size()})
    union = values[[*GROUP, "metric"]].drop_duplicates()
    stats = methods.merge(union, on=GROUP).merge(stats.reset_index(), on=[*KEYS, "metric"], how="left")
    stats["n"] = stats["n"].fillna(0).astype(int)
    stats["mean"] = stats["mean"].astype(object).where(stats["n"] > 0, None)
    stats["std"] = stats["std"].astype(object).where(stats["n"] > 1, None)
    stats = stats.sort_values([*KEYS, "metric"], key=_order, ignore_index=True)
    return methods, stats[[*CSV_COLUMNS, "runs"]]


def format_cell(stats: Mapping[str, Any], n_runs: int) -> str:
    """`mean ± std` (n >= 2), `mean` (one seed), `-` (none); `(n=k)` when fewer runs had the metric."""
    if not stats["n"]:
        return "-"
    text = format_value(stats["mean"]) + (f" ± {format_value(stats['std'])}" if stats["n"] >= 2 else "")
    return text + (f" (n={stats['n']})" if stats["n"] != n_runs else "")


def format_paper_markdown(methods: pd.DataFrame, stats: pd.DataFrame, unattributed: int = 0) -> str:
    """paper_table.md: one section per family / dataset / task of aggregate's frames, with the paper's columns."""
    parts = [
        "# Paper table",
        "",
        "Cells: mean ± sample std over the ok seeds (a single seed: the mean alone); `n`: ok seeds;",
        "`failed`: runs of that method that failed (listed in summary.md), never averaged.",
        "Arrows give the better direction; retrain (trained without the forget classes) is the target.",
    ]
    shown = stats[stats["metric"].isin(list(MD_HEADERS))]
    cells = shown[[*KEYS, "metric"]].assign(cell=[format_cell(s, s["runs"]) for s in shown.to_dict("records")])
    table = methods.merge(cells.pivot(index=KEYS, columns="metric", values="cell"), on=KEYS, how="left")
    table = table.reindex(columns=[*KEYS, "runs", "failed", *MD_HEADERS], fill_value="-").fillna("-")
    for (family, dataset, task), part in table.rename(columns={"runs": "n", **MD_HEADERS}).groupby(GROUP, sort=False):
        parts += ["", f"## {family} · {dataset} · {task}", "", markdown_table(part.drop(columns=GROUP))]
    if unattributed:
        parts += ["", f"{unattributed} run(s) without a family or method are left out (see summary.md)."]
    return "\n".join(parts) + "\n"


def write_paper_table(root: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write paper_table.md and paper_table.csv for the runs below `root` into `out_dir` (default `root`)."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    runs = load_runs(root)
    if runs.empty:
        raise DataError(f"report: no metrics.json below {root}; pass a sweep dir whose runs have finished")
    methods, stats = aggregate(runs)
    md_path, csv_path = out_dir / "paper_table.md", out_dir / "paper_table.csv"
    write_text(md_path, format_paper_markdown(methods, stats, len(runs) - len(attributed(runs))))
    write_text(csv_path, csv_text(stats[list(CSV_COLUMNS)]))
    return md_path, csv_path


def lowest_seed_runs(root: Path, filename: str) -> dict[str, tuple[Group, list[tuple[str, Any, Path]]]]:
    """Per group (keyed by its group_label), (method, seed, file) of the ok run with the lowest seed that
    has `filename` in its run dir, one per method, in METHOD_ORDER (others after, by name)."""
    root = Path(root)
    runs = attributed(load_runs(root))
    groups = set(runs[GROUP].itertuples(index=False, name=None))
    runs = runs.assign(path=[root / str(run_dir) / filename for run_dir in runs["run_dir"]])
    runs = runs[runs["status"].eq("ok") & runs["path"].map(Path.is_file).astype(bool)]
    picked = runs.sort_values("seed", key=lambda seeds: seeds.map(_seed_key), kind="stable").drop_duplicates(KEYS)
    picked = picked.sort_values(KEYS, key=sort_key)
    return {
        group_label(group, groups): (group, list(part[["method", "seed", "path"]].itertuples(index=False, name=None)))
        for group, part in picked.groupby(GROUP, sort=False)
    }
