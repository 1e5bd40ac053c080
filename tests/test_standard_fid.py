"""metrics.features=fid_inception against the libraries' own computations, on random weights of the FID network.

The weights file is random weights in the release's layout (pt_inception-2015-12-05-6726825d.pth), loaded by
both sides: the project (torch-fidelity's network, clean-fid's resize) and, as the reference, clean-fid's own
FID of two folders of PNGs with its pytorch-fid port of the network (clean-fid's "clean" mode runs the TF graph
on (x - 128) / 128; its pytorch-fid port is given that input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from i2i_unlearning.errors import ConfigError
from i2i_unlearning.metrics.evaluate import InceptionScoreStream, SplitScorer
from i2i_unlearning.metrics.models import check_metrics_config, feature_models

WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> Path:
    """Random FID-network weights in the release's layout (torchvision's Inception3 with 1008 classes and no aux
    head, whose tensor names the FID port keeps), scaled so activations stay of order one through the network."""
    from torchvision.models import Inception3

    g = torch.Generator().manual_seed(0)
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                for t, low in ((m.weight, 0.8), (m.running_var, 0.8)):
                    t.copy_(low + 0.4 * torch.rand(m.num_features, generator=g))
                for t in (m.bias, m.running_mean):
                    t.copy_(0.1 * torch.randn(m.num_features, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    path = tmp_path_factory.mktemp("weights") / WEIGHTS
    torch.save(net.state_dict(), path)
    return path


def project_net(path: Path):
    cfg = OmegaConf.create({"features": "fid_inception", "fid_inception_weights": str(path)})
    net, embed, info = feature_models(cfg, default_net=lambda: pytest.fail("default net built"))
    assert embed is None and info["features"] == "fid_inception" and info["weights"] == str(path)
    return net


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.slow
def test_network_and_is_are_torch_fidelitys(fid_weights):
    """At 299 px (no resize on either side) the features and unbiased logits are those of torch-fidelity's own
    forward on the same file, and IS (one split) is torch-fidelity's."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    images = random_images(3, 299, seed=1)
    features, logits = project_net(fid_weights).embed_with_logits(images.float() / 255)
    library = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(fid_weights))
    with torch.no_grad():
        lib_features, lib_logits = library(images)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.allclose(features, lib_features, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits, lib_logits, rtol=1e-5, atol=1e-5)
    assert lib_logits.std() > 0.5 and not torch.allclose(lib_features[0], lib_features[1])  # the images differ
    stream = InceptionScoreStream(1008, splits=1)
    stream.update(logits)
    assert stream.compute() == pytest.approx(isc_features_to_metric(lib_logits, splits=1, shuffle=False)
                                             [KEY_METRIC_ISC_MEAN], rel=1e-5)


def save_pngs(images: torch.Tensor, folder: Path) -> str:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return str(folder)


def clean_fid_extractor(path: Path):
    """clean-fid's pytorch-fid port of the FID network, its weights read from ``path`` where it would download
    the release file; fed as its "clean" mode feeds the TF graph: 299 px floats in [0, 255], (x - 128) / 128."""
    from cleanfid import inception_pytorch

    def load(url, progress=False):
        assert url.rsplit("/", 1)[-1] == WEIGHTS  # the release file the library asks for
        return torch.load(path, weights_only=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception_pytorch, "load_state_dict_from_url", load)
        net = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False, normalize_input=False).eval()
    return lambda x: net((x - 128) / 128)[0].flatten(1)


@pytest.mark.slow
@pytest.mark.timeout(900)  # 2048 x 2048 matrix square roots and ~60 Inception passes at 299 px on the CPU
def test_fid_equals_clean_fid_on_the_same_pngs(fid_weights, tmp_path):
    """The project's FID (the SplitScorer path, 32 px images upsampled inside the pipeline) equals clean-fid's
    compute_fid in "clean" mode on folders of the same PNGs; another output set gives another FID."""
    from cleanfid import fid as clean_fid

    truth = random_images(12, 32, seed=2)
    noise = torch.randint(-60, 61, truth.shape, generator=torch.Generator().manual_seed(3))
    outputs = (truth.int() + noise).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(12) % 3
    net = project_net(fid_weights)
    scorer = SplitScorer(net, is_splits=2)
    for i in (0, 6):  # floats in [0, 1], two batches
        scorer.score(outputs[i:i + 6].float() / 255, truth[i:i + 6].float() / 255, labels[i:i + 6])
    ours = scorer.compute()["fid"]

    library = clean_fid.compute_fid(save_pngs(truth, tmp_path / "truth"), save_pngs(outputs, tmp_path / "outputs"),
                                    mode="clean", custom_feat_extractor=clean_fid_extractor(fid_weights),
                                    device=torch.device("cpu"), num_workers=0, batch_size=12, verbose=False,
                                    use_dataparallel=False)
    # the features agree to float32 round-off; the rest is torchmetrics' eigenvalues of sigma1 @ sigma2 against
    # scipy's sqrtm of the same (rank-11) product
    assert ours == pytest.approx(float(library), rel=1e-4)

    control = SplitScorer(net, is_splits=2)
    control.score(random_images(12, 32, seed=4).float() / 255, truth.float() / 255, labels)
    other = control.compute()["fid"]
    assert np.isfinite(other) and abs(other - ours) > 0.1 * ours


def test_missing_or_wrong_weights_file_fails_before_any_work(tmp_path):
    from conftest import compose_cfg, tiny_overrides
    from torchvision.models import Inception3

    from i2i_unlearning.runner import build_runner

    missing = tmp_path / "nowhere" / WEIGHTS
    cfg = compose_cfg(tiny_overrides(tmp_path, extra=["metrics.features=fid_inception",
                                                      f"metrics.fid_inception_weights={missing}"]))
    with pytest.raises(ConfigError, match="the file does not exist") as err:
        build_runner(cfg, tmp_path / "run", "hash").execute()
    assert not (tmp_path / "cache").exists()  # no data prepared, nothing trained or generated
    with pytest.raises(ConfigError, match="metrics.fid_inception_weights is not set") as unset:
        check_metrics_config(OmegaConf.create({"features": "fid_inception"}))
    for message in (str(err.value), str(unset.value)):
        assert WEIGHTS in message and "pytorch-fid" in message and "torch-fidelity" in message

    torchvision_file = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(Inception3(num_classes=1000, aux_logits=True, init_weights=False).state_dict(), torchvision_file)
    with pytest.raises(ConfigError, match=r"fc\.weight of shape \(1000, 2048\).*metrics\.features=inception"):
        project_net(torchvision_file)
