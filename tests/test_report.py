"""Report: metrics.json tree -> summary.csv / summary.md, and the image grid."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from i2i_unlearning.errors import DataError
from i2i_unlearning.report.figures import save_grid
from i2i_unlearning.report.summary import (
    CORE_COLUMNS,
    collect,
    compare_to_original,
    format_table,
    log_summary_to_wandb,
    write_summary,
)


def run_json(method, status="ok", error=None, **metrics):
    return {
        "family": "mae",
        "method": method,
        "dataset": "fashion_mnist",
        "seed": 0,
        "status": status,
        "error": error,
        "unlearn_s": 12.5,
        "task": "center_half",
        "metrics": metrics,
        "floors": {
            "forget_class_acc_grey": 0.25,
            "forget_class_acc_noise": 0.125,
            "retain_class_acc_grey": 0.5,
            "retain_class_acc_noise": 0.375,
        },
        "feature_net_test_acc": 0.9,
        "config_hash": f"hash-{method}",
    }


ORIGINAL = dict(
    retain_fid=10.0,
    retain_is=3.0,
    retain_cos=0.9,
    forget_fid=8.0,
    forget_is=3.2,
    forget_cos=0.92,
    retain_class_acc=0.8,
    forget_class_acc=0.85,
    retainMSE=0.01,
)
OURS = dict(
    retain_fid=12.0,
    retain_is=2.9,
    retain_cos=0.88,
    forget_fid=40.0,
    forget_is=1.5,
    forget_cos=0.5,
    retain_class_acc=0.78,
    forget_class_acc=0.1,
)


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "sweep"
    runs = {
        "b1/ours": run_json("ours", **OURS),
        "a0/original": run_json("original", **ORIGINAL),
        "c2/max_loss": run_json("max_loss", status="failed", error="RuntimeError: loss is NaN\nat step 3"),
    }
    for name, content in runs.items():
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps(content))
    (root / "d3/broken").mkdir(parents=True)
    (root / "d3/broken/metrics.json").write_text('{"family": "mae", "method": ')
    return root


def test_collect_sorts_by_reference_order_and_keeps_failures(sweep):
    rows = collect(sweep)
    assert [r.get("method") for r in rows] == ["original", "ours", "max_loss", None]
    failed = rows[2]
    assert failed["status"] == "failed" and "loss is NaN" in failed["error"]
    broken = rows[3]
    assert broken["status"] == "failed"
    assert "d3/broken/metrics.json" in broken["error"] and broken["run_dir"] == "d3/broken"
    assert rows[0]["forget_class_acc_grey"] == 0.25  # floors flattened
    assert rows[0]["retain_mse"] == 0.01  # keys made lower_snake_case


def test_summary_csv_column_contract(sweep):
    csv_path, md_path = write_summary(sweep)
    assert (csv_path, md_path) == (sweep / "summary.csv", sweep / "summary.md")
    with csv_path.open() as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        rows = list(reader)
    assert tuple(header[: len(CORE_COLUMNS)]) == CORE_COLUMNS
    assert header[-2:] == ["error", "run_dir"]
    extra = header[len(CORE_COLUMNS) : -2]
    assert extra == sorted(extra)
    assert {"task", "config_hash", "feature_net_test_acc", "forget_class_acc_noise", "retain_mse"} <= set(
        extra
    )
    assert all(h == h.lower() and " " not in h for h in header)
    assert len(rows) == 4
    by_dir = {r["run_dir"]: r for r in rows}
    assert by_dir["c2/max_loss"]["status"] == "failed" and "NaN" in by_dir["c2/max_loss"]["error"]
    assert by_dir["d3/broken"]["status"] == "failed" and "metrics.json" in by_dir["d3/broken"]["error"]
    assert float(by_dir["b1/ours"]["forget_fid"]) == 40.0
    assert by_dir["b1/ours"]["seed"] == "0" and by_dir["d3/broken"]["seed"] == ""  # ints stay ints, None is empty
    assert by_dir["a0/original"]["retain_mse"] == "0.01" and by_dir["b1/ours"]["retain_mse"] == ""
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_nan_score_is_kept_apart_from_a_missing_one(sweep):
    (sweep / "e4").mkdir()
    (sweep / "e4/metrics.json").write_text(json.dumps(run_json("retrain", **(OURS | {"forget_fid": float("nan")}))))
    csv_path, md_path = write_summary(sweep)
    with csv_path.open() as handle:
        rows = {r["run_dir"]: r for r in csv.DictReader(handle)}
    assert rows["e4"]["forget_fid"] == "nan" and rows["c2/max_loss"]["forget_fid"] == ""
    runs = md_path.read_text().split("## Audits")[0].splitlines()  # the runs table, not the audit ranking
    header = [cell.strip("| ") for cell in runs[2].split(" | ")]
    table = [[cell.strip("| ") for cell in line.split(" | ")] for line in runs if line.startswith("| mae")]
    table = {cells[1]: dict(zip(header, cells, strict=True)) for cells in table}
    assert list(table) == ["original", "retrain", "ours", "max_loss"]  # METHOD_ORDER, not by name
    assert (table["retrain"]["forget_fid"], table["max_loss"]["forget_fid"]) == ("nan", "-")
    assert (table["retrain"]["unlearn_s"], table["retrain"]["retain_fid"]) == ("12.5", "12.000")


def test_comparison_to_original(sweep):
    rows = {r.get("method"): r for r in compare_to_original(collect(sweep))}
    ours = rows["ours"]
    assert ours["forget_fid_x"] == pytest.approx(40.0 / 8.0)
    assert ours["retain_fid_x"] == pytest.approx(12.0 / 10.0)
    assert ours["forget_cos_d"] == pytest.approx(0.5 - 0.92)
    assert ours["retain_cos_d"] == pytest.approx(0.88 - 0.9)
    assert ours["forget_acc_d"] == pytest.approx(0.1 - 0.85)
    assert ours["retain_acc_d"] == pytest.approx(0.78 - 0.8)
    assert rows["original"]["forget_fid_x"] == pytest.approx(1.0)
    assert rows["max_loss"]["forget_fid_x"] is None


def test_seed_agnostic_original_is_used_when_it_is_the_only_one(sweep):
    other_seed = run_json("ours", **OURS) | {"seed": 1}
    (sweep / "e4").mkdir()
    (sweep / "e4/metrics.json").write_text(json.dumps(other_seed))
    rows = [r for r in compare_to_original(collect(sweep)) if r.get("seed") == 1]
    assert rows[0]["forget_fid_x"] == pytest.approx(5.0)


def test_summary_md_lists_every_run_with_legend(sweep):
    _, md_path = write_summary(sweep, out_dir=sweep / "report")
    text = md_path.read_text()
    table = [line for line in text.splitlines() if line.startswith("| mae")]
    assert [line.split(" | ")[1] for line in table] == ["original", "ours", "max_loss"]
    ours = table[1].split(" | ")
    header = text.splitlines()[2].split(" | ")
    assert ours[header.index("forget_fid_x")] == "5.000"
    assert ours[header.index("retain_fid")] == "12.000"
    assert "gold standard" in text and "lower FID" in text
    assert "Floors (fashion_mnist, center_half" in text and "forget 0.250 / 0.125" in text
    assert "d3/broken" in text and "loss is NaN at step 3" in text
    assert format_table(collect(sweep)).splitlines()[0].startswith("| family | method")


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        write_summary(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        write_summary(tmp_path / "missing")


def test_save_grid_writes_png_and_labels(tmp_path):
    rows = {
        "retain: ground truth": torch.rand(10, 1, 32, 32),
        "retain: input": torch.rand(3, 1, 32, 32),
        "forget: unlearned output": torch.rand(10, 3, 32, 32),
    }
    path = save_grid(tmp_path / "grid.png", rows, nrow_max=8)
    with Image.open(path) as image:
        assert image.mode == "RGB"
        width, height = image.size
    tile = 32 * 3  # 32 px images upscaled 3x
    assert height == 3 * (tile + 2 * 3) + 2 * 3
    assert width > 8 * tile
    assert (tmp_path / "grid.txt").read_text().splitlines() == list(rows)


def test_summary_table_is_logged_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    csv_path = tmp_path / "summary.csv"
    csv_path.write_text("family,method,forget_fid\nmae,ours,3.5\nmae,original,2.0\n")
    run_dir = log_summary_to_wandb(csv_path)
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    assert any(run_dir.glob("*.wandb"))
