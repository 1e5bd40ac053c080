"""Safe loading everywhere: every checkpoint and cached model is read with ``weights_only=True`` explicitly, so
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` cannot make a tampered file run code; a refused file gets the project's
own error naming it and saying what to do."""

import json
import os
import re
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_cfg, tiny_overrides

from i2i_unlearning.errors import UnsafeFileError
from i2i_unlearning.runner import build_runner
from i2i_unlearning.training import fit_resumable, make_trainer


class Payload:
    """Pickles as a call that writes ``marker``: what a tampered checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tamper(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload(marker)}, path)


@pytest.fixture
def forced_unsafe(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_control_the_payload_runs_when_loaded_unsafely(tmp_path, forced_unsafe):
    marker = tmp_path / "marker"
    _tamper(tmp_path / "f.ckpt", marker)
    torch.load(tmp_path / "f.ckpt")  # the environment variable turns weights_only off where it is not explicit
    assert marker.exists()


def test_tampered_resume_checkpoint_is_refused_by_name(tmp_path, forced_unsafe):
    marker, ckpt_dir = tmp_path / "marker", tmp_path / "resume"
    _tamper(ckpt_dir / "last.ckpt", marker)
    cfg = compose_cfg(tiny_overrides(tmp_path))
    trainer = make_trainer(cfg, 2, ckpt_dir=ckpt_dir, root=tmp_path)
    data = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)
    with pytest.raises(UnsafeFileError, match=f"{re.escape(str(ckpt_dir / 'last.ckpt'))}: refused.*Delete it") as e:
        fit_resumable(trainer, Tiny(), data, ckpt_dir)
    assert "weights_only=False" not in str(e.value)
    assert not marker.exists()


def test_tampered_cached_reference_model_is_refused_by_name(tmp_path, forced_unsafe):
    marker = tmp_path / "marker"
    runner = build_runner(compose_cfg(tiny_overrides(tmp_path)), tmp_path / "run", "x")
    runner.check()
    runner.data_dir = tmp_path / "data"
    runner.data_dir.mkdir()
    (runner.data_dir / "manifest.json").write_text(json.dumps({"config_hash": "d"}))
    path = runner.reference_path("original")
    _tamper(path, marker)
    path.with_suffix(".json").write_text("{}")
    with pytest.raises(UnsafeFileError, match=f"{re.escape(str(path))}: refused.*Delete it"):
        runner.reference("original")
    assert not marker.exists()


def test_every_torch_load_and_resume_in_the_package_asks_for_weights_only():
    lines = subprocess.run(["grep", "-rnE", r"torch\.load\(|ckpt_path=", str(ROOT / "i2i_unlearning")],
                           capture_output=True, text=True).stdout.splitlines()
    assert lines  # control: the grep finds the calls
    unsafe = [ln for ln in lines if "weights_only=True" not in ln]
    assert unsafe == []
