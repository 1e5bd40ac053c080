"""Verdicts against retrain: the share of the original -> retrain gap each method closes, in summary.md and in
the demo's effect check, and "nothing to forget" when retraining does not move the forget metrics."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from i2i_unlearning.report.summary import SINGLE_SEED_REL, SPREAD_K, collect, retrain_verdicts, write_summary

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.py"
# Every method's retain cos / class accuracy is the original's unless given: the effect check reads them.
BASE = {"retain_cos": 0.95, "retain_class_acc": 0.6, "retain_mia_auc": 0.5}


def write_runs(root: Path, runs: dict[tuple[str, int], dict[str, float]], suffix: str = "") -> Path:
    for (method, seed), metrics in runs.items():
        run = root / f"{method}-s{seed}{suffix}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({
            "family": "mae", "method": method, "dataset": "fashion_mnist", "seed": seed, "status": "ok",
            "task": "center_half", "unlearn_s": 1.0, "metrics": BASE | metrics,
        }))
    return root


# A split on which retraining clearly forgets: two seeds of each reference, ours on both, finetune on a third.
MOVED = {
    ("original", 0): dict(forget_fid=100.0, forget_cos=0.9, forget_class_acc=0.8, forget_mia_auc=0.7, retain_fid=10.0),
    ("original", 1): dict(forget_fid=102.0, forget_cos=0.9, forget_class_acc=0.8, forget_mia_auc=0.7, retain_fid=10.2),
    ("retrain", 0): dict(forget_fid=200.0, forget_cos=0.8, forget_class_acc=0.5, forget_mia_auc=0.5, retain_fid=11.0),
    ("retrain", 1): dict(forget_fid=198.0, forget_cos=0.8, forget_class_acc=0.5, forget_mia_auc=0.5, retain_fid=11.2),
    ("ours", 0): dict(forget_fid=150.0, forget_cos=0.85, forget_class_acc=0.2, forget_mia_auc=0.55, retain_fid=10.5),
    ("ours", 1): dict(forget_fid=201.0, forget_cos=0.82, forget_class_acc=0.2, forget_mia_auc=0.6, retain_fid=10.7),
    ("finetune", 2): dict(forget_fid=150.0, forget_cos=0.9, forget_class_acc=0.8, forget_mia_auc=0.7, retain_fid=10.1),
}
# One seed; retrain restores the forget classes slightly better than the original (the retained classes teach
# them): nothing to forget. ours forgets anyway; random_encoder stays within the spread of the original.
UNMOVED = {
    ("original", 0): dict(forget_fid=28.6, forget_cos=0.9, forget_class_acc=0.6, forget_mia_auc=0.52, retain_fid=20.0),
    ("retrain", 0): dict(forget_fid=25.7, forget_cos=0.899, forget_class_acc=0.595, forget_mia_auc=0.51,
                         retain_fid=20.1),
    ("ours", 0): dict(forget_fid=38.0, forget_cos=0.85, forget_class_acc=0.40, forget_mia_auc=0.47, retain_fid=21.0),
    ("random_encoder", 0): dict(forget_fid=28.8, forget_cos=0.90, forget_class_acc=0.60, forget_mia_auc=0.5,
                                retain_fid=20.0),
}


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verdicts(root):
    gaps, shares = retrain_verdicts(collect(root))
    return gaps.set_index("metric"), {(r["method"], r["metric"]): r for r in shares.to_dict("records")}


def test_shares_per_seed_against_that_seeds_references(tmp_path):
    gaps, shares = verdicts(write_runs(tmp_path, MOVED))
    assert gaps.loc["forget_fid", "gap"] == pytest.approx(98.0)
    assert gaps.loc["forget_fid", "spread"] == pytest.approx(SPREAD_K * statistics.stdev([100.0, 102.0]))
    assert set(gaps.index[gaps["moved"]]) == {*MOVED["ours", 0]}  # not the retain cos, class acc, AUC of BASE
    per_seed = [(150 - 100) / (200 - 100), (201 - 102) / (198 - 102)]
    fid = shares["ours", "forget_fid"]
    assert fid["share"] == pytest.approx(statistics.mean(per_seed))
    assert fid["share_std"] == pytest.approx(statistics.stdev(per_seed)) and fid["n"] == 2
    assert shares["ours", "forget_cos"]["share"] == pytest.approx((0.5 + 0.8) / 2)
    assert shares["ours", "forget_class_acc"]["share"] == pytest.approx(2.0)  # past retrain
    assert shares["ours", "retain_fid"]["share"] == pytest.approx(0.5)
    assert shares["ours", "forget_mia_auc"]["share"] == pytest.approx((0.75 + 0.5) / 2)
    # finetune's seed 2 has no references of its own: it is read against their means over seeds.
    assert shares["finetune", "forget_fid"]["share"] == pytest.approx((150 - 101) / (199 - 101))
    assert shares["finetune", "forget_fid"]["share_std"] is None
    assert not any(row["overshoot"] for row in shares.values() if row["metric"] in ("forget_fid", "forget_cos"))
    assert {method for method, _ in shares} == {"ours", "finetune"}  # the references get no row
    assert all(frame.empty for frame in retrain_verdicts([{"family": "gan", "method": "ours", "status": "ok"}]))
    wide, _ = retrain_verdicts(collect(tmp_path), k=100.0)  # a spread of 100 std: retrain's 98 no longer counts
    assert not wide.set_index("metric").at["forget_fid", "moved"]


def test_summary_md_shows_the_shares_and_membership(tmp_path):
    _, md_path = write_summary(write_runs(tmp_path, MOVED))
    text = md_path.read_text().split("## Against retrain")[1]
    lines = text.splitlines()
    assert "### mae · fashion_mnist · center_half" in lines
    header = [cell.strip() for cell in next(line for line in lines if line.startswith("| method")).split("|")]
    ours = [cell.strip() for cell in next(line for line in lines if line.startswith("| ours |")).split("|")]
    row = dict(zip(header, ours, strict=True))
    assert row["forget_fid"] == "0.766 ± 0.376" and row["forget_class_acc"] == "2.000 ± 0.000"
    assert row["retain_fid"] == "0.500 ± 0.000" and row["n"] == "2"
    assert row["forget AUC (retrain)"] == "0.575 (0.500)"
    assert row["retain_cos"] == "-"  # both references report the same value: retraining does not move it
    assert "nothing to forget" not in text and "overshoots" not in text


def test_nothing_to_forget_and_overshoot_with_membership(tmp_path):
    root = write_runs(tmp_path, UNMOVED)
    gaps, shares = verdicts(root)
    assert not gaps.loc[["forget_fid", "forget_cos", "forget_class_acc"], "moved"].any()
    assert gaps.loc["forget_fid", "spread"] == pytest.approx(SINGLE_SEED_REL * 28.6)
    assert shares["ours", "forget_fid"]["share"] is None and shares["ours", "forget_fid"]["overshoot"]
    assert not shares["random_encoder", "forget_fid"]["overshoot"]  # past retrain, not past the original
    text = write_summary(root)[1].read_text()
    assert ("nothing to forget on this split: retrain does not move forget FID, cosine, class accuracy beyond "
            "the original's seed spread") in text
    flagged = [line.lstrip(" -") for line in text.splitlines() if "overshoots retrain" in line]
    assert flagged == [
        "ours overshoots retrain on forget FID 38.000 (retrain 25.700, original 28.600, spread 0.572), forget cosine "
        "0.850 (retrain 0.899, original 0.900, spread 0.018), forget class accuracy 0.400 (retrain 0.595, original "
        "0.600, spread 0.012); forget membership AUC 0.470 against retrain's 0.510"
    ]


def test_demo_check_prints_the_shares(tmp_path, capsys):
    csv_path, _ = write_summary(write_runs(tmp_path, MOVED))
    holds = load_demo().check_effect(csv_path, "mae")
    out = capsys.readouterr().out
    assert holds  # the bounds against the original (last seed) hold
    shares = {line.split()[0]: line for line in out.splitlines() if " share " in line}
    assert "share 0.766 ± 0.376" in shares["forget_fid"] and "share 0.500 ± 0.000" in shares["retain_fid"]
    assert "nothing to forget" not in out


def test_demo_check_says_nothing_to_forget(tmp_path, capsys):
    csv_path, _ = write_summary(write_runs(tmp_path, UNMOVED))
    holds = load_demo().check_effect(csv_path, "mae")
    out = capsys.readouterr().out
    assert holds  # the bounds against the original still hold and still decide the exit code
    assert "nothing to forget on this split" in out and "not forgetting" in out
    fid = [line for line in out.splitlines() if line.strip().startswith("forget_fid ") and " share " in line]
    assert len(fid) == 1 and "share -" in fid[0]
    assert "ours overshoots retrain on forget FID 38.000" in out and "AUC 0.470 against retrain's 0.510" in out


def test_several_runs_on_one_seed_are_averaged_and_said(tmp_path):
    write_runs(tmp_path, MOVED)
    write_runs(tmp_path, {("ours", 0): MOVED["ours", 0] | {"forget_fid": 250.0}}, suffix="-alpha2")
    gaps, shares = verdicts(tmp_path)
    per_seed = [((150 + 250) / 2 - 100) / (200 - 100), (201 - 102) / (198 - 102)]
    assert shares["ours", "forget_fid"]["share"] == pytest.approx(statistics.mean(per_seed))
    assert shares["ours", "forget_fid"]["runs"] == 2 and gaps["runs"].max() == 1
    text = write_summary(tmp_path)[1].read_text()
    assert "several runs on one seed (a settings sweep), averaged per seed: ours" in text
    assert "several original or retrain runs" not in text
    write_runs(tmp_path, {("original", 0): MOVED["original", 0]}, suffix="-split2")
    assert "several original or retrain runs on one seed" in write_summary(tmp_path)[1].read_text()
