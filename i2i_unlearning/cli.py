"""Console entry points: ``i2iu`` (one run, or a sweep with -m) and ``i2iu-report DIR``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .atomic import locked
from .errors import DataError, Interrupted
from .results import RunResult, write_result
from .runs import config_hash, finished, run_dir, semantic_config

log = logging.getLogger("i2iu")
# conf/hydra/launcher/{basic,joblib,submitit_slurm}.yaml deliberately extend the plugins' schemas of the same name
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the top-level Hydra config tree


def make_logger(cfg: DictConfig, run: Path):
    """The configured Lightning logger writing into the run dir (W&B: tagged, grouped, stable id)."""
    if cfg.get("logger") is None:
        return None
    from hydra.utils import instantiate

    if cfg.logger._target_.endswith("WandbLogger"):
        os.environ.setdefault("WANDB_SILENT", "true")

        def wandb_logger(**mode):
            logger = instantiate(
                cfg.logger, name=run.name, id=run.name, save_dir=str(run), group=f"{cfg.data.name}-{cfg.task}",
                tags=[cfg.model.name, cfg.method.name, cfg.data.name, f"seed{cfg.seed}"], resume="allow", **mode,
            )
            logger.log_hyperparams(semantic_config(cfg))  # starts the W&B run
            return logger

        try:
            return wandb_logger()
        except Exception as exc:  # W&B unreachable / not logged in: the run goes on with offline files
            if cfg.logger.get("mode") == "offline":
                raise
            log.warning("W&B unavailable (%s: %s); logging offline into %s/wandb (`wandb sync` it later)",
                        type(exc).__name__, str(exc)[:200], run)
            import wandb

            wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
            return wandb_logger(mode="offline")
    return instantiate(cfg.logger, save_dir=str(run), name="logs")


def _log_results(logger, run: Path, result: dict) -> None:
    if logger is None:
        return
    flat = {f"eval/{k}": v for k, v in {**result["metrics"], **result["floors"]}.items()}
    logger.log_metrics({**flat, "eval/unlearn_s": result["unlearn_s"]})
    if hasattr(logger, "log_image") and (run / "grid.png").exists():
        logger.log_image("eval/grid", images=[str(run / "grid.png")])
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def clear_stale_result(run: Path) -> None:
    """A new attempt starts: a failed or interrupted metrics.json of an earlier one goes (the report then shows
    the cell as incomplete until this attempt writes its own), so no row ever shows an older error."""
    f = run / "metrics.json"
    if f.exists():
        f.unlink()


def objectives(result: dict | None) -> tuple[float, float] | None:
    """(forget FID, retain FID) of an ok run's metrics.json: what ``main`` returns to a sweeper (the Optuna
    preset maximises the first and minimises the second); None for a failed run or one without both scores."""
    metrics = (result or {}).get("metrics") or {}
    if (result or {}).get("status") != "ok" or not all(k in metrics for k in ("forget_fid", "retain_fid")):
        return None
    return float(metrics["forget_fid"]), float(metrics["retain_fid"])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> tuple[float, float] | None:
    """Run one (family, method, data, seed) cell; skip it if an identical run already finished. Returns the
    cell's `objectives` (None when it failed), read from its metrics.json.

    A cell that fails records ``status: failed`` and its error (in a sweep the next cell runs, and an Optuna
    study records a failed trial); a signal (SIGTERM, SIGINT, SIGUSR1) records ``status: interrupted`` with the
    stage and step, and the process exits with 128 + the signal number, a sweep included."""
    from .runner import check_size

    logging.basicConfig(level=logging.INFO, format="[i2iu] %(message)s", force=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no tips / device banners per stage
    check_size(cfg)
    chash = config_hash(cfg)
    run = run_dir(cfg)  # checks the names that become its path first
    with locked(run.parent / f".{run.name}.lock", f"run {run.name}"):  # one process per cell at a time
        return objectives(_run_cell(cfg, run, chash))


def _run_cell(cfg: DictConfig, run: Path, chash: str) -> dict | None:
    """The cell's run into ``run``, unless an identical run already finished there (the cell's lock held);
    returns its metrics.json object (None when it failed)."""
    from .runner import build_runner, write_config
    from .training import stop_handlers
    from .validation import check_config

    done = finished(run, chash)
    if done:
        log.info("%s: already finished, skipping (delete the dir to re-run)", run)
        return done
    run.mkdir(parents=True, exist_ok=True)
    clear_stale_result(run)
    write_config(cfg, run)
    logger = None
    with stop_handlers():
        try:
            check_config(cfg)  # every value that can be wrong, before any data or model work
            logger = make_logger(cfg, run)
            result = build_runner(cfg, run, chash, logger=logger).execute()
        except Interrupted as exc:  # the stage saved its checkpoint: a relaunch resumes from it
            write_result(run, RunResult.interrupted(cfg, chash, exc).to_json())
            log.error("%s interrupted: %s; relaunch the same command to resume", run.name, exc)
            raise SystemExit(exc.exit_code) from None
        except Exception as exc:  # a failed cell is a row with its error, never a silent gap
            write_result(run, RunResult.failed(cfg, chash, exc).to_json())
            if not _multirun():
                raise
            log.error("%s failed: %s: %s", run.name, type(exc).__name__, exc)
            return None
    write_result(run, result)
    _log_results(logger, run, result)
    m = result["metrics"]
    if "retain_cos" not in m:  # GAN runs score generated samples, not paired restorations
        log.info("%s done: %s -> %s", result["method"], ", ".join(f"{k} {v:.3f}" for k, v in m.items()), run)
        return result
    log.info("%s done: retain fid %.3f cos %.3f acc %.3f | forget fid %.3f cos %.3f acc %.3f -> %s",
             result["method"], m["retain_fid"], m["retain_cos"], m["retain_class_acc"],
             m["forget_fid"], m["forget_cos"], m["forget_class_acc"], run)
    return result


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of points")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite ratio")
    return value


def report_main(argv: list[str] | None = None) -> int:
    """``i2iu-report DIR [--out OUT]``: summary.csv / summary.md of every run below DIR, the paper's layout
    (paper_table.md / .csv: mean ± std over seeds), the image grids side by side and the t-SNE figure; the
    trade-off frontier (frontier.png / .md / .csv) when a method ran at several settings, and splits.md when
    the runs differ in their class split."""
    from .report.figures import write_grids
    from .report.frontier import has_settings, has_splits, load_points, write_frontier, write_splits
    from .report.summary import log_summary_to_wandb, write_summary
    from .report.tables import write_paper_table
    from .report.tsne import write_tsne

    p = argparse.ArgumentParser(prog="i2iu-report", description=report_main.__doc__)
    p.add_argument("dir", type=Path, help="a sweep dir (every metrics.json below it is a row)")
    p.add_argument("--out", type=Path, default=None, help="where to write the summary (default: DIR)")
    p.add_argument("--wandb", action="store_true", help="also log the table to W&B (offline unless WANDB_MODE)")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE figure")
    p.add_argument("--tsne-points", type=_positive_int, default=200, metavar="N",
                   help="at most N points per group (retain / forget, output / truth) in the t-SNE (default 200)")
    p.add_argument("--retain-budget", type=_ratio, default=1.1, metavar="X",
                   help="frontier: best forget gain among points with retain FID <= X x the original's (default 1.1)")
    p.add_argument("--split-budget", type=_ratio, default=1.25, metavar="X",
                   help="splits: a split holds when half the retrain gap is closed at retain FID <= X x (default 1.25)")
    a = p.parse_args(argv)
    if not a.dir.is_dir():
        print(f"i2iu-report: {a.dir} is not a directory", file=sys.stderr)
        return 2
    try:
        csv_path, md_path = write_summary(a.dir, a.out)
    except DataError as exc:  # nothing to report: say so, no traceback
        print(f"i2iu-report: {exc}", file=sys.stderr)
        return 1
    paper_md, paper_csv = write_paper_table(a.dir, a.out)
    written = [csv_path, md_path, paper_md, paper_csv, *write_grids(a.dir, a.out)]
    print(md_path.read_text())
    print(paper_md.read_text())
    points = load_points(a.dir)
    if has_settings(points):
        written += write_frontier(a.dir, a.out, retain_budget=a.retain_budget)
        print(written[-2].read_text())
    if has_splits(points):
        written += write_splits(a.dir, a.out, retain_budget=a.split_budget)
        print(written[-1].read_text())
    if not a.no_tsne:
        tsne = write_tsne(a.dir, a.out, max_points=a.tsne_points)
        if not tsne:
            print(f"t-SNE skipped: no run below {a.dir} has an embeddings.npz")
        written += tsne
    print("wrote:\n" + "\n".join(f"  {path}" for path in written))
    if a.wandb:
        print(f"logged the table to W&B: {log_summary_to_wandb(csv_path)}")
    return 0
