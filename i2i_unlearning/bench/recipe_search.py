"""``python -m i2i_unlearning.bench.recipe_search [overrides]`` (`make bench-search`): the frontier of ``ours``'
unlearning recipe on the bench's own references, from which each family's bench recipe is picked.

For every family of ``bench.search.families`` and every point of ``bench.search.grid`` (method keys, e.g. alpha
x lr, set over the family's recipe ``bench.unlearn.method``), ``ours`` unlearns from the bench original to the
bench criterion (`unlearn_vs_retrain.unlearn_to_criterion`: the same rule, images, cap and checks as
``make bench``) and the point records whether the criterion was met, the steps and unlearning seconds to it,
and its path (forget / retain FID at every check). The table ranks the met points by steps to the criterion
(every point's step costs the same, so steps are seconds without the timing noise), ties by retain FID (the
larger margin to the budget); the first is the recipe to put in the family's ``bench.unlearn.method``
(conf/bench_size/default.yaml). The points are checked on the bench's own eval images, so the picked point's
ratio is the best of the grid on those images (docs/performance.md lists each grid).

Each point is written as soon as it ends (``<family>.json`` and ``search.md`` under ``bench.search.out_dir``), so
an interrupted search keeps what it measured.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ..atomic import write_json, write_text
from ..errors import ConfigError
from . import unlearn_vs_retrain
from .main import compose_cfg, setup_family

log = logging.getLogger("i2iu")


def grid_points(grid: dict) -> list[list[str]]:
    """Every combination of ``{key: [values]}`` as Hydra overrides, in the grid's order."""
    keys = list(grid)
    for key in keys:
        if not key.startswith("method."):
            raise ConfigError(f"bench.search.grid.{key}: the search varies the unlearning method only; "
                              "use method.* keys (e.g. method.alpha, method.lr)")
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"bench.search.grid.{key}={grid[key]!r}: give a non-empty list of values")
    return [[f"{k}={v}" for k, v in zip(keys, values, strict=True)]
            for values in itertools.product(*(grid[k] for k in keys))]


def _row(point: list[str], u: dict, wall_s: float) -> dict:
    last = u["checks"][-1] if u["checks"] else {}
    return {"point": point, "criterion_met": u["criterion_met"], "steps": u["steps"], "unlearn_s": u["unlearn_s"],
            "forget_fid": last.get("forget_fid"), "retain_fid": last.get("retain_fid"),
            "why_not_met": u["why_not_met"], "criterion": u["criterion"], "checks": u["checks"],
            "references": u["references"], "wall_s": wall_s}


def ranked(rows: list[dict]) -> list[dict]:
    """Met points first, by steps to the criterion then retain FID; then the unmet ones in grid order."""
    met = sorted((r for r in rows if r["criterion_met"]), key=lambda r: (r["steps"], r["retain_fid"]))
    return met + [r for r in rows if not r["criterion_met"]]


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| family | point | criterion | steps | unlearn s | forget FID | retain FID |",
             "|---|---|---|---|---|---|---|"]
    for family, rows in results.items():
        for r in ranked(rows):
            f = "n/a" if r["forget_fid"] is None else f"{r['forget_fid']:.1f}"
            t = "n/a" if r["retain_fid"] is None else f"{r['retain_fid']:.1f}"
            s = "n/a" if r["unlearn_s"] is None else f"{r['unlearn_s']:.1f}"
            lines.append(f"| {family} | {' '.join(r['point'])} | {'met' if r['criterion_met'] else 'not met'} | "
                         f"{r['steps']} | {s} | {f} | {t} |")
    return "\n".join(lines)


def search(overrides: list[str]) -> dict[str, list[dict]]:
    base = compose_cfg(overrides)
    points = grid_points(OmegaConf.to_container(base.bench.search.grid, resolve=True))
    out = Path(base.bench.search.out_dir)
    results: dict[str, list[dict]] = {}
    shared: dict = {}
    for family, extra in base.bench.families.items():
        if family not in base.bench.search.families:
            continue
        extra = list(extra or [])
        f = setup_family(overrides, family, extra, shared)
        results[family] = []
        for i, point in enumerate(points):
            log.info("search %s: point %d/%d: %s", family, i + 1, len(points), " ".join(point))
            cfg = compose_cfg([*overrides, f"model={family}", *extra, *(f"++bench.unlearn.{p}" for p in point)])
            t0 = time.perf_counter()
            u = unlearn_vs_retrain.unlearn_to_criterion(cfg, f.data_dir, f.refs, f.net, f.device, f.perf)
            results[family].append(_row(point, u, time.perf_counter() - t0))
            log.info("search %s: %s", family, f"met at step {u['steps']}, {u['unlearn_s']:.1f} s"
                     if u["criterion_met"] else u["why_not_met"])
            write_json(out / f"{family}.json", {"overrides": overrides, "family_overrides": extra,
                                                "rows": results[family]})
            write_text(out / "search.md", table(results) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[i2iu-bench] %(message)s", force=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(table(search(overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
