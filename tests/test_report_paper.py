"""The paper's layout (mean ± std over seeds), the t-SNE figure and the grids side by side, and i2iu-report."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
from PIL import Image

from i2i_unlearning.cli import report_main
from i2i_unlearning.errors import DataError
from i2i_unlearning.report.figures import write_grids
from i2i_unlearning.report.tables import MD_HEADERS, aggregate, format_cell, load_runs, write_paper_table
from i2i_unlearning.report.tsne import embed_2d, load_embeddings, subsample, write_tsne

# (method, seed) -> forget_fid, retain_fid; retain_cos and forget_cos derived below.
FID = {
    ("ours", 0): (30.0, 10.0),
    ("ours", 1): (34.0, 12.0),
    ("ours", 2): (38.0, 11.0),
    ("original", 0): (8.0, 9.0),
    ("my_method", 0): (20.0, 15.0),
    ("retrain", 0): (25.0, 9.5),
    ("retrain", 1): (27.0, 10.5),
}
COLOURS = {"original": (255, 0, 0), "ours": (0, 255, 0), "retrain": (0, 0, 255), "my_method": (9, 9, 9)}


def metrics_json(method, seed, forget_fid, retain_fid, **extra_metrics):
    return {
        "family": "mae",
        "method": method,
        "dataset": "fashion_mnist",
        "seed": seed,
        "status": "ok",
        "error": None,
        "task": "center_half",
        "unlearn_s": 1.0 + seed,
        "metrics": {
            "retain_fid": retain_fid,
            "retain_is": 2.0,
            "retain_cos": 0.9,
            "retain_class_acc": 0.5,
            "forget_fid": forget_fid,
            "forget_is": 1.5 + seed,
            "forget_cos": 0.8,
            "forget_class_acc": 0.25,
            **extra_metrics,
        },
    }


def write_run(root, name, content, *, grid=None, embeddings=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(content))
    if grid is not None:
        Image.new("RGB", (40, 30), grid).save(run / "grid.png")
    if embeddings is not None:
        np.savez(run / "embeddings.npz", **embeddings)
    return run


def fake_embeddings(seed, n=12, dim=6):
    rng = np.random.default_rng(seed)
    return {
        key: (rng.normal(size=(n, dim)) + offset).astype(np.float32)
        for key, offset in (("retain_truth", 0), ("retain_output", 0.2), ("forget_truth", 5), ("forget_output", 9))
    }


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for (method, seed), (forget_fid, retain_fid) in FID.items():
        extra = {"forget_mia_auc": 0.5 + seed / 10} if method == "ours" else {}  # an audit column
        write_run(root, f"{method}-s{seed}", metrics_json(method, seed, forget_fid, retain_fid, **extra),
                  grid=COLOURS[method] if seed == 0 else (123, 123, 123))
    failed = {"family": "mae", "method": "ours", "dataset": "fashion_mnist", "seed": 3, "status": "failed",
              "error": "RuntimeError: NaN", "config_hash": "x"}
    run = write_run(root, "ours-s3", failed)
    (run / "config.yaml").write_text("task: center_half\nseed: 3\n")
    write_run(root, "max_loss-s0", failed | {"method": "max_loss", "seed": 0})
    return root


def test_mean_std_over_seeds_exact(sweep):
    methods, stats = aggregate(load_runs(sweep))
    assert set(methods[["family", "dataset", "task"]].itertuples(index=False, name=None)) == {
        ("mae", "fashion_mnist", "center_half")
    }
    assert list(methods["method"]) == ["original", "retrain", "ours", "max_loss", "my_method"]
    counts = methods.set_index("method")[["runs", "failed"]]
    assert counts.loc["ours"].tolist() == [3, 1] and counts.loc["max_loss"].tolist() == [0, 1]
    cell = stats.set_index(["method", "metric"])[["mean", "std", "n"]]
    assert cell.loc["ours", "forget_fid"].to_dict() == {"mean": 34.0, "std": 4.0, "n": 3}  # sample std of 30, 34, 38
    assert cell.loc["ours", "retain_fid"]["mean"] == pytest.approx(11.0)
    assert cell.loc["ours", "retain_fid"]["std"] == pytest.approx(1.0)
    assert cell.loc["ours", "forget_is"]["std"] == pytest.approx(statistics.stdev([1.5, 2.5, 3.5]))
    assert cell.loc["ours", "forget_mia_auc"]["mean"] == pytest.approx(0.6)  # extra numeric metric, unnested
    assert "seed" not in set(stats["metric"])
    assert cell.loc["original", "forget_fid"].to_dict() == {"mean": 8.0, "std": None, "n": 1}
    assert cell.loc["original", "forget_mia_auc"]["n"] == 0  # the group's metric union, absent here
    assert cell.loc["max_loss", "forget_fid"].to_dict() == {"mean": None, "std": None, "n": 0}
    ours = stats[stats["method"] == "ours"]["metric"].tolist()
    assert ours[:8] == list(MD_HEADERS) and ours[8:] == sorted(ours[8:])  # the paper's columns, then by name
    assert format_cell(cell.loc["max_loss", "forget_fid"], 0) == "-"
    assert format_cell({"mean": 0.25, "std": 0.5, "n": 2}, 3) == "0.250 ± 0.500 (n=2)"  # a run lacked it


def test_failed_run_task_comes_from_its_config_or_the_only_task(sweep):
    task = load_runs(sweep).set_index("run_dir")["task"]
    assert task["ours-s3"] == "center_half"  # config.yaml
    assert task["max_loss-s0"] == "center_half"  # no config: the only task of mae / fashion_mnist


def test_a_nan_score_makes_its_mean_nan(sweep, tmp_path):
    write_run(sweep, "ours-s4", metrics_json("ours", 4, float("nan"), 13.0))
    md_path, csv_path = write_paper_table(sweep, tmp_path)
    with csv_path.open() as handle:
        cell = {(r["method"], r["metric"]): r for r in csv.DictReader(handle)}
    assert (cell["ours", "forget_fid"]["mean"], cell["ours", "forget_fid"]["n"]) == ("nan", "4")
    assert float(cell["ours", "retain_fid"]["mean"]) == pytest.approx(11.5)
    assert cell["original", "forget_fid"]["std"] == ""  # one seed: no std, not a NaN one
    assert "| ours | 4 | 1 | 11.500 ± 1.291 |" in md_path.read_text()
    assert "nan ± nan" in md_path.read_text()


def test_paper_markdown_order_cells_and_csv(sweep):
    md_path, csv_path = write_paper_table(sweep, sweep / "out")
    lines = md_path.read_text().splitlines()
    assert "## mae · fashion_mnist · center_half" in lines
    header = next(line for line in lines if line.startswith("| method"))
    body = [line.split(" | ") for line in lines if line.startswith("| ") and line != header]
    body = [cells for cells in body if not cells[0].startswith("|---")]
    assert [cells[0].strip("| ") for cells in body] == ["original", "retrain", "ours", "max_loss", "my_method"]
    cols = [c.strip("| ") for c in header.split(" | ")]
    ours = dict(zip(cols, [c.strip("| ") for c in body[2]], strict=True))
    assert (ours["n"], ours["failed"]) == ("3", "1")
    assert ours["forget FID ↑"] == "34.000 ± 4.000"
    assert ours["retain FID ↓"] == "11.000 ± 1.000"
    original = dict(zip(cols, [c.strip("| ") for c in body[0]], strict=True))
    assert original["forget FID ↑"] == "8.000" and original["n"] == "1"
    retrain = dict(zip(cols, [c.strip("| ") for c in body[1]], strict=True))
    assert retrain["forget FID ↑"] == "26.000 ± 1.414"
    max_loss = dict(zip(cols, [c.strip("| ") for c in body[3]], strict=True))
    assert (max_loss["n"], max_loss["failed"], max_loss["forget FID ↑"]) == ("0", "1", "-")
    assert "forget_mia_auc" not in md_path.read_text()

    with csv_path.open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames[:8] == ["family", "dataset", "task", "method", "metric", "mean", "std", "n"]
        rows = list(reader)
    cell = {(r["method"], r["metric"]): r for r in rows}
    assert float(cell["ours", "forget_fid"]["mean"]) == 34.0 and float(cell["ours", "forget_fid"]["std"]) == 4.0
    assert cell["ours", "forget_fid"]["n"] == "3" and cell["ours", "forget_fid"]["failed"] == "1"
    assert cell["original", "forget_fid"]["std"] == ""
    assert float(cell["ours", "forget_mia_auc"]["std"]) == pytest.approx(0.1)
    assert float(cell["ours", "unlearn_s"]["mean"]) == 2.0
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods == ["original", "retrain", "ours", "max_loss", "my_method"]


def test_paper_table_of_an_empty_dir_fails_fast(tmp_path):
    with pytest.raises(DataError, match="no metrics.json below"):
        write_paper_table(tmp_path)


def test_grids_side_by_side_lowest_seed_in_method_order(sweep, tmp_path):
    (path,) = write_grids(sweep, tmp_path / "out", ncols=2)
    assert path.name == "grids_mae_fashion_mnist.png"
    image = Image.open(path).convert("RGB")
    # cells: max(40) + 16 gap wide, caption 34 + max(30) + 16 gap high; 4 methods -> 2 x 2, METHOD_ORDER
    assert image.size == (2 * 56, 2 * 80)
    for i, method in enumerate(["original", "retrain", "ours", "my_method"]):
        x, y = (i % 2) * 56, (i // 2) * 80
        assert image.getpixel((x + 20, y + 34 + 15)) == COLOURS[method]  # seed 0's grid, not seed 1's


def test_tsne_subsample_and_embedding():
    arrays = fake_embeddings(0, n=30)
    small = subsample(arrays, 10, seed=0)
    assert {k: v.shape for k, v in small.items()} == {k: (10, 6) for k in arrays}
    assert small["retain_truth"][0].tolist() in arrays["retain_truth"].tolist()
    assert all(np.array_equal(a, b) for a, b in zip(subsample(arrays, 10, 0).values(), small.values(), strict=True))
    assert subsample(arrays, 50, seed=0)["forget_truth"] is arrays["forget_truth"]
    points = np.concatenate(list(small.values()))
    xy = embed_2d(points, seed=0)
    assert xy.shape == (40, 2) and np.array_equal(xy, embed_2d(points, seed=0))
    retain, forget = xy[:10].mean(0), xy[20:30].mean(0)  # retain truth vs forget truth stay apart
    assert np.linalg.norm(retain - forget) > np.linalg.norm(xy[:10] - retain, axis=1).mean()
    assert embed_2d(points[:5], seed=0).shape == (5, 2)  # perplexity clamped to the point count


def test_tsne_bad_embeddings_fail_fast(tmp_path):
    bad = fake_embeddings(0)
    del bad["forget_output"]
    np.savez(tmp_path / "a.npz", **bad)
    with pytest.raises(DataError, match="lacks forget_output"):
        load_embeddings(tmp_path / "a.npz")
    bad = fake_embeddings(0) | {"forget_output": np.zeros((4, 3), np.float32)}
    np.savez(tmp_path / "b.npz", **bad)
    with pytest.raises(DataError, match="one D"):
        load_embeddings(tmp_path / "b.npz")


def test_tsne_figure_from_embeddings(sweep, tmp_path):
    assert write_tsne(sweep, tmp_path / "none") == []  # no run has embeddings yet
    for i, run in enumerate(["ours-s1", "ours-s0", "original-s0"]):
        np.savez(sweep / run / "embeddings.npz", **fake_embeddings(i))
    (path,) = write_tsne(sweep, tmp_path / "out", max_points=8)
    assert path.name == "tsne_mae_fashion_mnist.png"
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 600  # two panels side by side (original, ours seed 0)


def test_cli_writes_every_file(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out), "--no-tsne"]) == 0
    printed = capsys.readouterr().out
    assert "# Paper table" in printed and "34.000 ± 4.000" in printed and "# Summary" in printed
    names = {"summary.csv", "summary.md", "paper_table.md", "paper_table.csv", "grids_mae_fashion_mnist.png"}
    assert {p.name for p in out.iterdir()} == names
    assert all(str(out / name) in printed for name in names)
    assert "t-SNE" not in printed

    np.savez(sweep / "ours-s0" / "embeddings.npz", **fake_embeddings(0, n=6))
    assert report_main([str(sweep), "--out", str(out), "--tsne-points", "5"]) == 0
    assert str(out / "tsne_mae_fashion_mnist.png") in capsys.readouterr().out
    (sweep / "ours-s0" / "embeddings.npz").unlink()
    assert report_main([str(sweep), "--out", str(tmp_path / "r2")]) == 0
    assert "t-SNE skipped: no run below" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report_main([str(sweep), "--tsne-points", "0"])
