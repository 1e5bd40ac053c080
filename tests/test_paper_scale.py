"""Paper-scale plumbing on small stand-ins: image-folder trees -> shards, pretrained weights from local files,
Inception / CLIP feature models from local weights files."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from i2i_unlearning.data.image_folder import ImageFolderSource
from i2i_unlearning.data.prepare import SPLIT_NAMES, load_manifest, prepare
from i2i_unlearning.data.shards import read_shard, verify_shards
from i2i_unlearning.errors import ConfigError, DataError

CLASSES = ["n001", "n002", "n003", "n004", "n005", "n006"]
TRAIN_PER_CLASS, EVAL_PER_CLASS = 6, 3
CORRUPT = "n002/broken_0003.JPEG"


def make_tree(root: Path, corrupt: bool = True) -> Path:
    """root/train/<wnid>/ and root/val/<wnid>/: JPEG and PNG of mixed sizes and modes, one corrupt file
    (in train/n002), one non-image file per split."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", EVAL_PER_CLASS)):
        for c, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                pixels = (rng.random((h, w, 3)) * 60 + 30 * c).astype(np.uint8)
                img = Image.fromarray(pixels)
                if i % 2:
                    img.save(folder / f"img_{i:04d}.png")
                else:
                    (img.convert("L") if i % 4 == 0 else img).save(folder / f"img_{i:04d}.JPEG", quality=90)
        (root / split / "README.txt").write_text("not a class folder")
        (root / split / CLASSES[0] / "labels.csv").write_text("not an image")
    if corrupt:
        (root / "train" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


def prepare_tree(root: Path, out: Path, on_corrupt: str = "skip", workers: int = 0, **kw) -> Path:
    source = ImageFolderSource(str(root), name="tiny_folder", on_corrupt=on_corrupt)
    args = dict(forget_classes=None, retain_classes=None, num_forget_classes=2, num_retain_classes=2,
                class_seed=3, image_size=16, train_per_class=4, eval_per_class=2, proxy_per_class=1,
                proxy_eval_per_class=0, shard_size=3, workers=workers)
    return prepare(source, out, **{**args, **kw})


def split_images(data_dir: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    m = load_manifest(data_dir)
    parts = [read_shard(data_dir / s["name"], 3) for s in m["splits"][split]["shards"]]
    if not parts:
        return [], np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64)
    keys = [k for p in parts for k in p[0]]
    return keys, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def test_source_lists_classes_and_ignores_non_images(tree):
    src = ImageFolderSource(str(tree))
    assert src.class_names == CLASSES  # README.txt (a file) is not a class
    files, labels = src.index("train")
    assert len(files) == TRAIN_PER_CLASS * 6 + 1  # + the corrupt .JPEG; labels.csv ignored
    assert not any(f.endswith(".csv") for f in files)
    assert np.bincount(labels).tolist() == [6, 7, 6, 6, 6, 6]
    assert len(src.index("test")[0]) == EVAL_PER_CLASS * 6


def test_image_folder_becomes_shards(tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data_dir = prepare_tree(tree, tmp_path, workers=2)
    m = load_manifest(data_dir)
    # the drawn class lists are saved, disjoint, and the proxy classes are the other two
    assert m["class_draw"]["seed"] == 3 and m["class_draw"]["drawn"] == ["forget", "retain"]
    f, r, p = m["forget_classes"], m["retain_classes"], m["proxy_classes"]
    assert len(f) == len(r) == 2 and len(p) == 2 and sorted(f + r + p) == CLASSES
    counts = {s: m["splits"][s]["count"] for s in SPLIT_NAMES}
    corrupt_split = next((s for s, role in (("forget_train", f), ("retain_train", r), ("proxy_train", p))
                          if "n002" in role), None)
    expect = {"forget_train": 8, "retain_train": 8, "proxy_train": 2, "forget_eval": 4, "retain_eval": 4,
              "proxy_eval": 0}
    corrupt_listed = [b["file"] for bad in m["corrupt"].values() for b in bad]
    if corrupt_listed:  # drawn into a split: reported by name and skipped
        assert corrupt_listed == [f"train/{CORRUPT}"]
        assert CORRUPT.split("/")[1] in caplog.text
        expect[corrupt_split] -= 1
    assert counts == expect
    verify_shards(data_dir, m, list(SPLIT_NAMES))
    for split in ("forget_train", "retain_train", "proxy_train", "forget_eval"):
        keys, images, labels = split_images(data_dir, split)
        assert images.shape[1:] == (16, 16, 3)
        role = split.split("_")[0]
        assert {CLASSES[y] for y in labels} <= set(m[f"{role}_classes"])
        expected = {c: int((labels == CLASSES.index(c)).sum()) for c in m[f"{role}_classes"]}
        assert m["splits"][split]["classes"] == expected
    files = json.loads((data_dir / "files.json").read_text())
    assert all(v.split("/")[0] in f for v in files["forget_train"].values())
    # the same config reuses the shards (and the number of workers is not part of the key)
    assert prepare_tree(tree, tmp_path, workers=0) == data_dir


def test_corrupt_file_skipped_or_fatal(tree, tmp_path, caplog):
    explicit = dict(forget_classes=["n002"], retain_classes=["n003"], train_per_class=None)
    with caplog.at_level(logging.WARNING):
        data_dir = prepare_tree(tree, tmp_path / "skip", **explicit)
    m = load_manifest(data_dir)
    error = m["corrupt"]["forget_train"][0]["error"]
    assert m["corrupt"] == {"forget_train": [{"file": f"train/{CORRUPT}", "error": error}]}
    assert m["splits"]["forget_train"]["count"] == TRAIN_PER_CLASS and "broken_0003.JPEG" in caplog.text
    assert "class_draw" not in m
    with pytest.raises(DataError, match="broken_0003.JPEG.*on_corrupt=skip"):
        prepare_tree(tree, tmp_path / "fail", on_corrupt="fail", **explicit)
    assert not any((tmp_path / "fail").glob("tiny_folder-*"))  # nothing half-written is left


def test_resize_and_centre_crop(tmp_path):
    from i2i_unlearning.data.image_folder import load_square

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre square is white
    Image.fromarray(img).save(tmp_path / "wide.png")
    out = load_square(tmp_path / "wide.png", 20, 3)
    assert out.shape == (20, 20, 3) and out[:, 1:-1].min() >= 250 and out.min() > 200  # bicubic edge


def test_bad_folder_settings_fail_clearly(tmp_path, tree):
    with pytest.raises(DataError, match="missing"):
        _ = ImageFolderSource(str(tmp_path / "nowhere")).class_names
    with pytest.raises(ConfigError, match="on_corrupt"):
        ImageFolderSource(str(tree), on_corrupt="ignore")
    with pytest.raises(ConfigError, match="num_forget_classes"):
        prepare_tree(tree, tmp_path, num_forget_classes=None)
    with pytest.raises(ConfigError, match="only 6 classes"):
        prepare_tree(tree, tmp_path, num_forget_classes=5)


# ---- pretrained weights from local files ------------------------------------------------------------------
def tiny_cfg(tmp: Path, family: str, *extra: str):
    from conftest import compose_cfg, tiny_overrides

    return compose_cfg(tiny_overrides(tmp, model=family, extra=list(extra)))


def tiny_model(tmp: Path, family: str):
    from i2i_unlearning.runner import build_family

    torch.manual_seed(1)
    return build_family(tiny_cfg(tmp, family).model)


def original_from(tmp: Path, family: str, path: Path):
    """The runner's original model with model.pretrained=path (no data needed: nothing is trained)."""
    from i2i_unlearning.runner import build_runner

    return build_runner(tiny_cfg(tmp, family, f"model.pretrained={path}"), tmp / "run", "x").reference("original")


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["mae", "vqgan", "diffusion", "gan"])
def test_family_loads_its_own_checkpoint(tmp_path, family):
    model = tiny_model(tmp_path, family)
    path = tmp_path / "checkpoint.pt"
    torch.save(model.state_dict(), path)  # what the runner saves (run dirs' checkpoint.pt, cached models)
    loaded, meta = original_from(tmp_path, family, path)
    assert same_state(loaded, model) and not loaded.training
    assert meta["train_s"] == 0.0 and meta["pretrained"]["path"] == str(path)


def test_safetensors_and_wrapped_checkpoints(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(tmp_path, "mae")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "mae.safetensors")
    assert same_state(original_from(tmp_path, "mae", tmp_path / "mae.safetensors")[0], model)
    # the official MAE release: {"model": ...} with its fixed sin-cos position tables (with a [CLS] slot)
    tables = {"pos_embed": model.pos_embed, "decoder_pos_embed": model.decoder_pos_embed}  # a zero [CLS] row first
    official = {**state, **{k: torch.cat([torch.zeros(1, 1, t.shape[-1]), t], 1) for k, t in tables.items()}}
    torch.save({"model": official, "epoch": 799}, tmp_path / "mae_official.pth")
    assert same_state(original_from(tmp_path, "mae", tmp_path / "mae_official.pth")[0], model)


def test_diffusion_loads_a_diffusers_unet_folder(tmp_path):
    model = tiny_model(tmp_path, "diffusion")
    model.unet.save_pretrained(tmp_path / "unet")  # config.json + diffusion_pytorch_model.safetensors
    assert same_state(original_from(tmp_path, "diffusion", tmp_path / "unet")[0], model)


def test_wrong_keys_fail_with_their_names(tmp_path):
    state = tiny_model(tmp_path, "mae").state_dict()
    state["blocks.0.attn.qkv.weight_renamed"] = state.pop("blocks.0.attn.qkv.weight")
    state.pop("decoder_pred.bias")
    state["norm.weight"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConfigError) as err:
        original_from(tmp_path, "mae", tmp_path / "bad.pt")
    text = str(err.value)
    assert "model.pretrained=" in text and "bad.pt" in text
    for name in ("blocks.0.attn.qkv.weight", "decoder_pred.bias", "blocks.0.attn.qkv.weight_renamed",
                 "norm.weight (7,)"):
        assert name in text
    with pytest.raises(ConfigError, match="no such file"):
        original_from(tmp_path, "mae", tmp_path / "missing.pt")


class Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "payload": Exploit(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(Exploit(marker), f)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(ConfigError, match="refused to load"):
            original_from(tmp_path, "mae", tmp_path / name)
    assert not marker.exists()


# ---- Inception / CLIP feature models from local weights files -----------------------------------------------
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A randomly initialised torchvision Inception-v3 (with its aux head, as torchvision's file) saved to disk."""
    from torchvision.models import Inception3

    torch.manual_seed(0)
    net = Inception3(num_classes=1000, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("weights") / "inception_v3_google-0cc3c7bd.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_runs_end_to_end(inception_file, tmp_path):
    from i2i_unlearning.metrics.evaluate import SplitScorer
    from i2i_unlearning.metrics.models import feature_models

    cfg = tiny_cfg(tmp_path, "mae", "metrics.features=inception", f"metrics.inception_weights={inception_file}")
    net, embed, info = feature_models(cfg.metrics, default_net=lambda: pytest.fail("default net built"))
    assert embed is None and info["features"] == "inception" and info["variant"] == "torchvision"
    assert (net.embed_dim, net.in_channels, net.image_size) == (2048, 3, 299)
    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(6, 1, 32, 32, generator=gen)  # grey 32 px images: widened to RGB, resized to 299
    outputs = (truth + 0.3 * torch.rand(6, 1, 32, 32, generator=gen)).clamp(0, 1)
    scorer = SplitScorer(net, is_splits=2)
    for i in (0, 3):
        scorer.score(outputs[i:i + 3], truth[i:i + 3], torch.tensor([0, 1, 2]))
    scores = scorer.compute()
    assert scores["n"] == 6 and all(np.isfinite(scores[k]) for k in ("fid", "is", "cos", "class_acc"))


def test_fid_inception_file_runs_as_the_fid_network(tmp_path):
    """The 1008-class FID weights (same tensor names) switch the mixed blocks' pooling."""
    from torchvision.models import Inception3

    from i2i_unlearning.metrics.inception import InceptionFeatures

    torch.manual_seed(0)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), path)
    net = InceptionFeatures(path)
    assert net.variant == "fid" and net.num_classes == 1008
    x = torch.rand(1, 3, 299, 299)
    e, logits = net.embed_with_logits(x)
    plain = Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    plain.load_state_dict(torch.load(path, weights_only=True))
    plain.fc = torch.nn.Identity()
    assert e.shape == (1, 2048) and logits.shape == (1, 1008)
    assert not torch.allclose(e, plain(x * 2 - 1))  # the FID graph's pooling differs from torchvision's


def test_missing_weights_file_fails_before_any_work(tmp_path):
    from i2i_unlearning.runner import build_runner

    missing = tmp_path / "nowhere" / "inception_v3_google-0cc3c7bd.pth"
    cfg = tiny_cfg(tmp_path, "mae", "metrics.features=inception", f"metrics.inception_weights={missing}")
    with pytest.raises(ConfigError) as err:
        build_runner(cfg, tmp_path / "run", "hash").execute()
    assert str(missing) in str(err.value) and "inception_v3_google-0cc3c7bd.pth" in str(err.value)
    assert "download.pytorch.org" in str(err.value)
    assert not (tmp_path / "cache").exists()  # no data prepared, nothing trained or generated
    cfg = tiny_cfg(tmp_path, "mae", "metrics.features=inception")
    with pytest.raises(ConfigError, match="metrics.inception_weights is not set"):
        build_runner(cfg, tmp_path / "run", "hash").execute()
    cfg = tiny_cfg(tmp_path, "mae", "metrics.embedding=clip", f"metrics.clip_weights={tmp_path / 'clip.bin'}")
    with pytest.raises(ConfigError, match=r"clip\.bin: the file does not exist.*laion/CLIP-ViT-H-14"):
        build_runner(cfg, tmp_path / "run", "hash").execute()


def test_clip_embeddings_from_a_local_file(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="open_clip (the optional extra [clip]) is not installed")
    from i2i_unlearning.metrics.models import feature_models

    tiny = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test", pretrained=None)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip.safetensors")
    cfg = tiny_cfg(tmp_path, "mae", "metrics.embedding=clip", "metrics.clip_model=tiny-clip-test",
                   f"metrics.clip_weights={tmp_path / 'clip.safetensors'}")
    net, embed, info = feature_models(cfg.metrics, default_net=lambda: (torch.nn.Identity(), {"test_acc": 1.0}))
    assert info["embedding"] == "clip" and embed.embed_dim == 16 and embed.image_size == 32
    x = torch.rand(4, 3, 32, 32)
    e, logits = embed.embed_with_logits(x)
    assert e.shape == (4, 16) and logits.shape == (4, 0)
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    ref = model.encode_image((x - embed.mean) / embed.std, normalize=True)
    assert torch.allclose(e, ref, atol=1e-5)


def test_image_folder_run_end_to_end(tmp_path):
    """data=image_folder through the whole runner (tiny MAE, RGB 32 px, drawn classes, proxy unlearning)."""
    from i2i_unlearning.runner import build_runner

    root = make_tree(tmp_path / "tree", corrupt=False)
    cfg = tiny_cfg(tmp_path, "mae", "data=image_folder", f"data.source.root={root}", "data.image_size=32",
                   "data.train_per_class=6", "data.eval_per_class=3", "data.proxy_per_class=2",
                   "data.num_workers=0", "data.shard_size=8", "method=ours_proxy", "method.steps=2",
                   "method.batch_size=4", "metrics.audit=false")
    metrics = build_runner(cfg, tmp_path / "run", "hash").execute()
    assert metrics["status"] == "ok" and metrics["dataset"] == "image_folder"
    assert metrics["metrics"]["forget_n"] == 6 and metrics["metrics"]["retain_n"] == 6
    data_dir = next((tmp_path / "cache" / "data").glob("image_folder-*"))
    assert load_manifest(data_dir)["splits"]["proxy_train"]["count"] == 4


@pytest.mark.parametrize("preset,family,data,size", [("imagenet_mae", "mae", "imagenet", 224),
                                                      ("imagenet_vqgan", "vqgan", "imagenet", 256),
                                                      ("places_diffusion", "diffusion", "places365", 256)])
def test_paper_presets_compose(preset, family, data, size):
    from conftest import compose_cfg

    from i2i_unlearning.runner import build_runner

    cfg = compose_cfg([f"experiment=[{preset},table1]", "paths.weights_dir=/nowhere"])
    assert (cfg.model.name, cfg.data.name, cfg.model.image_size, cfg.data.image_size) == (family, data, size, size)
    assert cfg.metrics.features == "fid_inception" and cfg.metrics.embedding == "clip"
    with pytest.raises(ConfigError, match="/nowhere/pt_inception-2015-12-05-6726825d.pth"):
        build_runner(cfg, Path("/nowhere"), "x").check()  # the weights are checked before anything else runs


def test_gan_refuses_paper_metrics(tmp_path, inception_file):
    from conftest import compose_cfg, tiny_overrides

    from i2i_unlearning.runner import build_runner

    cfg = compose_cfg(tiny_overrides(tmp_path, model="gan", method="cascaded", extra=[
        "metrics.features=inception", f"metrics.inception_weights={inception_file}"]))
    with pytest.raises(ConfigError, match="GAN runs score with the data set's own feature network"):
        build_runner(cfg, tmp_path / "run", "x").check()


def test_vqgan_loads_a_pretrained_tokenizer(tmp_path):
    """model.pretrained_tokenizer: a diffusers VQModel folder; the tokenizer stage loads it instead of training."""
    from conftest import prepared_runner

    from i2i_unlearning.families.vqgan import build_tokenizer

    model = tiny_model(tmp_path, "vqgan")
    torch.manual_seed(5)
    vq = build_tokenizer(**model._tokenizer_args)
    vq.save_pretrained(tmp_path / "vq")
    cfg = tiny_cfg(tmp_path, "vqgan", f"model.pretrained_tokenizer={tmp_path / 'vq'}", "model.train.epochs=0.1")
    trained, meta = prepared_runner(cfg, tmp_path / "run").reference("retrain")
    assert meta["pre_train"]["tokenizer"] == "pretrained" and "tokenizer_psnr" in meta["pre_train"]
    assert all(torch.equal(trained.tokenizer.state_dict()[k], v) for k, v in vq.state_dict().items())


def test_parallel_decoding_gives_the_same_shards(tree, tmp_path):
    serial = load_manifest(prepare_tree(tree, tmp_path / "serial", workers=0))
    parallel = load_manifest(prepare_tree(tree, tmp_path / "parallel", workers=2))
    assert serial["splits"] == parallel["splits"] and serial["config_hash"] == parallel["config_hash"]


@pytest.mark.slow
def test_a_run_scores_with_inception_features(tmp_path, inception_file):
    """metrics.features=inception reaches the run: FID / IS / cosine from the Inception network's outputs."""
    from conftest import compose_cfg, tiny_overrides

    from i2i_unlearning.metrics.inception import InceptionFeatures
    from i2i_unlearning.runner import build_runner

    cfg = compose_cfg(tiny_overrides(tmp_path, method="original", extra=[
        "metrics.features=inception", f"metrics.inception_weights={inception_file}", "metrics.audit=false",
        "metrics.eval_limit=8"]))  # a few 299 px Inception passes per split
    calls = []
    embed = InceptionFeatures.embed_with_logits
    InceptionFeatures.embed_with_logits = lambda self, x: calls.append(len(x)) or embed(self, x)
    try:
        result = build_runner(cfg, tmp_path / "run", "h").execute()
    finally:
        InceptionFeatures.embed_with_logits = embed
    m = result["metrics"]
    assert sum(calls) >= 2 * (m["retain_n"] + m["forget_n"])  # outputs and ground truths went through it
    assert all(np.isfinite(m[k]) for k in ("retain_fid", "forget_fid", "retain_is", "retain_cos"))
