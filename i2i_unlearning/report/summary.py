"""Every run's metrics.json below a sweep dir -> summary.csv (one row per run) and summary.md (a table to read)."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from i2i_unlearning.atomic import write_atomic
from i2i_unlearning.errors import DataError
from i2i_unlearning.results import STATUSES

CORE_COLUMNS = (
    "family",
    "method",
    "dataset",
    "seed",
    "status",
    "retain_fid",
    "retain_is",
    "retain_cos",
    "forget_fid",
    "forget_is",
    "forget_cos",
    "retain_class_acc",
    "forget_class_acc",
    "unlearn_s",
)
LAST_COLUMNS = ("error", "run_dir")
METHOD_ORDER = (
    "original",
    "retrain",
    "finetune",
    "ours",
    "ours_proxy",
    "max_loss",
    "noisy_label",
    "retain_label",
    "random_encoder",
    "fake_label",
    "cascaded",
)
REFERENCE = "original"
# Markdown columns: metric, then the comparison to the original (ratio "_x" or difference "_d").
MD_METRICS = (
    "retain_fid",
    "retain_is",
    "retain_cos",
    "retain_class_acc",
    "forget_fid",
    "forget_is",
    "forget_cos",
    "forget_class_acc",
)
COMPARISONS = {
    "forget_fid_x": ("forget_fid", "ratio"),
    "retain_fid_x": ("retain_fid", "ratio"),
    "forget_cos_d": ("forget_cos", "diff"),
    "retain_cos_d": ("retain_cos", "diff"),
    "forget_acc_d": ("forget_class_acc", "diff"),
    "retain_acc_d": ("retain_class_acc", "diff"),
}
FLOOR_KEYS = (
    "forget_class_acc_grey",
    "forget_class_acc_noise",
    "retain_class_acc_grey",
    "retain_class_acc_noise",
)
# Distance to retrain: the metrics (per split) whose gap to the retrain model is scored, and the audit table.
RETRAIN = "retrain"
GAP_METRICS = ("fid", "cos", "class_acc", "mia_auc", "kl", "mi")
AUDIT_MD = (
    "forget_mia_auc",
    "retain_mia_auc",
    "forget_kl",
    "retain_kl",
    "forget_mi",
    "retain_mi",
    "forget_mi_nce",
    "retain_mi_nce",
    "forget_dist_to_retrain",
    "retain_dist_to_retrain",
    "dist_to_retrain",
)
# Verdicts against retrain: the share of the original -> retrain gap a method closes, per metric.
SHARE_METRICS = (
    "forget_fid",
    "forget_cos",
    "forget_class_acc",
    "forget_mia_auc",
    "retain_fid",
    "retain_cos",
    "retain_class_acc",
    "retain_mia_auc",
)
FORGETTING = {"forget_fid": 1, "forget_cos": -1, "forget_class_acc": -1}  # the way forgetting moves each
SPREAD_K = 2.0  # retrain moves a metric when its gap to the original exceeds SPREAD_K x the original's seed std
SINGLE_SEED_REL = 0.02  # with one original seed: when the gap exceeds this share of the original's value
LABELS = {"fid": "FID", "cos": "cosine", "class_acc": "class accuracy", "mia_auc": "membership AUC"}
VERDICT_GROUP = ["family", "dataset", "task"]
_IDENTITY = ("family", "method", "dataset", "seed", "status", "error")
_UNNESTED = ("metrics", "floors")


def snake_case(key: str) -> str:
    """'forgetFID' / 'Forget FID' / 'forget-fid' -> 'forget_fid'."""
    key = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key.strip())
    return re.sub(r"[^0-9a-zA-Z]+", "_", key).strip("_").lower()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of a metrics.json; `metrics` and `floors` lose their name, other dicts prefix their keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, "" if not prefix and key in _UNNESTED else f"{prefix}{key}_"))
        elif value is None or isinstance(value, (str, int, float, bool)):
            flat[snake_case(prefix + key)] = value
    return flat


def _read_run(path: Path, root: Path) -> dict[str, Any]:
    """The flat row of one metrics.json; a corrupt or incomplete file is a failed row naming it."""
    run_dir = path.parent.relative_to(root).as_posix() or "."
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"top level is {type(data).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {"status": "failed", "error": f"unreadable {path}: {exc}", "run_dir": run_dir}
    row = _flatten(data)
    row.update({key: data.get(key) for key in _IDENTITY})
    missing = [key for key in ("family", "method", "dataset", "seed", "status") if data.get(key) is None]
    if missing:
        row["status"] = "failed"
        row["error"] = f"{path} lacks {', '.join(missing)}" + (
            f"; {row['error']}" if row.get("error") else ""
        )
    row["run_dir"] = run_dir
    return row


def last_step(run: Path) -> int | None:
    """The step of the run's resume checkpoint (``resume/last.ckpt``), None without one (or unreadable)."""
    ckpt = run / "resume" / "last.ckpt"
    if not ckpt.is_file():
        return None
    try:
        import torch

        return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # a half-written or foreign file: the row says no step
        return None


def _incomplete_runs(root: Path) -> list[dict[str, Any]]:
    """A row per run dir below ``root`` with a config.yaml and no metrics.json (started, never finished):
    status incomplete, its identity from the config, the step of its last checkpoint."""
    from omegaconf import OmegaConf

    rows = []
    for path in sorted(root.rglob("config.yaml")):
        run = path.parent
        rel = run.relative_to(root)
        if (run / "metrics.json").exists() or any(part.startswith(".") for part in rel.parts):
            continue  # finished, or Hydra's own copy (.hydra/)
        try:
            cfg = OmegaConf.load(path)
            ident = {"family": cfg.model.name, "method": cfg.method.name, "dataset": cfg.data.name,
                     "seed": cfg.seed}
        except Exception as exc:
            rows.append({"status": "incomplete", "error": f"unreadable {path}: {exc}", "run_dir": rel.as_posix()})
            continue
        step = last_step(run)
        where = f"last checkpoint at step {step}" if step is not None else "no checkpoint"
        rows.append({**ident, "status": "incomplete", "last_step": step, "run_dir": rel.as_posix() or ".",
                     "error": f"no metrics.json: started, not finished ({where}); relaunch to resume"})
    return rows


def columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The CSV header: the core columns, every other key sorted, then error and run_dir."""
    fixed = set(CORE_COLUMNS) | set(LAST_COLUMNS)
    extra = sorted({key for row in rows for key in row} - fixed)
    return [*CORE_COLUMNS, *extra, *LAST_COLUMNS]


def frame_of(rows: list[dict[str, Any]], header: Iterable[str] | None = None) -> pd.DataFrame:
    """`rows` as a DataFrame with the `header` columns (default: the CSV's); object dtype keeps every value as
    read: ints stay ints, a missing cell is None and a NaN score stays NaN, so the CSV can tell them apart."""
    header = columns(rows) if header is None else list(header)
    return pd.DataFrame([[row.get(key) for key in header] for row in rows], columns=header, dtype=object)


def is_number(value: Any) -> bool:
    """An int or float score (NaN included), not a bool: what means and stds are taken over."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_blank(values: pd.Series) -> pd.Series:
    """Where an identity cell (family, method, dataset, task) is missing or empty."""
    return values.isna() | values.eq("")


def method_rank(method: Any) -> tuple[int, str]:
    """Sort key: the methods of METHOD_ORDER in that order, then any other method by name."""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, str(method)


def ranked(values: pd.Series, rank: Callable[[str], Any]) -> pd.Series:
    """`values` as text in an ordered categorical whose order is `rank`, blanks as NaN (sorted last)."""
    text = values.where(~is_blank(values)).map(str, na_action="ignore")
    order = sorted(text.dropna().unique(), key=rank)
    return pd.Series(pd.Categorical(text, categories=order, ordered=True), index=values.index)


def sort_key(column: pd.Series) -> pd.Series:
    """`sort_values` key: methods in METHOD_ORDER then by name, int seeds numerically (other seeds after),
    dist_to_retrain as a number, anything else as text; blank cells last."""
    if column.name == "method":
        return ranked(column, method_rank)
    if column.name == "seed":
        return column.map(lambda seed: seed if isinstance(seed, int) else math.inf)
    if column.name == "dist_to_retrain":
        return column.astype(float)
    return column.where(~is_blank(column)).map(str, na_action="ignore")


def collect_frame(root: Path) -> pd.DataFrame:
    """One row per metrics.json below `root` (summary.csv's columns), sorted by family, method (reference order),
    dataset, seed. A corrupt or incomplete metrics.json is a row with status=failed and an error naming the file;
    a run dir with a config.yaml but no metrics.json is a row with status=incomplete (`_incomplete_runs`)."""
    root = Path(root)
    rows = [_read_run(path, root) for path in sorted(root.rglob("metrics.json"))]
    frame = frame_of(rows + _incomplete_runs(root) if rows else [])
    return frame.sort_values(["family", "method", "dataset", "seed", "run_dir"], key=sort_key, ignore_index=True)


def collect(root: Path) -> list[dict[str, Any]]:
    """collect_frame(root) as one dict per run (every column; None where the run lacks it)."""
    return collect_frame(root).to_dict("records")


def numbers(frame: pd.DataFrame, ids: list[str], metrics: Iterable[str]) -> pd.DataFrame:
    """Long form (ids, metric, value) of the numeric cells of `metrics`, what groupby averages: None, text and
    bools are left out, NaN is kept (a NaN score makes its mean NaN rather than vanish)."""
    long = frame.melt(id_vars=ids, value_vars=list(metrics), var_name="metric", value_name="value")
    return long[long["value"].map(is_number).astype(bool)].astype({"value": float})


def _reference(row: dict[str, Any], originals: list[dict[str, Any]]) -> dict[str, Any] | None:
    same = [
        o for o in originals if (o.get("family"), o.get("dataset")) == (row.get("family"), row.get("dataset"))
    ]
    exact = [o for o in same if o.get("seed") == row.get("seed")]
    if exact:
        return exact[0]
    return same[0] if len(same) == 1 else None


def compare_to_original(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `rows` with the ratio ("_x") and difference ("_d") columns against the original model.

    The reference is the ok original of the same family, dataset and seed, or the only ok original of that
    family and dataset; without one the comparison columns are None.
    """
    originals = [r for r in rows if r.get("method") == REFERENCE and r.get("status") == "ok"]
    out = []
    for row in rows:
        ref = _reference(row, originals)
        new = dict(row)
        for name, (metric, kind) in COMPARISONS.items():
            value, base = row.get(metric), ref.get(metric) if ref else None
            if not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
                new[name] = None
            elif kind == "ratio":
                new[name] = value / base if base else None
            else:
                new[name] = value - base
        out.append(new)
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def distance_to_retrain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `rows` with their distance to the retrain model (the target of unlearning).

    References: the ok retrain and original rows of the same family, dataset and seed (or the only ok one
    of that family and dataset). For each split s (forget, retain) and metric k of `GAP_METRICS`:

    * `s_k_rt_d` = value - retrain's value (signed);
    * the normalised gap |value - retrain's| / scale_k, where scale_k = max(|original - retrain| on forget,
      |original - retrain| on retain) for that metric (of the splits both report): the way the original
      model has to go, so 1 means "as far from retrain as the untouched original" and the score does not
      depend on the other rows.
      A metric with a zero or missing scale is left out;
    * `s_dist_to_retrain` = the mean normalised gap over the split's metrics; `dist_to_retrain` = the mean
      over both splits' gaps, the one number that ranks methods (0 = retrain itself; lower is better).

    Without both references (or any usable metric) the columns are None.
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    retrains = [r for r in ok if r.get("method") == RETRAIN]
    originals = [r for r in ok if r.get("method") == REFERENCE]
    out = []
    for row in rows:
        new = dict(row)
        target, start = _reference(row, retrains), _reference(row, originals)
        gaps: dict[str, list[float]] = {"forget": [], "retain": []}
        for metric in GAP_METRICS:
            ref = {s: _number(target.get(f"{s}_{metric}")) if target else None for s in gaps}
            orig = {s: _number(start.get(f"{s}_{metric}")) if start else None for s in gaps}
            spans = [abs(orig[s] - ref[s]) for s in gaps if orig[s] is not None and ref[s] is not None]
            scale = max(spans, default=0.0)
            for split in gaps:
                value = _number(row.get(f"{split}_{metric}"))
                usable = value is not None and ref[split] is not None
                new[f"{split}_{metric}_rt_d"] = value - ref[split] if usable else None
                if usable and scale > 0:
                    gaps[split].append(abs(value - ref[split]) / scale)
        for split, values in gaps.items():
            new[f"{split}_dist_to_retrain"] = sum(values) / len(values) if values else None
        both = gaps["forget"] + gaps["retain"]
        new["dist_to_retrain"] = sum(both) / len(both) if both else None
        out.append(new)
    return out


def format_value(value: Any, decimals: int = 3) -> str:
    """A markdown cell: floats to `decimals` places, None as '-', anything else as text with pipes escaped."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{decimals}f}"
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame) -> str:
    """`table` as a markdown pipe table, one line per row; unlearn_s to 1 decimal, other floats to 3."""
    decimals = {name: 1 if name == "unlearn_s" else 3 for name in table}
    cells = pd.DataFrame({name: table[name].map(partial(format_value, decimals=decimals[name])) for name in table})
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * table.shape[1]]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False, name=None)]
    return "\n".join(lines)


def csv_text(frame: pd.DataFrame) -> str:
    """`frame` as CSV text: a missing (None) cell is empty, a NaN score reads nan, any other value as read."""
    present = frame.where(frame.map(lambda value: value is not None), "")
    return present.to_csv(index=False, lineterminator="\n", na_rep="nan")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the runs: identity, retain / forget metrics, and the comparison to the original."""
    header = ["family", "method", "dataset", "seed", "status", *MD_METRICS, *COMPARISONS, "unlearn_s"]
    return markdown_table(frame_of(compare_to_original(rows), header))


def format_audit_table(rows: list[dict[str, Any]]) -> str | None:
    """A markdown table of the audits and the distance to retrain, ranked (closest to retrain first)
    within each family, dataset and seed; None when no ok row carries an audit column."""
    frame = frame_of(distance_to_retrain(rows), ["family", "method", "dataset", "seed", "status", *AUDIT_MD])
    ok = frame[frame["status"].eq("ok")].drop(columns="status")
    if not ok[list(AUDIT_MD)].map(lambda value: value is not None).to_numpy().any():
        return None
    return markdown_table(ok.sort_values(["family", "dataset", "seed", "dist_to_retrain"], key=sort_key))


def read_rows(csv_path: Path) -> list[dict[str, Any]]:
    """summary.csv back as rows: an empty cell is None, an int or float cell (nan included) a number."""

    def parse(text: str) -> Any:
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        return [{key: parse(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def label(metric: str) -> str:
    """'forget_class_acc' -> 'forget class accuracy'."""
    split, name = metric.split("_", 1)
    return f"{split} {LABELS.get(name, name)}"


def retrain_verdicts(
    rows: list[dict[str, Any]], k: float = SPREAD_K, rel: float = SINGLE_SEED_REL
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(gaps, shares) of the ok `rows`, per family / dataset / task (finite scores of SHARE_METRICS only).

    gaps, per group and metric both references report: `original` / `retrain` (means over their seeds),
    `gap` = retrain - original, `spread` = k x the original's sample std over seeds (one seed: rel x
    |original|), `moved`: the gap exceeds the spread (for the forget metrics of FORGETTING, in the
    direction forgetting moves them: a retrain that restores the forget classes better forgets nothing), and
    `runs`: the most runs of a reference on one seed (above 1: splits or settings mixed, averaged per seed).

    shares, per group, method (not the references) and metric: `value` (mean over seeds), `share` = mean
    over seeds of (value - original) / (retrain - original), each seed against the references of that
    seed (their means where it has none), `share_std` (sample std, two seeds or more), `n` (seeds), `runs`
    (the most runs on one seed: above 1, several settings averaged per seed);
    share None where the gap is not moved. `overshoot`: a FORGETTING metric past both retrain's value and
    the original's, the way forgetting goes, by more than the spread (what neither reference forgets).
    """
    frame = frame_of(rows)
    metrics = [m for m in SHARE_METRICS if m in frame]
    if not metrics or "status" not in frame:
        return pd.DataFrame(), pd.DataFrame()
    frame = frame[frame["status"].eq("ok")]
    task = frame.get("task", pd.Series(None, index=frame.index, dtype=object))
    frame = frame.assign(**{key: frame[key].map(str) for key in ("family", "dataset", "method")},
                         task=task.map(str).where(~is_blank(task), ""))
    values = numbers(frame, [*VERDICT_GROUP, "method", "seed"], metrics)
    values = values[values["value"].map(math.isfinite).astype(bool)]
    gaps, shares = [], []
    for (*group, metric), part in values.groupby([*VERDICT_GROUP, "metric"], sort=False):
        refs = {ref: part[part["method"].eq(ref)].groupby("seed")["value"] for ref in (REFERENCE, RETRAIN)}
        orig, target = refs[REFERENCE].mean(), refs[RETRAIN].mean()
        if orig.empty or target.empty:
            continue
        gap = target.mean() - orig.mean()
        spread = k * orig.std() if len(orig) > 1 else rel * abs(orig.mean())
        sign = FORGETTING.get(metric)
        moved = bool((sign * gap if sign else abs(gap)) > spread)
        ident = dict(zip(VERDICT_GROUP, group, strict=True))
        gaps.append({**ident, "metric": metric, "original": orig.mean(), "retrain": target.mean(), "gap": gap,
                     "spread": spread, "moved": moved, "runs": int(max(by.size().max() for by in refs.values()))})
        for method, mine in part[~part["method"].isin([REFERENCE, RETRAIN])].groupby("method", sort=False):
            per_seed = []
            for seed, value in mine.groupby("seed")["value"].mean().items():
                start, end = orig.get(seed, orig.mean()), target.get(seed, target.mean())
                if end != start:
                    per_seed.append((value - start) / (end - start))
            share = pd.Series(per_seed, dtype=float)
            value = mine["value"].mean()
            shares.append({**ident, "method": method, "metric": metric, "value": value,
                           "share": share.mean() if moved and len(share) else None,
                           "share_std": share.std() if moved and len(share) > 1 else None,
                           "n": int(mine["seed"].nunique()), "runs": int(mine.groupby("seed").size().max()),
                           "overshoot": bool(sign and sign * value - max(sign * target.mean(), sign * orig.mean())
                                             > spread)})
    shares_frame = pd.DataFrame(shares, dtype=object)
    if not shares_frame.empty:
        shares_frame = shares_frame.sort_values([*VERDICT_GROUP, "method"], key=sort_key, kind="stable",
                                                ignore_index=True)
    return pd.DataFrame(gaps), shares_frame


def share_cell(share: Any, std: Any) -> str:
    """`mean ± std`, `mean` (one seed), or '-' (no share: the gap is within the spread, or a reference lacks it)."""
    if share is None:
        return "-"
    return format_value(float(share)) + (f" ± {format_value(float(std))}" if std is not None else "")


def unmoved_forget(gaps: pd.DataFrame) -> list[str]:
    """The FORGETTING metrics of `gaps` (one group's) that retrain does not move beyond the spread."""
    moved = gaps.set_index("metric")["moved"]
    return [m for m in FORGETTING if m in moved.index and not moved[m]]


def nothing_to_forget(gaps: pd.DataFrame) -> str | None:
    """The verdict line when retrain moves none of the group's FORGETTING metrics beyond the spread, else None."""
    unmoved = unmoved_forget(gaps)
    if not unmoved or unmoved != [m for m in FORGETTING if m in set(gaps["metric"])]:
        return None
    names = ", ".join(LABELS[m.split("_", 1)[1]] for m in unmoved)
    return f"nothing to forget on this split: retrain does not move forget {names} beyond the original's seed spread"


def overshoot_lines(gaps: pd.DataFrame, shares: pd.DataFrame) -> list[str]:
    """One line per method of a group that overshoots retrain (and the original) on FORGETTING metrics retrain does
    not move: those metrics, then its forget membership-attack AUC against retrain's."""
    gap = gaps.set_index("metric")
    flagged = shares[shares["metric"].isin(unmoved_forget(gaps)) & shares["overshoot"].astype(bool)]
    auc = shares[shares["metric"].eq("forget_mia_auc")].set_index("method")["value"]
    lines = []
    for method, part in flagged.groupby("method", sort=False):
        metrics = ", ".join(
            f"{label(metric)} {value:.3f} (retrain {gap.at[metric, 'retrain']:.3f}, original "
            f"{gap.at[metric, 'original']:.3f}, spread {gap.at[metric, 'spread']:.3f})"
            for metric, value in part[["metric", "value"]].itertuples(index=False)
        )
        membership = "no membership AUC"
        if method in auc.index:
            retrain_auc = gap.at["forget_mia_auc", "retrain"]
            membership = f"forget membership AUC {auc[method]:.3f} against retrain's {retrain_auc:.3f}"
        lines.append(f"{method} overshoots retrain on {metrics}; {membership}")
    return lines


def format_retrain_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """summary.md's section against retrain, one table per family / dataset / task: per method the share of each
    metric's original -> retrain gap it closes and its forget membership AUC against retrain's; then the gaps
    and their verdicts."""
    gaps, shares = retrain_verdicts(rows)
    if shares.empty:
        return []
    parts = [
        "## Against retrain: share of the original -> retrain gap closed",
        "",
        "- A cell: the share of the original -> retrain gap the method closes, (value - original) / (retrain -",
        "  original), per seed against that seed's references, mean ± std over seeds: 0 = the original, 1 =",
        "  retrain, above 1 = past retrain. `-`: no share, because retraining does not move that metric beyond",
        f"  the original's seed spread ({SPREAD_K:g} x its std over seeds; one seed: {SINGLE_SEED_REL:.0%} of its",
        "  value). Forget FID must rise, forget cosine and class accuracy fall, to count as moved.",
        "- `forget AUC (retrain)`: the method's forget membership-attack AUC, retrain's in brackets.",
    ]
    for group, mine in shares.groupby(VERDICT_GROUP, sort=False):
        part = gaps.groupby(VERDICT_GROUP).get_group(group)
        by_metric = part.set_index("metric")
        metrics = [m for m in SHARE_METRICS if m in by_metric.index]
        table = []
        for method, cells in mine.groupby("method", sort=False):
            cell = cells.set_index("metric")
            row = {"method": method, "n": int(cells["n"].max())}
            row |= {m: share_cell(cell.at[m, "share"], cell.at[m, "share_std"]) if m in cell.index else "-"
                    for m in metrics}
            has_auc = "forget_mia_auc" in cell.index
            row["forget AUC (retrain)"] = (f"{cell.at['forget_mia_auc', 'value']:.3f} "
                                           f"({by_metric.at['forget_mia_auc', 'retrain']:.3f})" if has_auc else "-")
            table.append(row)
        moves = ", ".join(f"{m} {row.gap:+.3f} (spread {row.spread:.3f})" for m, row in by_metric.iterrows())
        parts += ["", f"### {' · '.join(g for g in group if g)}", "", markdown_table(pd.DataFrame(table, dtype=object)),
                  "", f"- retrain - original: {moves}"]
        if part["runs"].max() > 1:
            parts.append("- several original or retrain runs on one seed (class splits or settings under one data "
                         "set name): they are averaged per seed, so these verdicts mix them")
        several = [str(method) for method, runs in mine.groupby("method", sort=False)["runs"].max().items() if runs > 1]
        if several:
            parts.append(f"- several runs on one seed (a settings sweep), averaged per seed: {', '.join(several)}")
        verdict = nothing_to_forget(part)
        if verdict:
            parts.append(f"- {verdict}")
        else:
            parts += [f"- retrain does not move {label(m)} beyond the original's seed spread: no share"
                      for m in unmoved_forget(part)]
        parts += [f"- {line}" for line in overshoot_lines(part, mine)]
    return parts


def _floors(frame: pd.DataFrame) -> list[str]:
    task = frame.get("task", pd.Series(index=frame.index, dtype=object))
    where = frame.assign(dataset=frame["dataset"].map(str), task=task.map(str).where(~is_blank(task), ""))
    values = numbers(where, ["dataset", "task"], [key for key in FLOOR_KEYS if key in frame])
    if values.empty:
        return []
    means = values.groupby(["dataset", "task", "metric"])["value"].mean(skipna=False).map(format_value)
    means = means.unstack(fill_value="-").reindex(columns=list(FLOOR_KEYS), fill_value="-")
    return [
        f"- Floors ({f'{dataset}, {task}' if task else dataset}; class_acc of the degraded input with the hole filled "
        f"grey / noise): forget {mean['forget_class_acc_grey']} / {mean['forget_class_acc_noise']}, "
        f"retain {mean['retain_class_acc_grey']} / {mean['retain_class_acc_noise']}"
        for (dataset, task), mean in means.iterrows()
    ]


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """summary.md: the table, a legend on how to read it, the class-accuracy floors, the audits, the verdicts
    against retrain and the failed runs."""
    frame = frame_of(rows)
    legend = [
        "- retain: lower FID and higher IS, cos, class_acc are better (ideally close to the original);",
        "  forget: the opposite (higher FID, lower IS, cos, class_acc).",
        "- retrain (trained on the retain set only) is the gold standard: a good method lands near it.",
        "- `*_fid_x`: FID / the original's FID (same family, dataset, seed); `*_d`: value minus the original's.",
        *_floors(frame),
    ]
    audits = format_audit_table(rows)
    audit_legend = [
        "- `*_mia_auc`: cross-validated AUC of a membership attack telling <split>_train images (seen by the",
        "  original) from <split>_eval images; `*_kl`: KL(outputs || ground truth) of Gaussian fits of their",
        "  features; `*_mi`: Gaussian mutual information of each output's features and its ground truth's",
        "  (`*_mi_nce`: InfoNCE lower bound). The target is retrain's value, not 0.5 or 0.",
        "- `dist_to_retrain`: mean over the forget and retain fid, cos, class_acc, mia_auc, kl, mi of",
        "  |value - retrain's| / |original's - retrain's| (the larger split's); 1 = as far as the original.",
    ]
    failed = [
        f"- {run_dir}: {' '.join(str(error or 'no error recorded').split())[:300]}"
        for run_dir, error in frame.loc[frame["status"].ne("ok"), ["run_dir", "error"]].itertuples(index=False)
    ]
    parts = ["# Summary", "", format_table(rows), "", *legend]
    counts = frame["status"].value_counts()
    parts += ["", "Runs: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in (*STATUSES, "incomplete"))]
    if audits:
        parts += ["", "## Audits and distance to retrain (closest to retrain first)", "", audits, "", *audit_legend]
    verdicts = format_retrain_verdicts(rows)
    if verdicts:
        parts += ["", *verdicts]
    if failed:
        parts += ["", "## Runs that did not finish (failed, interrupted, incomplete)", "", *failed]
    return "\n".join(parts) + "\n"


def write_summary(root: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write summary.csv and summary.md for the runs below `root` into `out_dir` (default `root`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"report: {root} is not a directory; pass the sweep dir that holds the run dirs")
    rows = distance_to_retrain(collect(root))
    if not rows:
        raise DataError(f"report: no metrics.json below {root}; pass a sweep dir whose runs have finished")
    out_dir = Path(out_dir) if out_dir is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    csv_out, md_text = csv_text(frame_of(rows)), format_markdown(rows)
    write_atomic(csv_path, lambda tmp: tmp.write_text(csv_out, encoding="utf-8", newline=""))
    write_atomic(md_path, lambda tmp: tmp.write_text(md_text, encoding="utf-8"))
    return csv_path, md_path


def log_summary_to_wandb(csv_path: Path, project: str = "i2i-unlearning", mode: str | None = None) -> Path:
    """Log summary.csv as a W&B Table in a run of its own beside it (offline unless ``mode`` or
    WANDB_MODE say otherwise), so the dashboard compares methods without custom code."""
    import os

    import wandb

    csv_path = Path(csv_path)
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    run = wandb.init(project=project, dir=str(csv_path.parent), job_type="report",
                     name=f"summary-{csv_path.parent.name}", mode=mode or os.environ.get("WANDB_MODE", "offline"))
    run.log({"summary": wandb.Table(columns=list(table.columns), data=table.to_numpy(dtype=object).tolist())})
    run_dir = Path(run.dir).parent
    run.finish()
    return run_dir
