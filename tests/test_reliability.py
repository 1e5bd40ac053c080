"""Cluster-grade runs: signals stop a stage cleanly and a relaunch resumes it, non-finite losses fail the cell
(not the process or the sweep), the report accounts for every cell, stage times sum over attempts."""

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_cfg, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.attempts import StageClock
from i2i_unlearning.errors import Interrupted, NonFiniteError
from i2i_unlearning.report.summary import collect, write_summary
from i2i_unlearning.runs import run_dir
from i2i_unlearning.training import fit_resumable, make_trainer, stop_handlers
from i2i_unlearning.unlearning.module import UnlearnModule


class Tiny(L.LightningModule):
    """A one-layer model whose loss turns NaN from step ``nan_at`` on, or that sends ``signum`` at ``signal_at``."""

    def __init__(self, nan_at=None, signum=None, signal_at=None):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)
        self.nan_at, self.signum, self.signal_at = nan_at, signum, signal_at

    def training_step(self, batch, batch_idx):
        if self.signum is not None and self.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)
        loss = self.w(batch).pow(2).mean()
        return loss * float("nan") if self.nan_at is not None and self.global_step >= self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, module, steps=6):
    cfg = compose_cfg(tiny_overrides(tmp_path, extra=["callbacks.model_checkpoint.every_n_train_steps=100"]))
    trainer = make_trainer(cfg, steps, ckpt_dir=tmp_path / "resume", root=tmp_path)
    data = torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4)
    fit_resumable(trainer, module, data, tmp_path / "resume")
    return trainer


def test_a_non_finite_loss_stops_the_stage_naming_it_and_the_step(tmp_path):
    with pytest.raises(NonFiniteError, match=r"Tiny training: loss is nan at step 3"):
        _fit(tmp_path, Tiny(nan_at=2))
    assert not (tmp_path / "resume" / "last.ckpt").exists()  # no checkpoint of broken weights
    _fit(tmp_path / "control", Tiny())  # control: the same fit with a finite loss ends


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_saves_a_checkpoint_and_stops_with_the_step(tmp_path, signum):
    with stop_handlers(), pytest.raises(Interrupted) as exc:
        _fit(tmp_path, Tiny(signum=signum, signal_at=3))
    assert (exc.value.signum, exc.value.stage, exc.value.step) == (signum, "Tiny", 4)
    assert exc.value.exit_code == 128 + signum
    ckpt = torch.load(tmp_path / "resume" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # every-100-steps checkpointing would have saved nothing
    trainer = _fit(tmp_path, Tiny())  # the relaunch resumes there and ends
    assert trainer.global_step == 6 and not (tmp_path / "resume").exists()


def test_stage_time_sums_over_attempts(tmp_path):
    clock = StageClock(tmp_path, "unlearn")
    with pytest.raises(RuntimeError), clock:  # an attempt that dies after 0.2 s
        time.sleep(0.2)
        raise RuntimeError("killed")
    with StageClock(tmp_path, "unlearn") as again:
        time.sleep(0.1)
    assert len(again.seconds) == 2 and again.total >= 0.3
    with StageClock(tmp_path, "unlearn") as fresh:  # the stage finished: a new run of it counts anew
        pass
    assert len(fresh.seconds) == 1 and fresh.total < 0.1


def test_a_killed_attempt_counts_up_to_its_last_heartbeat(tmp_path):
    clock = StageClock(tmp_path, "train").__enter__()
    time.sleep(0.2)
    clock.beat(force=True)
    StageClock.active.remove(clock)  # SIGKILL: no exit is ever run
    with StageClock(tmp_path, "train") as again:
        pass
    assert again.total >= 0.2 and json.loads((tmp_path / "attempts.json").read_text())["train"]["done"]


def _write_run(root, name, status=None, step=None, error=None):
    run = root / name
    run.mkdir(parents=True)
    family, method, seed = name.split("-")
    (run / "config.yaml").write_text(f"model: {{name: {family}}}\nmethod: {{name: {method}}}\n"
                                     f"data: {{name: synthetic}}\nseed: {seed}\n")
    if status:
        (run / "metrics.json").write_text(json.dumps({
            "family": family, "method": method, "dataset": "synthetic", "seed": int(seed), "status": status,
            "error": error, "metrics": {"retain_fid": 1.0} if status == "ok" else {}}))
    if step is not None:
        (run / "resume").mkdir()
        torch.save({"global_step": step}, run / "resume" / "last.ckpt")


def test_the_report_accounts_for_every_cell(tmp_path):
    _write_run(tmp_path, "mae-ours-0", "ok")
    _write_run(tmp_path, "mae-ours-1", "failed", error="NonFiniteError: loss is nan at step 2")
    _write_run(tmp_path, "mae-ours-2", step=40)  # killed mid-unlearning
    _write_run(tmp_path, "mae-ours-3")  # killed before its first checkpoint
    (tmp_path / ".hydra" / "x" / ".hydra").mkdir(parents=True)
    (tmp_path / ".hydra" / "x" / ".hydra" / "config.yaml").write_text("a: 1\n")  # Hydra's copy: not a cell
    rows = {r["seed"]: r for r in collect(tmp_path)}
    assert {s: r["status"] for s, r in rows.items()} == {0: "ok", 1: "failed", 2: "incomplete", 3: "incomplete"}
    assert "nan at step 2" in rows[1]["error"] and rows[2]["last_step"] == 40 and "step 40" in rows[2]["error"]
    assert rows[3]["last_step"] is None
    _, md = write_summary(tmp_path)
    assert "Runs: 1 ok, 1 failed, 0 interrupted, 2 incomplete" in md.read_text()


def test_report_without_any_metrics_says_so_and_exits_non_zero(tmp_path, capsys):
    _write_run(tmp_path, "mae-ours-0")
    assert cli.report_main([str(tmp_path), "--no-tsne"]) == 1
    err = capsys.readouterr().err
    assert "no metrics.json below" in err and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_mid_unlearning_records_interrupted_and_a_relaunch_resumes_bit_exact(shared_tmp, monkeypatch):
    extra = ["method.steps=6", "callbacks.model_checkpoint.every_n_train_steps=2", "method.noise=uniform"]
    ref_cfg = compose_cfg(tiny_overrides(shared_tmp, "mae", "ours", runs="resume_ref", extra=extra))
    cli.main(ref_cfg)  # the uninterrupted run (shared with test_resume.py)
    cfg = compose_cfg(tiny_overrides(shared_tmp, "mae", "ours", runs="sigterm", extra=extra))
    original = UnlearnModule.training_step

    def step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    with monkeypatch.context() as m:
        m.setattr(UnlearnModule, "training_step", step)
        with pytest.raises(SystemExit) as exc:
            cli.main(cfg)
    assert exc.value.code == 128 + signal.SIGTERM
    run = run_dir(cfg)
    m1 = json.loads((run / "metrics.json").read_text())
    assert (m1["status"], m1["stage"], m1["step"]) == ("interrupted", "UnlearnModule", 3)
    assert torch.load(run / "resume" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert [r["status"] for r in collect(run.parent)] == ["interrupted"]
    cli.main(cfg)  # the relaunch resumes at step 3
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["status"] == "ok" and m2["unlearn_attempts"] == 2
    assert m2["unlearn_s"] >= sum(json.loads((run / "attempts.json").read_text())["unlearn"]["seconds"][:1])
    ref = torch.load(run_dir(ref_cfg) / "checkpoint.pt", weights_only=True)
    got = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_a_nan_cell_fails_its_row_and_the_sweep_goes_on(shared_tmp):
    overrides = tiny_overrides(shared_tmp, "mae", "ours", runs="nan_sweep")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "i2i_unlearning", "-m", *overrides, "method.alpha=1,nan,0.5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = collect(shared_tmp / "nan_sweep")
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
    assert "method.alpha=nan" in next(r["error"] for r in rows if r["status"] == "failed")
