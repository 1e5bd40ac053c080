"""A 2-process CPU DDP fit (gloo) of the unlearning step: ranks stay in sync, decoder frozen."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from i2i_unlearning.data.prepare import prepare
from i2i_unlearning.data.sources import SyntheticSource


@pytest.mark.slow
def test_two_process_ddp_unlearning_fit(tmp_path):
    data_dir = prepare(SyntheticSource(num_classes=3, per_class_train=24, per_class_test=4, size=28),
                       tmp_path / "data", forget_classes=["class_0"], retain_classes=["class_1"],
                       image_size=32, shard_size=16)
    script = Path(__file__).with_name("_ddp_fit.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(data_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == 2
    for k in r0["student"]:  # gradients were all-reduced: both ranks hold the same weights
        assert torch.equal(r0["student"][k], r1["student"][k]), k
    changed = [k for k in r0["student"] if not torch.equal(r0["student"][k], r0["teacher"][k])]
    assert changed and all(k.startswith(("patch_embed", "cls_token", "blocks", "norm")) for k in changed)
