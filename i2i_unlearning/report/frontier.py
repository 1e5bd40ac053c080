"""Trade-off frontiers and robustness over class splits, from a sweep's runs and their config.yaml.

Every ok run is a point in the plane of two ratios to the original model of its family, data set, task and
class split (same seed, or the only one): forget change ``forget_fid_x`` (forget FID / the original's; up is
forgetting) and retain cost ``retain_fid_x`` (retain FID / the original's; 1 is free). The original sits at
(1, 1); retrain at its own ratios. ``dist_to_retrain_xy`` is the Euclidean distance to retrain's point in that
plane divided by the original's distance to it: 0 = retrain's trade-off, 1 = as far as the untouched original.
``gap_share`` is the share of the original -> retrain forget-FID gap a run closes:
(forget FID - original's) / (retrain's - original's), None when retrain does not move forget FID.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from i2i_unlearning.atomic import write_text
from i2i_unlearning.report.figures import save_frontier
from i2i_unlearning.report.summary import REFERENCE, RETRAIN, csv_text, format_value, markdown_table, method_rank
from i2i_unlearning.report.tables import attributed, load_runs

GROUP = ["family", "dataset", "task", "split"]
SETTING = ["alpha", "steps"]
POINT_COLUMNS = ["family", "dataset", "task", "split", "method", "alpha", "steps", "seed", "forget_fid", "retain_fid",
                 "forget_fid_x", "retain_fid_x", "gap_share", "dist_to_retrain_xy", "run_dir"]


def split_label(data: Any) -> str:
    """The class split of a data config: ``class_seed=K`` (with the counts) when a class list is drawn, else
    the forget classes as listed."""
    forget, retain = data.get("forget_classes"), data.get("retain_classes")
    if forget is None or retain is None:
        return (f"class_seed={data.get('class_seed', 0)} ({data.get('num_forget_classes')} forget, "
                f"{data.get('num_retain_classes')} retain)")
    return "forget " + ",".join(map(str, forget))


def run_settings(run: Path) -> dict[str, Any]:
    """``alpha``, ``steps`` (the method's, None where it has none) and ``split`` of a run dir's config.yaml."""
    try:
        cfg = OmegaConf.load(run / "config.yaml")
    except Exception:  # no or unreadable config: the run has no known setting
        return {"alpha": None, "steps": None, "split": None}
    data = cfg.get("data")
    return {"alpha": OmegaConf.select(cfg, "method.alpha"), "steps": OmegaConf.select(cfg, "method.steps"),
            "split": split_label(data) if data is not None else None}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _match(row: dict, refs: list[dict]) -> dict | None:
    same = [r for r in refs if all(r[k] == row[k] for k in GROUP)]
    exact = [r for r in same if r["seed"] == row["seed"]]
    return exact[0] if exact else (same[0] if len(same) == 1 else None)


def _ratio(value: Any, base: Any) -> float | None:
    value, base = _number(value), _number(base)
    return value / base if value is not None and base else None


def load_points(root: Path) -> pd.DataFrame:
    """Every ok run below ``root`` with its setting, split, ratios to the original, gap share and distance to
    retrain (POINT_COLUMNS); ratios are None without a matching original (and retrain for the last two)."""
    root = Path(root)
    runs = attributed(load_runs(root))
    rows = [{**row, **run_settings(root / str(row["run_dir"]))}
            for row in runs[runs["status"].eq("ok")].to_dict("records")]
    originals = [r for r in rows if r["method"] == REFERENCE]
    retrains = [r for r in rows if r["method"] == RETRAIN]
    for row in rows:
        orig, rt = _match(row, originals), _match(row, retrains)
        row["forget_fid_x"] = _ratio(row.get("forget_fid"), orig and orig.get("forget_fid"))
        row["retain_fid_x"] = _ratio(row.get("retain_fid"), orig and orig.get("retain_fid"))
        row["gap_share"] = row["dist_to_retrain_xy"] = None
        if orig is None or rt is None or None in (row["forget_fid_x"], row["retain_fid_x"]):
            continue
        rt_f, rt_r = _ratio(rt.get("forget_fid"), orig["forget_fid"]), _ratio(rt.get("retain_fid"), orig["retain_fid"])
        if rt_f is None or rt_r is None:
            continue
        if rt_f != 1.0:
            row["gap_share"] = (row["forget_fid_x"] - 1.0) / (rt_f - 1.0) + 0.0  # + 0.0: no -0.0
        span = math.hypot(1.0 - rt_f, 1.0 - rt_r)
        if span > 0:
            row["dist_to_retrain_xy"] = math.hypot(row["forget_fid_x"] - rt_f, row["retain_fid_x"] - rt_r) / span
    return pd.DataFrame(rows, columns=POINT_COLUMNS, dtype=object)


def _trained(points: pd.DataFrame) -> pd.DataFrame:
    return points[~points["method"].isin([REFERENCE, RETRAIN])]


def has_settings(points: pd.DataFrame) -> bool:
    """Whether some method ran at more than one (alpha, steps) in one family / data set / task / split."""
    trained = _trained(points).astype({"alpha": str, "steps": str, "split": str})
    return bool((trained.groupby([*GROUP, "method"])[SETTING].nunique().max(axis=1) > 1).any())


def has_splits(points: pd.DataFrame) -> bool:
    """Whether the runs of one family / data set / task differ in their class split."""
    return bool((points.astype({"split": str}).groupby(GROUP[:3])["split"].nunique() > 1).any())


def _setting_text(row: Any) -> str:
    return f"alpha {format_value(row['alpha'])}, steps {format_value(row['steps'])}"


def frontier_table(points: pd.DataFrame, retain_budget: float = 1.1) -> pd.DataFrame:
    """Per group and method: its points, the best forget_fid_x among those with retain_fid_x <= ``retain_budget``
    (and where), and the smallest dist_to_retrain_xy (and where); '-' where no point qualifies."""
    rows = []
    for key, part in _trained(points).groupby(GROUP, sort=False, dropna=False):
        for method, runs in sorted(part.groupby("method"), key=lambda item: method_rank(item[0])):
            runs = runs.to_dict("records")
            within = [r for r in runs if r["retain_fid_x"] is not None and r["retain_fid_x"] <= retain_budget
                      and r["forget_fid_x"] is not None]
            best = max(within, key=lambda r: r["forget_fid_x"], default=None)
            near = min((r for r in runs if r["dist_to_retrain_xy"] is not None),
                       key=lambda r: r["dist_to_retrain_xy"], default=None)
            rows.append({
                **dict(zip(GROUP, key, strict=True)), "method": method, "points": len(runs),
                f"best forget_fid_x at retain_fid_x <= {retain_budget:g}": best and best["forget_fid_x"],
                "its retain_fid_x": best and best["retain_fid_x"], "at": best and _setting_text(best),
                "min dist_to_retrain_xy": near and near["dist_to_retrain_xy"],
                "closest at": near and _setting_text(near),
            })
    return pd.DataFrame(rows, dtype=object)  # object: a missing best stays None ('-'), not NaN


def _reference_lines(points: pd.DataFrame, group: tuple) -> list[str]:
    refs = points[points["method"].eq(RETRAIN) & (points[GROUP] == pd.Series(group, index=GROUP)).all(axis=1)]
    return [f"- retrain (seed {r['seed']}): forget_fid_x {format_value(r['forget_fid_x'])}, retain_fid_x "
            f"{format_value(r['retain_fid_x'])}" for r in refs.to_dict("records")]


def write_frontier(root: Path, out_dir: Path | None = None, retain_budget: float = 1.1) -> list[Path]:
    """frontier.png (per group: forget change against retain cost, every run a point, each method's points
    joined in alpha order per step count, original and retrain marked), frontier.md (frontier_table) and
    frontier.csv (the points) for the runs below ``root``."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    points = load_points(root)
    table = frontier_table(points, retain_budget)
    parts = ["# Trade-off frontier", "",
             f"Per method over its points (alpha x steps): the best forget FID ratio to the original among the points "
             f"with retain FID ratio <= {retain_budget:g}, and the smallest distance to retrain in the (forget_fid_x, "
             "retain_fid_x) plane, in units of the original's distance to retrain (0 = retrain, 1 = the original)."]
    groups = []
    for key, part in table.groupby(GROUP, sort=False, dropna=False):
        parts += ["", f"## {' · '.join(map(str, key))}", "", markdown_table(part.drop(columns=GROUP)), "",
                  *_reference_lines(points, key)]
        groups.append((" · ".join(map(str, key[:2])) + f"\n{key[3]}", _panel(points, key)))
    md, csv = out_dir / "frontier.md", out_dir / "frontier.csv"
    write_text(md, "\n".join(parts) + "\n")
    write_text(csv, csv_text(points))
    return [save_frontier(out_dir / "frontier.png", groups, retain_budget), md, csv]


def _panel(points: pd.DataFrame, group: tuple) -> pd.DataFrame:
    part = points[(points[GROUP] == pd.Series(group, index=GROUP)).all(axis=1)]
    return part[part["forget_fid_x"].notna() & part["retain_fid_x"].notna()]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return format_value(mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{format_value(mean)} ± {format_value(std)}"


def splits_table(points: pd.DataFrame, gap_share: float = 0.5, retain_budget: float = 1.25) -> pd.DataFrame:
    """Per family / data set / task and method setting (retrain included): each headline number averaged over
    a split's seeds, then mean ± sample std over the splits, and on how many splits the method closes at least
    ``gap_share`` of the forget-FID gap at retain_fid_x <= ``retain_budget``."""
    rows = []
    keys = ["forget_fid_x", "retain_fid_x", "gap_share", "dist_to_retrain_xy"]
    trained = points[~points["method"].eq(REFERENCE)].assign(
        **{k: points[k].map(lambda v: "-" if v is None else str(v)) for k in SETTING})
    for key, part in trained.groupby([*GROUP[:3], "method", *SETTING], sort=False):
        per_split = {}
        for split, runs in part.groupby("split", dropna=False):
            per_split[split] = {k: _mean([r[k] for r in runs.to_dict("records")]) for k in keys}
        holds = sum(s["gap_share"] is not None and s["gap_share"] >= gap_share and s["retain_fid_x"] is not None
                    and s["retain_fid_x"] <= retain_budget for s in per_split.values())
        rows.append({**dict(zip([*GROUP[:3], "method", *SETTING], key, strict=True)), "splits": len(per_split),
                     **{k: _mean_std([s[k] for s in per_split.values() if s[k] is not None]) for k in keys},
                     "holds": f"{holds}/{len(per_split)}"})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values([*GROUP[:3], "method", *SETTING], key=_order, kind="stable", ignore_index=True)


def _order(column: pd.Series) -> pd.Series:
    """Sort key: methods in METHOD_ORDER, settings by value ('-' first), anything else as text."""
    if column.name == "method":
        return column.map(method_rank)
    if column.name in SETTING:
        return column.map(lambda v: (0, 0.0) if v == "-" else (1, float(v)))
    return column.map(str)


def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in (_number(x) for x in values) if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def write_splits(root: Path, out_dir: Path | None = None, gap_share: float = 0.5,
                 retain_budget: float = 1.25) -> list[Path]:
    """splits.md: splits_table of the runs below ``root``, the splits it covers and how to read it."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    points = load_points(root)
    table = splits_table(points, gap_share, retain_budget)
    parts = ["# Robustness over class splits", "",
             "Cells: mean ± sample std over the class splits (each split's seeds averaged first). `gap_share`: "
             "share of the original -> retrain forget-FID gap closed (none on a split where retrain does not move "
             "forget FID); `dist_to_retrain_xy`: distance to retrain in the (forget_fid_x, retain_fid_x) plane, "
             f"1 = the original's; `holds`: splits with gap_share >= {gap_share:g} at retain_fid_x <= "
             f"{retain_budget:g}."]
    for key, part in table.groupby(GROUP[:3], sort=False):
        splits = sorted(points.loc[(points[GROUP[:3]] == pd.Series(key, index=GROUP[:3])).all(axis=1), "split"]
                        .map(str).unique())
        parts += ["", f"## {' · '.join(map(str, key))}", "", markdown_table(part.drop(columns=GROUP[:3])), "",
                  f"Splits ({len(splits)}): " + "; ".join(splits)]
    md = out_dir / "splits.md"
    write_text(md, "\n".join(parts) + "\n")
    return [md]
