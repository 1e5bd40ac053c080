"""Hydra multirun sweeps through the real command line: basic and joblib launchers, failed cells, relaunch,
and the SLURM launcher's rendered job (no cluster needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from i2i_unlearning.report.summary import collect, write_summary
from i2i_unlearning.runner import build_runner


def sweep(tmp: Path, runs: str, *args: str) -> subprocess.CompletedProcess:
    given = {a.split("=", 1)[0] for a in args}
    overrides = [o for o in tiny_overrides(tmp, "mae", "original", runs=runs) if o.split("=", 1)[0] not in given]
    overrides += ["++method.steps=3", "++method.batch_size=8"]  # the references have no steps of their own
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "i2i_unlearning", "-m", *overrides, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def statuses(root: Path) -> dict:
    return {(r["method"], r["seed"]): r["status"] for r in collect(root)}


@pytest.mark.slow
def test_basic_sweep_2x2_one_summary_and_relaunch_does_no_work(shared_tmp):
    proc = sweep(shared_tmp, "sweep_basic", "method=ours,original", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = shared_tmp / "sweep_basic"
    assert statuses(root) == {(m, s): "ok" for m in ("ours", "original") for s in (0, 1)}
    csv_path, _ = write_summary(root)
    assert len(csv_path.read_text().splitlines()) == 1 + 4
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("metrics.json")}
    again = sweep(shared_tmp, "sweep_basic", "method=ours,original", "seed=0,1")
    assert again.returncode == 0 and again.stderr.count("already finished, skipping") == 4
    assert {p: p.stat().st_mtime_ns for p in root.rglob("metrics.json")} == stamps


@pytest.mark.slow
def test_joblib_sweep_with_a_failing_cell(shared_tmp):
    # class_9 does not exist: that cell fails fast, the other three finish
    proc = sweep(shared_tmp, "sweep_joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "method=ours,original", "data.forget_classes=[class_0],[class_9]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = collect(shared_tmp / "sweep_joblib")
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("class_9" in r["error"] for r in failed)
    assert sum(r["status"] == "ok" for r in rows) == 2


def test_slurm_launcher_renders_a_valid_job(tmp_path, monkeypatch):
    """The submitit_slurm config composes, and submitit renders the sbatch script we expect."""
    import submitit.slurm.slurm as slurm

    rendered = {}

    class Rendered(Exception):
        pass

    def capture(self, command, uid):
        rendered["text"] = slurm._make_sbatch_string(command=command, folder=self.folder, **self.parameters)
        raise Rendered

    monkeypatch.setattr(slurm.SlurmExecutor, "_make_submission_file_text", capture)
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    overrides = [*tiny_overrides(tmp_path), "hydra/launcher=submitit_slurm", "trainer=ddp_slurm",
                 "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                 "hydra.launcher.account=proj42", "hydra.launcher.timeout_min=90"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    with pytest.raises(Rendered):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    text = rendered["text"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --time=90"):
        assert line in text, (line, text)
    assert "srun" in text


@pytest.mark.parametrize("table", ["table1", "table2", "table3_alpha", "outpaint_sweep"])
def test_paper_presets_compose_into_sweeps(tmp_path, table):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*tiny_overrides(tmp_path), f"experiment={table}"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    if table == "table3_alpha":
        assert cfg.method.name == "ours_alpha1.0" and "0.25" in params["method.alpha"]
    else:
        assert "ours" in params["method"].split(",") and "original" in params["method"].split(",")
    if table == "outpaint_sweep":
        assert cfg.task == "outpaint_border_0.25" and len(cfg.extra_tasks) == 2
    build_runner(cfg, tmp_path / "never", "x").check()


@pytest.mark.slow
def test_ddp_inside_a_sweep_runs_each_cell_once(shared_tmp):
    """trainer=ddp (2 CPU processes, ddp_spawn) inside -m: every stage trains under DDP, no rank re-runs the sweep."""
    proc = sweep(shared_tmp, "sweep_ddp", "trainer=ddp", "logger=wandb", "method=ours,original",
                 f"paths.cache_dir={shared_tmp / 'cache_ddp'}")  # its own cache: the original trains under DDP too
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("Launching 2 jobs") == 1  # Hydra's line: no child rank started the sweep again
    assert output.count("training the original mae model") == 1
    rows = collect(shared_tmp / "sweep_ddp")
    assert sorted(r["method"] for r in rows) == ["original", "ours"] and all(r["status"] == "ok" for r in rows)
    for run in (shared_tmp / "sweep_ddp").glob("mae-*"):
        assert list((run / "wandb").glob("offline-run-*")), run
