"""`make faults`: kill a cell at several points of every stage, relaunch it, and check that it ends `ok`
with the results of an uninterrupted run, bit for bit.

One tiny MAE cell (`ours` on synthetic data, CPU) is run once uninterrupted as the reference. Then, for
every stage (preparation, feature network, original, unlearning, evaluation) and each signal (SIGKILL,
SIGTERM, at two delays), a fresh cache and output dir: the cell is launched, killed a moment after the
stage's log line, and relaunched until it exits 0. Its metrics.json must say `ok` and hold the reference's metrics, its
checkpoint.pt the reference's tensors. Last, `i2iu-report` is killed while it writes and rerun: its
summary.csv must equal an uninterrupted report's. Extra Hydra overrides are passed through.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # stage -> the log line that starts it
    "preparation": "preparing data",
    "feature network": "training the feature net",
    "original": "training the original",
    "unlearning": "unlearning: ",
    "evaluation": "evaluating ",
}
# (seconds after the stage's line, signal): early in the stage, and later in it
FAULTS = ((0.3, signal.SIGKILL), (1.5, signal.SIGTERM))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


def overrides(tmp: Path, extra: list[str]) -> list[str]:
    return ["data=synthetic", "model=mae", "method=ours", "logger=none", "model.size=tiny",
            f"paths.output_dir={tmp / 'runs'}", f"paths.cache_dir={tmp / 'cache'}", "model.train.epochs=1",
            "model.train.batch_size=16", "metrics.feature_net.epochs=2", "metrics.is_splits=2",
            "method.steps=40", "method.batch_size=8", "callbacks.model_checkpoint.every_n_train_steps=3",
            *extra]


def launch(args: list[str], marker: str | None = None, delay: float = 0.0, sig: int = signal.SIGKILL) -> tuple:
    """Run the cell; with ``marker``, send ``sig`` ``delay`` seconds after the first line containing it.
    Returns (exit code, whether the signal was sent, the output)."""
    proc = subprocess.Popen([sys.executable, "-m", "i2i_unlearning", *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, sent = [], threading.Event()
    for line in proc.stdout:
        lines.append(line)
        if marker and marker in line and not sent.is_set():
            sent.set()
            threading.Timer(delay, lambda: proc.poll() is None and proc.send_signal(sig)).start()
    return proc.wait(), sent.is_set(), "".join(lines)


def result(tmp: Path) -> tuple[dict, dict]:
    (metrics,) = (tmp / "runs").rglob("metrics.json")
    return json.loads(metrics.read_text()), torch.load(metrics.parent / "checkpoint.pt", weights_only=True)


def fault(tmp: Path, extra: list[str], stage: str, delay: float, sig: signal.Signals, ref: tuple) -> bool:
    """Kill the cell ``delay`` s into ``stage`` with ``sig``, relaunch it until it exits 0 (at most 3 times);
    whether it ended ``ok`` with the reference's metrics and weights."""
    t0 = time.perf_counter()
    rc, sent, _ = launch(overrides(tmp, extra), STAGES[stage], delay, sig)
    relaunches = 0
    while rc != 0 and relaunches < 3:
        rc, _, _ = launch(overrides(tmp, extra))
        relaunches += 1
    (ref_m, ref_w), (m, w) = ref, (result(tmp) if rc == 0 else ({}, {}))
    same = m.get("status") == "ok" and m.get("metrics") == ref_m["metrics"] and w.keys() == ref_w.keys() \
        and all(torch.equal(w[k], ref_w[k]) for k in ref_w)
    print(f"{stage:16s} +{delay:.1f}s {sig.name:8s} {'killed' if sent else 'ended before the signal':23s} "
          f"relaunches {relaunches}  {'identical' if same else 'DIFFERS'}  ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return same


def main(extra: list[str]) -> int:
    base = Path(tempfile.mkdtemp(prefix="i2iu-faults-"))
    try:
        rc, _, out = launch(overrides(base / "reference", extra))
        if rc != 0:
            print(out[-3000:])
            return 1
        ref = result(base / "reference")
        failures = [f"{stage} +{delay}s {sig.name}" for stage in STAGES for delay, sig in FAULTS
                    if not fault(base / f"{stage.replace(' ', '_')}-{sig.name}", extra, stage, delay, sig, ref)]
        failures += report_check(base / "reference")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("all identical" if not failures else f"differ: {failures}")
    return 1 if failures else 0


def report_check(tmp: Path) -> list[str]:
    """Kill ``i2iu-report`` while it writes, rerun it: its summary.csv equals an uninterrupted report's."""
    cmd = [sys.executable, "-c", "import sys; from i2i_unlearning.cli import report_main; sys.exit(report_main())"]
    runs = str(tmp / "runs")
    subprocess.run([*cmd, runs, "--out", str(tmp / "report_ref"), "--no-tsne"], env=ENV, capture_output=True,
                   check=True)
    proc = subprocess.Popen([*cmd, runs, "--out", str(tmp / "report"), "--no-tsne"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0)
    proc.kill()
    proc.wait()
    subprocess.run([*cmd, runs, "--out", str(tmp / "report"), "--no-tsne"], env=ENV, capture_output=True, check=True)
    same = (tmp / "report" / "summary.csv").read_bytes() == (tmp / "report_ref" / "summary.csv").read_bytes()
    print(f"{'report':16s} killed after 2.0 s, rerun: summary.csv {'identical' if same else 'DIFFERS'}")
    return [] if same else ["report"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
