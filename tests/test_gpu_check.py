"""`make gpu-check` without a GPU: it says so and exits 0; its measurement runs on the CPU at tiny size."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make gpu-check measures for real")
def test_without_gpu_it_says_so_and_exits_0(capsys, tmp_path):
    assert load_script().main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "report.md").exists()


def test_step_cost_runs_each_recipe_at_tiny_size(tmp_path):
    assert load_script().main(["--device", "cpu", "--size", "tiny", "--steps", "2", "--families", "mae,diffusion",
                               "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| mae") or line.startswith("| diffusion")]
    assert len(rows) == 2 and "recipe_mage" in rows[0] and "recipe_palette" in rows[1]
    assert all(float(r.split("|")[6]) > 0 for r in rows)  # measured seconds per step
