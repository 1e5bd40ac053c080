"""``i2iu-bench [hydra overrides]``: every measurement for every family in one process, the table of
ratios (each with its absolute figures) on stdout, and the same as JSON under ``bench.out_dir``."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import runner
from ..atomic import write_json
from ..cli import CONF_DIR
from . import evaluation, loader, step_cost, unlearn_vs_retrain
from .common import device_of
from .gan import measure_gan

log = logging.getLogger("i2iu")
# (key, goal) of every ratio the bench reports for every family
RATIO_GOALS = {
    **{f"cost_per_image_x/{m}": ("<= 0.8" if m == "ours" else "") for m in
       ("ours", "max_loss", "noisy_label", "retain_label", "random_encoder", "finetune")},
    "unlearn_vs_retrain_x": ">= 100 at the full Fashion-MNIST",
    "unlearn_vs_retrain_projected_x": "",
    "loader_vs_step_x": ">= 3",
    "eval_rate_large_vs_small_x": "flat (1.0)",
    "eval_memory_large_vs_small_x": "flat (1.0)",
    "memory_unlearn_vs_train_x": "",
}
GAN_GOALS = {"unlearn_vs_retrain_x": ">= 185 (the paper's MNIST figure)"}
GAN_WHY = {
    "cost": "the six I2I methods need an encoder and a degraded input; an unconditional GAN has neither "
            "(its cascaded method runs full GAN steps, timed against retraining in unlearn_vs_retrain_x)",
    "unlearn_vs_retrain_x": "opt-in: bench.gan.measure=true (`make bench-gan`) times the cascade to its criterion "
                            "against a retrain trained to its patience rule",
    "unlearn_vs_retrain_projected_x": "no paper recipe to project to: the GAN is timed in full (bench.gan)",
    "other": "GAN runs restore nothing and read no degraded batches: no I2I step, loader or restore+metrics "
             "path to measure",
}


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="bench", overrides=overrides)


def _bench_original_cfg(cfg: DictConfig) -> DictConfig:
    """The family config with the bench's short original recipe (``bench.original``)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(c):
        c.model.train.epochs = float(cfg.bench.original.epochs)
        if cfg.bench.original.get("batch_size"):
            c.model.train.batch_size = int(cfg.bench.original.batch_size)
        if "tokenizer_steps" in c.model.train:
            c.model.train.tokenizer_steps = int(cfg.bench.original.tokenizer_steps)
    return c


def _guard(errors: dict, seconds: dict, name: str, fn, *args, **kwargs):
    """Run one measurement and record its seconds; a failure is recorded (and the rest of the bench
    goes on)."""
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # the JSON says what failed and why
        log.error("bench: %s failed: %s: %s", name, type(exc).__name__, exc)
        errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        return None
    finally:
        seconds[name] = time.perf_counter() - t0


@dataclass
class FamilySetup:
    """What every measurement of one family starts from: its config, data, feature network and the bench's own
    original and retrain models (trained here or loaded from the cache, with their records)."""

    cfg: DictConfig
    ocfg: DictConfig  # the family config with the bench's short reference recipe
    device: torch.device
    perf: dict
    data_dir: Path
    net: torch.nn.Module
    refs: dict
    metas: dict
    cached: dict
    seconds: dict


def setup_family(overrides: list[str], family: str, extra: list[str], shared: dict) -> FamilySetup:
    """Config, prepared data, feature network (``shared`` per data dir) and the two bench references."""
    t_start = time.perf_counter()
    cfg = compose_cfg([*overrides, f"model={family}", *extra])
    device = device_of(cfg)
    perf = runner.perf_options(cfg)
    data_dir = runner.prepare_data(cfg)
    if str(data_dir) not in shared:
        eval_dm = runner.datamodule(cfg, data_dir, {"retain": ["retain_train"]}, 1, 1, cfg.seed, 1)
        shared[str(data_dir)] = runner.feature_net(cfg, data_dir, eval_dm)[0]
    net = shared[str(data_dir)]
    ocfg = _bench_original_cfg(cfg)
    ref = runner.I2IRunner(ocfg, run_dir=Path(ocfg.paths.output_dir), chash="bench")
    ref.data_dir, ref.nets = data_dir, (net, None, {})
    seconds, refs, metas, cached = {"data_and_feature_net": time.perf_counter() - t_start}, {}, {}, {}
    for kind in ("original", "retrain"):  # the same shortened recipe; the retrain on the retain classes only
        path = ref.reference_path(kind)
        cached[kind] = path.exists() and path.with_suffix(".json").exists()
        t0 = time.perf_counter()
        refs[kind], metas[kind] = ref.reference(kind)
        seconds[kind] = time.perf_counter() - t0
        log.info("bench %s: %s ready (%s, %.0f s)", family, kind, "cached" if cached[kind] else "trained",
                 seconds[kind])
    return FamilySetup(cfg, ocfg, device, perf, data_dir, net, refs, metas, cached, seconds)


def run_family(overrides: list[str], family: str, extra: list[str], shared: dict) -> dict:
    """All five measurements for one family."""
    f = setup_family(overrides, family, extra, shared)
    cfg, ocfg, device, perf, data_dir, net = f.cfg, f.ocfg, f.device, f.perf, f.data_dir, f.net
    refs, metas, cached, seconds = f.refs, f.metas, f.cached, f.seconds
    errors: dict[str, str] = {}
    methods = {m: instantiate(compose_cfg([*overrides, f"model={family}", *extra, f"method={m}"]).method)
               for m in cfg.bench.methods}
    recipe = OmegaConf.to_container(cfg.model.train, resolve=True)
    original = refs["original"]
    log.info("bench %s: measuring step costs", family)
    cost = _guard(errors, seconds, "cost", step_cost.measure, cfg, data_dir, original, methods, device, perf)
    step_rate = None
    if cost is not None:
        ours = cost["kinds"]["ours"]
        step_rate = ours["images"] / ours["median_s"]
    log.info("bench %s: loader", family)
    load = _guard(errors, seconds, "loader", loader.measure, cfg, data_dir, original.mask_patch,
                  int(methods["ours"].batch_size), step_rate)
    log.info("bench %s: unlearning to the criterion", family)
    retrain_meta = {**metas["retrain"], "batch_size": int(ocfg.model.train.batch_size)}
    ulr = _guard(errors, seconds, "unlearn_vs_retrain", unlearn_vs_retrain.measure, cfg, data_dir, refs,
                 retrain_meta, cached["retrain"], recipe, net, device, perf, cost)
    log.info("bench %s: evaluation", family)
    ev = _guard(errors, seconds, "eval", evaluation.measure, cfg, data_dir, original, net, device)
    log.info("bench %s: done in %.0f s (%s)", family, sum(seconds.values()),
             ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return {"config": {"model": OmegaConf.to_container(cfg.model, resolve=True), "recipe": recipe,
                       **{f"bench_{kind}": {"epochs": ocfg.model.train.epochs, "steps": m.get("steps"),
                                            "batch_size": ocfg.model.train.batch_size, "train_s": m.get("train_s"),
                                            "pre_train_s": m.get("pre_train_s"),
                                            "source": "cached" if cached[kind] else "trained in this process"}
                          for kind, m in metas.items()},
                       "overrides": [f"model={family}", *extra], "device": str(device), "perf": perf,
                       "precision": str(cfg.trainer.precision)},
            "seconds": seconds, "cost": cost, "loader": load, "unlearn_vs_retrain": ulr, "eval": ev, "errors": errors}


def _gan(overrides: list[str], gan: DictConfig) -> dict:
    """`measure_gan`, or {"error"} when it fails (the rest of the bench goes on)."""
    log.info("bench: gan (bench.gan: class and item unlearning)")
    try:
        return measure_gan(overrides, gan)
    except Exception as exc:  # the JSON says what failed and why
        log.error("bench: gan failed: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def ratios_of(res: dict) -> dict:
    """Every key of RATIO_GOALS: {"x", "abs" (absolute figures), "why_na"}."""
    out = {}
    cost, load, ulr, ev = res.get("cost"), res.get("loader"), res.get("unlearn_vs_retrain"), res.get("eval")
    err = res.get("errors", {})

    def na(key, part):
        out[key] = {"x": None, "abs": "", "why_na": f"{part} failed: {err.get(part, 'not measured').splitlines()[0]}"}

    for m in ("ours", "max_loss", "noisy_label", "retain_label", "random_encoder", "finetune"):
        key = f"cost_per_image_x/{m}"
        if cost is None:
            na(key, "cost")
            continue
        k, t = cost["kinds"][m], cost["kinds"]["train"]
        out[key] = {"x": k["x_train_per_image"], "why_na": None,
                    "abs": f"{k['median_s'] * 1e3:.0f} ms / {k['images']} img vs train {t['median_s'] * 1e3:.0f} ms "
                           f"/ {t['images']} img (x{k['x_train_per_step']:.2f} per step)"}
    if ulr is None:
        na("unlearn_vs_retrain_x", "unlearn_vs_retrain")
        na("unlearn_vs_retrain_projected_x", "unlearn_vs_retrain")
    else:
        u, h = ulr["unlearn"], ulr["growth"][ulr["headline_size"]]
        refs = u["references"]
        last = u["checks"][-1] if u["checks"] else {}
        against = "; ".join(  # both references and where ours ended, so the budget's own level is in view
            f"{split} FID original {refs['original'][f'{split}_fid']:.1f}, "
            f"retrain {refs['retrain'][f'{split}_fid']:.1f}"
            + (f", ours {last[f'{split}_fid']:.1f}" if last else "") for split in ("forget", "retain"))
        if u["unlearn_s"] is None:
            out["unlearn_vs_retrain_x"] = {"x": None, "why_na": u["why_not_met"], "abs": ""}
        else:
            met = ("criterion met" if u["criterion_met"] else
                   f"criterion NOT met ({u['why_not_met']}), so the ratio is an upper bound")
            out["unlearn_vs_retrain_x"] = {
                "x": ulr["x"], "why_na": None, "upper_bound": not u["criterion_met"],
                "abs": f"unlearn {u['unlearn_s']:.1f} s, set-up included ({u['steps']} steps, {u['steps_s']:.1f} s, to "
                       f"{u['criterion']}: {met}; {against}) "
                       f"vs retrain {h['retrain_s']:.0f} s ({h['steps']} steps on {h['retain_images']} retain "
                       f"images, {ulr['retrain']['how']}; {ulr['retrain']['source']})"}
        p = ulr["projection"]
        out["unlearn_vs_retrain_projected_x"] = {
            "x": p["x"], "why_na": p["why_na"],
            "abs": "" if p["x"] is None else f"PROJECTION to {p['setting']}: {p['retrain_images']:.3g} retrain vs "
                                              f"{p['unlearn_images']:.3g} unlearning images"}
    if load is None:
        na("loader_vs_step_x", "loader")
    else:
        out["loader_vs_step_x"] = {
            "x": load["x_step"], "why_na": None if load["x_step"] is not None else "needs the step rate of (1)",
            "abs": f"loader {_fmt(load['images_per_s'], 0)} img/s ({load['workers']} workers) vs ours' step "
                   f"{_fmt(load['step_images_per_s'], 0)} img/s"}
    if ev is None:
        na("eval_rate_large_vs_small_x", "eval")
        na("eval_memory_large_vs_small_x", "eval")
    else:
        s = ev["sizes"]
        a, b = (s[k] for k in sorted(s, key=int))
        out["eval_rate_large_vs_small_x"] = {
            "x": ev["x_rate_large_vs_small"], "why_na": None,
            "abs": f"{a['images']} img: {a['images_per_s']:.0f} img/s; "
                   f"{b['images']} img: {b['images_per_s']:.0f} img/s"}
        out["eval_memory_large_vs_small_x"] = {
            "x": ev["x_memory_large_vs_small"], "why_na": None if a["peak_mib"] is not None else "no memory reading",
            "abs": f"peak +{_fmt(a['peak_mib'], 0)} MiB at {a['images']} img, +{_fmt(b['peak_mib'], 0)} MiB at "
                   f"{b['images']} img"}
    if cost is None:
        na("memory_unlearn_vs_train_x", "cost")
    else:
        k, t = cost["kinds"]["ours"], cost["kinds"]["train"]
        out["memory_unlearn_vs_train_x"] = {
            "x": k["x_train_memory"], "why_na": None if k["peak_mib"] is not None else "no memory reading",
            "abs": f"ours +{_fmt(k['peak_mib'], 1)} MiB vs train +{_fmt(t['peak_mib'], 1)} MiB"}
    return out


def gan_ratios(res: dict | None) -> dict:
    """RATIO_GOALS for the GAN: unlearn vs retrain from `measure_gan` (item unlearning the headline, class in its
    absolute figures); the rest n/a with the reasons."""
    out = {}
    for key in RATIO_GOALS:
        why = GAN_WHY["cost"] if key.startswith(("cost_", "memory_")) else \
            GAN_WHY.get(key, GAN_WHY["other"])
        out[key] = {"x": None, "abs": "", "why_na": why}
    if res is None:
        return out
    if "error" in res:
        out["unlearn_vs_retrain_x"]["why_na"] = f"bench.gan failed: {res['error'].splitlines()[0]}"
        return out

    def part(setting: str) -> str:
        r = res[setting]
        met = "criterion met" if r["criterion_met"] else f"criterion NOT met in {r['rounds']} rounds"
        conv = (f"converged at epoch {r['retrain_best_epoch']} of {r['retrain_epochs']}" if r["retrain_converged"]
                else f"NOT converged: cap of {r['epochs_cap']} epochs hit while improving")
        return (f"{setting}: x{r['x']:.1f}, unlearn {r['unlearn_s']:.1f} s ({r['rounds']} rounds, {met}: "
                f"{r['criterion']} <= {r['criterion_bound']:.3g}) vs retrain {r['retrain_s']:.0f} s ({conv})")

    item = res["item"]
    out["unlearn_vs_retrain_x"] = {
        "x": item["x"], "why_na": None, "upper_bound": not item["criterion_met"],
        "abs": "; ".join(part(s) for s in ("item", "class") if s in res) +
               f"; the paper: up to x{res['paper_x']['mnist']:.0f} (MNIST), "
               f"x{res['paper_x']['cifar10']:.0f} (CIFAR-10)"}
    return out


def table(ratios: dict) -> str:
    """Markdown table; a family whose ratios are all n/a gets one row per reason."""
    lines = ["| family | ratio | x | absolute figures | goal |", "|---|---|---|---|---|"]
    for family, rs in ratios.items():
        if all(r["x"] is None for r in rs.values()):
            by_reason: dict[str, list[str]] = {}
            for key, r in rs.items():
                by_reason.setdefault(r["why_na"], []).append(key)
            for why, keys in by_reason.items():
                lines.append(f"| {family} | {', '.join(keys)} | n/a | {why} | |")
            continue
        for key, r in rs.items():
            x = _fmt(r["x"]) if r["x"] is not None else f"n/a: {r['why_na']}"
            if r.get("upper_bound") and r["x"] is not None:
                x = f"<= {x}"
            goal = GAN_GOALS.get(key, "") if family == "gan" else RATIO_GOALS.get(key, "")
            lines.append(f"| {family} | {key} | {x} | {r['abs']} | {goal} |")
    return "\n".join(lines)


def extra_lines(results: dict) -> str:
    """Growth of the unlearn-vs-retrain ratio with the retained data, and the ours variants."""
    lines = []
    for family, res in results.items():
        if family == "gan":
            continue
        ulr = (res or {}).get("unlearn_vs_retrain")
        if ulr:
            grow = ", ".join(f"{name} ({g['retain_images']} retain img) x{_fmt(g['x'], 1)}"
                             for name, g in ulr["growth"].items())
            lines.append(f"{family}: unlearn vs retrain by retained data: {grow} "
                         f"[retrain {ulr['retrain']['how']}; {ulr['retrain']['source']}]")
        cost = (res or {}).get("cost")
        if cost:
            var = ", ".join(f"{k} x{v['x_train_per_image']:.2f}" for k, v in cost["kinds"].items()
                            if k.startswith("ours["))
            if var:
                lines.append(f"{family}: ours variants, cost per image vs train: {var}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[i2iu-bench] %(message)s", force=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    base = compose_cfg(overrides)
    torch.manual_seed(base.seed)
    results, ratios, shared = {}, {}, {}
    for family, extra in base.bench.families.items():
        if not issubclass(get_class(compose_cfg([*overrides, f"model={family}"]).model.runner._target_),
                          runner.I2IRunner):  # the GAN: only its unlearning to the criterion against retraining
            results[family] = _gan(overrides, base.bench.gan) if base.bench.gan.measure else None
            ratios[family] = gan_ratios(results[family])
            continue
        log.info("bench: %s", family)
        results[family] = run_family(overrides, family, list(extra or []), shared)
        ratios[family] = ratios_of(results[family])
    wall = time.perf_counter() - t0
    text = table(ratios)
    notes = extra_lines(results)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    doc = {"created_utc": stamp, "wall_s": wall, "overrides": overrides, "size": base.bench.size,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       "load_avg": os.getloadavg()},
           "ratios": ratios, "results": results, "table_md": text, "notes": notes}
    out = Path(base.bench.out_dir)
    write_json(out / f"bench-{stamp}.json", doc)
    write_json(out / "latest.json", doc)
    print(text)
    print(notes)
    print(f"\nbench finished in {wall:.0f} s (torch threads {torch.get_num_threads()}); "
          f"wrote {out / f'bench-{stamp}.json'}")
    failed = {f: r.get("errors") or r.get("error") for f, r in results.items()
              if r and (r.get("errors") or r.get("error"))}
    return 1 if failed else 0
