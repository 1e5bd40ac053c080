"""The paper's layouts as sweeps: `python experiments/paper_tables.py TABLE [hydra overrides...]`.

TABLE is a preset under conf/experiment/: table1 (centre hole, every method, 3 seeds), table2 (smaller
hole), table3_alpha (ours over alpha, with the original run beside it), outpaint_sweep (border ratios).
Overrides pass through, e.g. `model=vqgan`, `hydra/launcher=submitit_slurm trainer=ddp_slurm ...`.
Runs go to outputs/<table>/runs (finished cells are skipped on a relaunch), then the report is written to
outputs/<table>: summary.md, paper_table.md, figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from i2i_unlearning.cli import report_main

TABLES = ("table1", "table2", "table3_alpha", "outpaint_sweep")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TABLES:
        print(f"usage: paper_tables.py {{{','.join(TABLES)}}} [hydra overrides...]", file=sys.stderr)
        return 2
    table, overrides = argv[0], argv[1:]
    out = Path("outputs") / table
    prog = [sys.executable, "-m", "i2i_unlearning"]
    common = [f"paths.output_dir={out / 'runs'}", *overrides]
    rc = 0
    if table == "table3_alpha":  # the reference row the alpha rows are compared with
        rc |= subprocess.call([*prog, *common, "method=original"])
    rc |= subprocess.call([*prog, "-m", f"experiment={table}", *common])
    return report_main([str(out / "runs"), "--out", str(out)]) or rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
