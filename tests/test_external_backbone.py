"""A backbone defined outside the package, with its config found through ``hydra.searchpath``, runs every
image-to-image method: one module + one config, no edit inside i2i_unlearning/ or tests/."""

import json
import sys
import textwrap

import pytest
from conftest import METHODS, compose_cfg, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.runs import run_dir

BACKBONE = '''
"""A small convolutional inpainter: conv encoder -> embedding map, conv decoder -> pixels."""
import torch
import torch.nn.functional as F
from torch import nn

from i2i_unlearning.families.base import Family


class ConvInpainter(Family):
    def __init__(self, image_size=32, channels=1, width=8, train=None, name="conv_inpainter", pretrained=None):
        super().__init__(image_size, channels, train)
        self.encoder = nn.Sequential(nn.Conv2d(channels + 1, width, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, 2, 1))
        self.decoder = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, channels, 4, 2, 1))

    def encoder_parameter_names(self):
        return {n for n, _ in self.named_parameters() if n.startswith("encoder.")}

    def embed(self, image, mask, state=None):
        return self.encoder(torch.cat([image * (1 - mask), mask], 1))

    def predict(self, image, mask, state=None):
        return torch.sigmoid(self.decoder(self.embed(image, mask)))

    def task_loss(self, image, mask, target=None, state=None):
        target = self.target_of(image) if target is None else target
        err = ((self.predict(image, mask) - target) ** 2 * mask).sum()
        return err / (mask.sum() * image.shape[1]).clamp_min(1)

    @torch.no_grad()
    def restore(self, image, mask, generator=None):
        return image * (1 - mask) + self.predict(image, mask) * mask
'''

CONFIG = '''
_target_: my_backbones.conv_inpainter.ConvInpainter
name: conv_inpainter
runner: {_target_: i2i_unlearning.runner.I2IRunner}
size: default
image_size: ${data.image_size}
channels: ${data.channels}
pretrained: null
width: ${model.sizes.${model.size}.width}
train: {epochs: 1, batch_size: 64, lr: 2.0e-3, weight_decay: 0.0, warmup_steps: 10, seed: 0}
sizes:
  default: {width: 16}
  tiny: {width: 4}
'''
I2I_METHODS = [m for m in METHODS if m not in ("cascaded", "fake_label")]


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """my_backbones/conv_inpainter.py on sys.path and conf/model/conv_inpainter.yaml in a search path."""
    root = tmp_path_factory.mktemp("outside")
    (root / "my_backbones").mkdir()
    (root / "my_backbones" / "__init__.py").write_text("")
    (root / "my_backbones" / "conv_inpainter.py").write_text(textwrap.dedent(BACKBONE))
    (root / "conf" / "model").mkdir(parents=True)
    (root / "conf" / "model" / "conv_inpainter.yaml").write_text(CONFIG)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("my_backbones.conv_inpainter", None)
    sys.modules.pop("my_backbones", None)


@pytest.mark.parametrize("method", I2I_METHODS)
def test_a_backbone_outside_the_package_runs_every_method(outside, shared_tmp, method):
    cfg = compose_cfg(tiny_overrides(shared_tmp, "conv_inpainter", method, runs="outside_runs",
                                     extra=[f"hydra.searchpath=[file://{outside / 'conf'}]"]))
    assert cfg.model.width == 4  # its own tiny size preset
    cli.main(cfg)
    metrics = json.loads((run_dir(cfg) / "metrics.json").read_text())
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["family"] == "conv_inpainter" and metrics["method"] == method
    m = metrics["metrics"]
    assert all(m[k] == m[k] for k in ("retain_fid", "forget_fid", "retain_cos", "forget_class_acc"))  # not NaN
