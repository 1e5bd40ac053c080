"""The bench runs end to end at tiny size; the frozen-teacher fast paths are exact and hold no graph."""

import json

import pytest
import torch
from conftest import ROOT

from i2i_unlearning.bench.main import RATIO_GOALS, main
from i2i_unlearning.bench.recipe_search import main as search_main
from i2i_unlearning.data.degrade import center_mask, random_block_mask
from i2i_unlearning.families.diffusion import Diffusion
from i2i_unlearning.families.mae import MAE
from i2i_unlearning.unlearning import methods as M
from i2i_unlearning.unlearning.module import UnlearnModule


@pytest.mark.slow
def test_bench_tiny_writes_every_ratio_for_every_family_and_the_recipe_search_reuses_its_references(tmp_path, capsys):
    common = ["bench_size=tiny", "data=synthetic", f"paths.cache_dir={tmp_path / 'cache'}",
              f"bench.out_dir={tmp_path / 'out'}"]
    rc = main(common)
    doc = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert rc == 0, {f: r["errors"] for f, r in doc["results"].items() if r}
    assert set(doc["ratios"]) == {"mae", "vqgan", "diffusion", "gan"}
    for family, ratios in doc["ratios"].items():
        assert set(ratios) == set(RATIO_GOALS), family
        for key, r in ratios.items():
            assert {"x", "abs", "why_na"} <= set(r)
            if family == "gan":  # not an I2I model: only unlearn vs retrain (bench.gan), the rest say why not
                assert (r["x"] is not None) == (key == "unlearn_vs_retrain_x") and (r["x"] is None) == bool(r["why_na"])
            else:
                assert (r["x"] is not None) == (r["why_na"] is None), (family, key)
                nothing_to_forget = key.startswith("unlearn_vs_retrain") and str(r["why_na"]).startswith(
                    "retraining does not raise forget FID")  # a tiny retrain may not: the bench says so
                assert r["x"] is not None or key.startswith("eval_memory") or nothing_to_forget, (family, key, r)
    for family in ("mae", "vqgan", "diffusion"):
        res = doc["results"][family]
        ulr = res["unlearn_vs_retrain"]
        assert ulr["retrain"]["how"].startswith("extrapolated from")
        row = doc["ratios"][family]["unlearn_vs_retrain_x"]
        assert row["x"] is None or "the retrain trained in this process" in row["abs"]  # where its time came from
        assert ulr["unlearn"]["target"] == "retrain" and set(ulr["unlearn"]["references"]) == {"original", "retrain"}
        assert res["config"]["bench_retrain"]["steps"] < res["config"]["bench_original"]["steps"]  # retain only
        assert set(res["unlearn_vs_retrain"]["growth"]) == {"bench", "half_fashion_mnist", "full_fashion_mnist"}
        assert res["eval"]["sizes"].keys() == {"8", "16"}
    gan = doc["results"]["gan"]  # the cascade to its criterion against a retrain trained to its patience rule
    for setting in ("class", "item"):
        r = gan[setting]
        assert r["x"] == pytest.approx(r["retrain_s"] / r["unlearn_s"]) and r["retrain_s"] > 0
        assert 1 <= r["retrain_epochs"] <= 2 and len(r["retrain_val_fid_curve"]) == r["retrain_epochs"]
        assert 1 <= r["rounds"] <= 2 and r["criterion_met"] == (r["criterion_values"][-1] <= r["criterion_bound"])
    retrain_share = gan["class"]["retrain_metrics"]["forget_class_share"]  # class: reach retrain's own share
    assert gan["class"]["criterion_bound"] == pytest.approx(max(1.1 * retrain_share, 1e-6))
    assert "item: x" in doc["ratios"]["gan"]["unlearn_vs_retrain_x"]["abs"]
    mae = doc["results"]["mae"]  # its bench original trains 16-image steps, its recipe 32: scaled by (1)
    assert mae["cost"]["kinds"]["train[recipe batch]"]["images"] == 32
    retrain = mae["unlearn_vs_retrain"]["retrain"]
    scale = retrain["recipe_step_x_bench_step"]
    assert scale == pytest.approx(min(2.0, mae["cost"]["kinds"]["train[recipe batch]"]["median_s"]
                                      / mae["cost"]["kinds"]["train"]["median_s"]))
    assert retrain["s_per_step"] == pytest.approx(
        (mae["config"]["bench_retrain"]["train_s"] - mae["config"]["bench_retrain"]["pre_train_s"])
        / mae["config"]["bench_retrain"]["steps"] * scale)
    cached = doc["results"]["mae"]["cost"]["kinds"]["ours[fixed mask, teacher cache]"]
    assert cached["cache_hits"] > 0  # a fixed degradation: the retain items come back and hit
    assert "cost_per_image_x/ours" in capsys.readouterr().out
    # the recipe search: ours to the same criterion at every grid point, on the bench's cached references
    ours = mae["unlearn_vs_retrain"]["unlearn"]  # the bench ran the family's own ours: alpha 1.0, lr 6e-4
    assert search_main([*common, "bench.search.families=[mae]",
                        "bench.search.grid={method.alpha:[1.0,2.0],method.lr:[6e-4]}"]) == 0
    log = capsys.readouterr().err
    assert "training the" not in log and "original ready (cached" in log and "retrain ready (cached" in log
    rows = json.loads((tmp_path / "out" / "search" / "mae.json").read_text())["rows"]
    assert [r["point"] for r in rows] == [["method.alpha=1.0", "method.lr=0.0006"],
                                          ["method.alpha=2.0", "method.lr=0.0006"]]
    # seeded, checks on a forked RNG: the point with the bench's recipe repeats the bench's run check for check,
    # although the bench measured step costs first (and so drew other random numbers) before unlearning
    strip = [{k: v for k, v in c.items() if k != "steps_s"} for c in ours["checks"]]
    assert strip, "the tiny bench ran no check (nothing to forget): the comparison below would be empty"
    assert [{k: v for k, v in c.items() if k != "steps_s"} for c in rows[0]["checks"]] == strip
    assert rows[0]["steps"] == ours["steps"] and rows[0]["criterion_met"] == ours["criterion_met"]
    for r in rows:
        assert r["references"] == mae["unlearn_vs_retrain"]["unlearn"]["references"]  # the same models and images
        if r["criterion_met"]:
            assert r["unlearn_s"] > 0 and r["checks"][-1]["step"] == r["steps"]
        else:  # capped, or nothing to forget on tiny synthetic data: the row says which
            assert r["why_not_met"]
    assert (tmp_path / "out" / "search" / "search.md").read_text().count("| mae | method.alpha=") == 2
    assert (ROOT / "conf" / "bench.yaml").is_file()


def tiny_mae() -> MAE:
    torch.manual_seed(0)
    return MAE(image_size=16, channels=1, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_dim=16,
               decoder_depth=1, decoder_heads=1)


def tiny_diffusion() -> Diffusion:
    torch.manual_seed(0)
    return Diffusion(image_size=16, channels=1, block_channels=(8, 16), attention=(False, True), norm_groups=4,
                     attention_head_dim=4, sample_steps=2)


def batch(n: int, seed: int, mask: torch.Tensor | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    m = mask.expand(n, -1, -1, -1).clone() if mask is not None else random_block_mask(n, 16, 4, generator=g)
    return {"image": torch.rand(n, 1, 16, 16, generator=g), "mask": m, "key": [f"item{seed}-{i}" for i in range(n)]}


@pytest.mark.parametrize("fn", ["embed", "predict"])
def test_cached_teacher_outputs_equal_recomputed(fn):
    model = tiny_mae().eval()
    fixed = center_mask(16, 0.5)
    b = batch(6, 1, fixed)
    cached = M.FrozenTeacher(model, cache=M.TeacherCache())
    first = cached.outputs(fn, [(b["image"], b["mask"], None, b["key"])])[0]
    again = cached.outputs(fn, [(b["image"], b["mask"], None, b["key"])])[0]
    fresh = M.FrozenTeacher(model).outputs(fn, [(b["image"], b["mask"], None, None)])[0]
    assert (cached.cache.hits, cached.cache.misses) == (1, 1)
    assert torch.equal(again, fresh) and torch.equal(first, fresh)
    # other batch compositions: a reordered subset is served from the cache and equals recomputation
    order = torch.tensor([4, 0, 2])
    sub = [b["key"][i] for i in order]
    hit = cached.outputs(fn, [(b["image"][order], b["mask"][order], None, sub)])[0]
    assert cached.cache.hits == 2
    torch.testing.assert_close(hit, M.FrozenTeacher(model).outputs(fn, [(b["image"][order], b["mask"][order],
                                                                         None, None)])[0], rtol=1e-6, atol=1e-6)
    # exact by construction: the same items under another mask miss
    other = center_mask(16, 0.25).expand(6, -1, -1, -1).clone()
    cached.outputs(fn, [(b["image"], other, None, b["key"])])
    assert cached.cache.misses == 2


def test_cached_teacher_gives_the_same_loss_as_recomputing():
    fixed = center_mask(16, 0.5)
    forget, retain = batch(4, 2, fixed), batch(4, 3, fixed)
    model, method = tiny_mae(), M.Ours("ours", noise="uniform")
    cached = UnlearnModule(model, method, teacher_cache=True)
    plain = UnlearnModule(model, method)
    for _ in range(2):  # the second call hits the cache for the retain batch
        torch.manual_seed(7)
        a = method.loss(cached.student, cached.frozen, forget, retain)
        torch.manual_seed(7)
        b = method.loss(plain.student, plain.frozen, forget, retain)
        assert torch.equal(a["loss"], b["loss"])
    assert cached.frozen.cache.hits == 1


@pytest.mark.parametrize("make", [tiny_mae, tiny_diffusion])
@pytest.mark.parametrize("name", ["ours", "random_encoder", "retain_label"])
def test_inference_mode_teacher_holds_no_autograd_graph(make, name):
    model = make()
    method = {"ours": M.Ours, "random_encoder": M.RandomEncoder, "retain_label": M.RetainLabel}[name](name)
    module = UnlearnModule(model, method)
    module.train()
    forget, retain = batch(4, 4), batch(4, 5)
    seen = []
    fn = "predict" if name == "retain_label" else "embed"
    original = getattr(module.teacher, fn)

    def spy(*args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return original(*args, **kwargs)

    setattr(module.teacher, fn, spy)
    state = draw = None
    if isinstance(model, Diffusion):
        state = model.sample_state(retain["image"], retain["mask"])
        draw = model.sample_state(forget["image"], forget["mask"])
    outs = module.frozen.outputs(fn, [(retain["image"], retain["mask"], state, None),
                                      (forget["image"], forget["mask"], draw, None)])
    for out in outs:
        for t in (out if isinstance(out, list) else [out]):
            assert not t.requires_grad and t.grad_fn is None and not t.is_inference()
    seen.clear()
    loss = method.loss(module.student, module.frozen, forget, retain)["loss"]
    assert seen and all(seen)  # every teacher call ran under inference mode
    loss.backward()  # the targets are usable by autograd
    assert any(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_batched_teacher_equals_separate_calls_within_round_off():
    model = tiny_diffusion().eval()
    forget, retain = batch(4, 6), batch(4, 7)
    reqs = [(retain["image"], retain["mask"], model.sample_state(retain["image"], retain["mask"]), None),
            (forget["image"], forget["mask"], model.sample_state(forget["image"], forget["mask"]), None)]
    for fn in ("embed", "predict"):
        joined = M.FrozenTeacher(model, batch=True).outputs(fn, reqs)
        apart = M.FrozenTeacher(model, batch=False).outputs(fn, reqs)
        torch.testing.assert_close(joined, apart, rtol=1e-5, atol=1e-6)


def test_channels_last_step_matches_the_default_within_round_off():
    forget, retain = batch(4, 8), batch(4, 9)
    losses = []
    for channels_last in (False, True):
        module = UnlearnModule(tiny_diffusion(), M.Ours("ours"), channels_last=channels_last)
        torch.manual_seed(3)
        losses.append(M.Ours("ours").loss(module.student, module.frozen, forget, retain)["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
