"""Inception-v3 as a feature model (``metrics.features=inception``), from a local weights file.

Built from torchvision's ``Inception3`` (no torch-fidelity, no download) and filled with a local state
dict (``metrics.inception_weights``), read safely (weights.py). Its 2048-d pool features feed FID and
its logits IS, through the scorer's usual `FeatureModel` protocol: images in [0, 1] are resized to
299 px (bilinear, by the scorer) and scaled to [-1, 1], the input range of the TF-ported weights.

Two weights files fit (the same tensor names):
* torchvision's ImageNet weights ``inception_v3_google-0cc3c7bd.pth`` (1000 classes, with the
  auxiliary head, which is dropped): the network torchvision ships;
* the FID network of pytorch-fid / torch-fidelity, ``pt_inception-2015-12-05-6726825d.pth``
  (1008 classes): recognised by its 1008 outputs, and then run as that network runs, with the
  pooling of its Mixed_5b-7b branches excluding padding and a max pool in Mixed_7c's pool branch,
  so its features are the standard FID features (up to the resize: the reference's clean-fid
  resizes with PIL bicubic, this one with bilinear interpolation; ``metrics.features=fid_inception``
  gives the standard FID).
"""

from __future__ import annotations

from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import Inception3

from i2i_unlearning.errors import ConfigError
from i2i_unlearning.weights import load_weights, read_state_dict

WEIGHTS_HELP = (
    "Put a local copy of torchvision's Inception-v3 ImageNet weights there, "
    "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth (or the FID network "
    "pt_inception-2015-12-05-6726825d.pth of the pytorch-fid releases on GitHub), and set "
    "metrics.inception_weights=/path/to/that/file"
)
FID_CLASSES = 1008  # the 2015 TF graph's output size, as ported for FID


def _pool_avg_exclusive(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _fid_block_a(self, x: Tensor) -> list[Tensor]:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return [self.branch1x1(x), b5, b3, self.branch_pool(_pool_avg_exclusive(x))]


def _fid_block_c(self, x: Tensor) -> list[Tensor]:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
        d = layer(d)
    return [self.branch1x1(x), b7, d, self.branch_pool(_pool_avg_exclusive(x))]


def _fid_block_e(pool):
    def forward(self, x: Tensor) -> list[Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return [self.branch1x1(x), b3, d, self.branch_pool(pool(x))]

    return forward


def _as_fid_network(net: Inception3) -> None:
    """Switch the pooling of the mixed blocks to the FID graph's (the weights are unchanged)."""
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        block = getattr(net, name)
        block._forward = MethodType(_fid_block_a, block)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        block = getattr(net, name)
        block._forward = MethodType(_fid_block_c, block)
    net.Mixed_7b._forward = MethodType(_fid_block_e(_pool_avg_exclusive), net.Mixed_7b)
    net.Mixed_7c._forward = MethodType(
        _fid_block_e(lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1)), net.Mixed_7c)


def check_weights_file(path, key: str, help_text: str) -> Path:
    """The weights file of ``key`` as a Path; ConfigError naming the expected file when unset or missing."""
    if path is None or str(path) in ("", "???"):
        raise ConfigError(f"{key} is not set. {help_text}")
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={path}: the file does not exist. {help_text}")
    return path


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048-d) and class logits of RGB images in [0, 1] at 299 px."""

    in_channels = 3
    image_size = 299
    embed_dim = 2048

    def __init__(self, weights: str | Path, key: str = "metrics.inception_weights"):
        super().__init__()
        path = check_weights_file(weights, key, WEIGHTS_HELP)
        state = read_state_dict(path, key)
        if "fc.weight" not in state:
            raise ConfigError(f"{key}={path} has no fc.weight: not an Inception-v3 state dict. {WEIGHTS_HELP}")
        num_classes = int(state["fc.weight"].shape[0])
        aux = any(k.startswith("AuxLogits.") for k in state)
        net = Inception3(num_classes=num_classes, aux_logits=aux, transform_input=False, init_weights=False)
        load_weights(net, path, what=key, state=state)
        net.aux_logits, net.AuxLogits = False, None
        self.variant = "fid" if num_classes == FID_CLASSES else "torchvision"
        if self.variant == "fid":
            _as_fid_network(net)
        self.head, net.fc = net.fc, nn.Identity()
        self.net = net
        self.num_classes = num_classes
        self.weights_path = str(path)
        self.eval()

    def embed_with_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, 299, 299) in [0, 1] -> ((B, 2048) pool features, (B, num_classes) logits)."""
        if self.training:
            self.eval()
        features = self.net(x * 2.0 - 1.0)
        return features, self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed_with_logits(x)[1]
