"""The paper's layout: per family / dataset / task, rows = methods, columns = metrics per split as
mean ± std over seeds -> paper_table.md (the paper's columns) and paper_table.csv (long form, every metric)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from i2i_unlearning.atomic import write_text
from i2i_unlearning.errors import DataError
from i2i_unlearning.report.summary import MD_METRICS, METHOD_ORDER, collect

Group = tuple[str, str, str]  # (family, dataset, task)
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
_NOT_METRICS = {"seed"}


def method_rank(method: Any) -> tuple[int, str]:
    """Sort key: the methods of METHOD_ORDER in that order, then any other method by name."""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, str(method)


def group_of(row: dict[str, Any]) -> Group | None:
    """(family, dataset, task) of a row, or None when the run cannot be attributed (no family / method)."""
    if not row.get("family") or not row.get("method"):
        return None
    return str(row["family"]), str(row.get("dataset") or "?"), str(row.get("task") or "?")


def _config_task(run: Path) -> str | None:
    try:
        task = OmegaConf.load(run / "config.yaml").get("task")
    except Exception:  # a missing or unreadable config leaves the task unknown; the caller falls back
        return None
    return str(task) if task else None


def load_rows(root: Path) -> list[dict[str, Any]]:
    """summary.collect(root), with the task of failed runs (their metrics.json has none) filled in from
    the run's config.yaml, or else from the only task its family and dataset were run on."""
    root = Path(root)
    rows = collect(root)
    for row in rows:
        if not row.get("task") and row.get("run_dir"):
            row["task"] = _config_task(root / row["run_dir"])
    tasks: dict[tuple, set[str]] = {}
    for row in rows:
        if row.get("task"):
            tasks.setdefault((row.get("family"), row.get("dataset")), set()).add(row["task"])
    for row in rows:
        known = tasks.get((row.get("family"), row.get("dataset")), set())
        if not row.get("task") and len(known) == 1:
            row["task"] = next(iter(known))
    return rows


def group_label(group: Group, groups: Iterable[Group]) -> str:
    """File-name label `<family>_<dataset>`, plus `_<task>` when that family and dataset ran several tasks."""
    family, dataset, task = group
    tasks = {g[2] for g in groups if g[:2] == (family, dataset)}
    return f"{family}_{dataset}" + (f"_{task}" if len(tasks) > 1 else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seed_key(seed: Any) -> tuple:
    return (0, seed, "") if _is_number(seed) else (1, 0, str(seed))


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    return {
        "mean": statistics.fmean(values) if n else None,
        "std": statistics.stdev(values) if n >= 2 else None,
        "n": n,
    }


def _metric_order(keys: Iterable[str]) -> list[str]:
    keys = set(keys)
    return [k for k in MD_METRICS if k in keys] + sorted(keys - set(MD_METRICS))


def aggregate(rows: list[dict[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    """Per group, one entry per method (METHOD_ORDER first): ok seeds, failed count, and per numeric metric
    its mean, sample std (n >= 2) and n over the ok runs. Failed runs are counted, never averaged.

    Every group lists the union of the metrics found in its ok runs, so a method whose runs all failed
    still appears (n = 0)."""
    by_group: dict[Group, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        group = group_of(row)
        if group is not None:
            by_group.setdefault(group, {}).setdefault(str(row["method"]), []).append(row)
    out: dict[Group, list[dict[str, Any]]] = {}
    for group in sorted(by_group):
        methods = by_group[group]
        ok_rows = [r for runs in methods.values() for r in runs if r.get("status") == "ok"]
        metrics = _metric_order(
            k for r in ok_rows for k, v in r.items() if _is_number(v) and k not in _NOT_METRICS
        )
        entries = []
        for method in sorted(methods, key=method_rank):
            ok = [r for r in methods[method] if r.get("status") == "ok"]
            entries.append({
                "method": method,
                "seeds": sorted((r["seed"] for r in ok), key=_seed_key),
                "failed": len(methods[method]) - len(ok),
                "metrics": {
                    m: _stats([float(r[m]) for r in ok if _is_number(r.get(m))]) for m in metrics
                },
            })
        out[group] = entries
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def format_cell(stats: dict[str, Any], n_runs: int) -> str:
    """`mean ± std` (n >= 2), `mean` (one seed), `-` (none); `(n=k)` when fewer runs had the metric."""
    if not stats["n"]:
        return "-"
    text = _fmt(stats["mean"]) + (f" ± {_fmt(stats['std'])}" if stats["n"] >= 2 else "")
    return text + (f" (n={stats['n']})" if stats["n"] != n_runs else "")


def format_paper_markdown(table: dict[Group, list[dict[str, Any]]], unattributed: int = 0) -> str:
    """paper_table.md: one section per family / dataset / task with the paper's columns."""
    parts = [
        "# Paper table",
        "",
        "Cells: mean ± sample std over the ok seeds (a single seed: the mean alone); `n`: ok seeds;",
        "`failed`: runs of that method that failed (listed in summary.md), never averaged.",
        "Arrows give the better direction; retrain (trained without the forget classes) is the target.",
    ]
    for (family, dataset, task), entries in table.items():
        header = ["method", "n", "failed", *MD_HEADERS.values()]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for e in entries:
            n = len(e["seeds"])
            cells = [
                format_cell(e["metrics"][m], n) if m in e["metrics"] else "-" for m in MD_HEADERS
            ]
            lines.append("| " + " | ".join([e["method"], str(n), str(e["failed"]), *cells]) + " |")
        parts += ["", f"## {family} · {dataset} · {task}", "", *lines]
    if unattributed:
        parts += ["", f"{unattributed} run(s) without a family or method are left out (see summary.md)."]
    return "\n".join(parts) + "\n"


def paper_csv_text(table: dict[Group, list[dict[str, Any]]]) -> str:
    """paper_table.csv: long form, one line per (family, dataset, task, method, metric)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for (family, dataset, task), entries in table.items():
        for e in entries:
            for metric, s in e["metrics"].items():
                writer.writerow([
                    family, dataset, task, e["method"], metric,
                    "" if s["mean"] is None else repr(s["mean"]),
                    "" if s["std"] is None else repr(s["std"]),
                    s["n"], e["failed"],
                ])
    return buffer.getvalue()


def write_paper_table(root: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write paper_table.md and paper_table.csv for the runs below `root` into `out_dir` (default `root`)."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    rows = load_rows(root)
    if not rows:
        raise DataError(f"report: no metrics.json below {root}; pass a sweep dir whose runs have finished")
    table = aggregate(rows)
    unattributed = sum(group_of(r) is None for r in rows)
    md_path, csv_path = out_dir / "paper_table.md", out_dir / "paper_table.csv"
    write_text(md_path, format_paper_markdown(table, unattributed))
    write_text(csv_path, paper_csv_text(table))
    return md_path, csv_path


def lowest_seed_runs(root: Path, filename: str) -> dict[str, tuple[Group, list[tuple[str, Any, Path]]]]:
    """Per group (keyed by its group_label), (method, seed, file) of the ok run with the lowest seed that
    has `filename` in its run dir, one per method, in METHOD_ORDER (others after, by name)."""
    root = Path(root)
    rows = load_rows(root)
    groups = {g for g in map(group_of, rows) if g is not None}
    picked: dict[Group, dict[str, tuple[Any, Path]]] = {}
    for row in rows:
        group, path = group_of(row), root / str(row.get("run_dir")) / filename
        if group is None or row.get("status") != "ok" or not path.is_file():
            continue
        methods = picked.setdefault(group, {})
        best = methods.get(row["method"])
        if best is None or _seed_key(row["seed"]) < _seed_key(best[0]):
            methods[row["method"]] = (row["seed"], path)
    return {
        group_label(group, groups): (group, [(m, *methods[m]) for m in sorted(methods, key=method_rank)])
        for group, methods in sorted(picked.items())
    }
