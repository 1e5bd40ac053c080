"""experiment=tradeoff, splits and tradeoff_optuna end to end at tiny size through the real command line, and the
frontier and splits reports checked against the runs' own metrics.json."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose_cfg, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.cli import objectives, report_main
from i2i_unlearning.report.frontier import frontier_table, has_settings, has_splits, load_points


def multirun(tmp: Path, runs: str, method: str, *args: str) -> subprocess.CompletedProcess:
    given = {a.split("=", 1)[0].lstrip("+") for a in args}
    overrides = [o for o in tiny_overrides(tmp, "mae", method, runs=runs) if o.split("=", 1)[0] not in given]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "i2i_unlearning", "-m", *overrides, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(root: Path) -> list[dict]:
    return [{**json.loads(f.read_text()), "config": yaml.safe_load((f.parent / "config.yaml").read_text())}
            for f in sorted(root.glob("*/metrics.json"))]


def only(runs: list[dict], method: str, **where) -> dict:
    (run,) = [r for r in runs if r["method"] == method and all(r["config"]["data"].get(k) == v or
                                                                 r["config"]["method"].get(k) == v
                                                                 for k, v in where.items())]
    return run


def ratios(run: dict, original: dict) -> tuple[float, float]:
    return (run["metrics"]["forget_fid"] / original["metrics"]["forget_fid"],
            run["metrics"]["retain_fid"] / original["metrics"]["retain_fid"])


@pytest.mark.slow
def test_tradeoff_sweep_and_its_frontier(shared_tmp):
    for reference in ("original", "retrain"):  # in this process: one interpreter start less
        cli.main(compose_cfg(tiny_overrides(shared_tmp, "mae", reference, runs="tradeoff")))
    multirun(shared_tmp, "tradeoff", "ours", "experiment=tradeoff", "method=ours", "method.alpha=0.5,4.0")
    root = shared_tmp / "tradeoff"
    runs = metrics(root)
    assert sorted(r["method"] for r in runs) == ["original", "ours", "ours", "retrain"]
    assert all(r["status"] == "ok" for r in runs)
    assert sorted(r["config"]["method"]["alpha"] for r in runs if r["method"] == "ours") == [0.5, 4.0]

    assert report_main([str(root), "--no-tsne"]) == 0
    assert (root / "frontier.png").stat().st_size > 10_000 and not (root / "splits.md").exists()
    original, retrain = only(runs, "original"), only(runs, "retrain")
    rt = ratios(retrain, original)
    expect = {}
    for run in runs:
        if run["method"] == "ours":
            fx, rx = ratios(run, original)
            dist = math.hypot(fx - rt[0], rx - rt[1]) / math.hypot(1 - rt[0], 1 - rt[1])
            expect[run["config"]["method"]["alpha"]] = (fx, rx, dist)
    points = load_points(root)
    ours = points[points["method"].eq("ours")].set_index("alpha")
    for alpha, (fx, rx, dist) in expect.items():
        assert ours.loc[alpha, ["forget_fid_x", "retain_fid_x", "dist_to_retrain_xy"]].tolist() == pytest.approx(
            [fx, rx, dist])
    md = (root / "frontier.md").read_text()
    cells = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| ours |")).split("|")]
    within = [a for a in expect if expect[a][1] <= 1.1]  # the default retain budget
    best = max(within, key=lambda a: expect[a][0]) if within else None
    assert cells[3:6] == ([f"{expect[best][0]:.3f}", f"{expect[best][1]:.3f}", f"alpha {best:.3f}, steps 3"] if within
                          else ["-", "-", "-"])
    closest = min(expect, key=lambda a: expect[a][2])
    assert cells[6:8] == [f"{expect[closest][2]:.3f}", f"alpha {closest:.3f}, steps 3"]
    assert f"retain_fid_x {rt[1]:.3f}" in md  # retrain marked

    # the budget: only points within it count; none within -> no best
    tight = frontier_table(points, retain_budget=min(rx for _, rx, _ in expect.values()))
    assert tight.filter(like="best").iloc[0, 0] == pytest.approx(min(expect.values(), key=lambda e: e[1])[0])
    assert frontier_table(points, retain_budget=1e-6).filter(like="best").iloc[0, 0] is None
    # one setting per method: no frontier (existing reports stay as they were)
    assert has_settings(points) and not has_settings(points[~points["alpha"].eq(4.0)])
    assert not has_splits(points)


@pytest.mark.slow
def test_splits_sweep_reports_mean_std_and_holds(shared_tmp):
    multirun(shared_tmp, "splits", "ours", "experiment=splits", "data.num_forget_classes=1",
             "data.num_retain_classes=2", "data.class_seed=0,1", "method=original,retrain,ours",
             "++method.steps=3", "++method.batch_size=8")
    root = shared_tmp / "splits"
    runs = metrics(root)
    assert len(runs) == 6 and all(r["status"] == "ok" for r in runs)
    assert report_main([str(root), "--no-tsne"]) == 0
    assert not (root / "frontier.md").exists()
    fx, rx, share = [], [], []
    for seed in (0, 1):
        original, retrain, ours = (only(runs, m, class_seed=seed) for m in ("original", "retrain", "ours"))
        f, r = ratios(ours, original)
        fx.append(f), rx.append(r)
        share.append((f - 1) / (ratios(retrain, original)[0] - 1))
    holds = sum(s >= 0.5 and r <= 1.25 for s, r in zip(share, rx, strict=True))
    row = next(line for line in (root / "splits.md").read_text().splitlines() if line.startswith("| ours |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mean_std = [f"{sum(v) / 2:.3f} ± {abs(v[0] - v[1]) / math.sqrt(2):.3f}" for v in (fx, rx, share)]
    assert cells[4:7] == mean_std and cells[-1] == f"{holds}/2" and cells[3] == "2"


@pytest.mark.slow
def test_optuna_study_of_four_trials_survives_a_failed_one(shared_tmp):
    # alpha < 0 fails the config check: those trials fail (the sampler's seed 0 draws two), the study goes on
    multirun(shared_tmp, "optuna", "ours", "experiment=tradeoff_optuna", "hydra.sweeper.n_trials=4",
             "method.alpha=interval(-0.5, 0.5)", "method.steps=int(interval(2, 4))")
    root = shared_tmp / "optuna"
    runs = metrics(root)
    assert len(runs) == 4
    ok = [r for r in runs if r["status"] == "ok"]
    assert 0 < len(ok) < 4 and all(r["config"]["method"]["alpha"] < 0 for r in runs if r["status"] == "failed")
    assert {r["config"]["method"]["steps"] for r in runs} <= {2, 3, 4}
    (results,) = root.glob(".hydra/*/optimization_results.yaml")
    front = yaml.safe_load(results.read_text())["solutions"]
    values = {objectives(r) for r in ok}
    assert front and all(tuple(s["values"]) in values for s in front)


def test_objectives_of_a_cell():
    ok = {"status": "ok", "metrics": {"forget_fid": 3.0, "retain_fid": 1.5, "forget_cos": 0.9}}
    assert objectives(ok) == (3.0, 1.5)
    assert objectives({**ok, "status": "failed"}) is None and objectives(None) is None
    assert objectives({"status": "ok", "metrics": {"fid": 1.0}}) is None  # a GAN run's scores
