"""The standard FID network and resize (``metrics.features=fid_inception``), from a local weights file.

The network is torch-fidelity's port of the 2015-12-05 TensorFlow Inception graph FID is defined on, filled
from the release file ``pt_inception-2015-12-05-6726825d.pth`` (``metrics.fid_inception_weights``, read
safely: weights.py). Images are prepared as clean-fid's "clean" mode prepares image files: quantised to
uint8 (as a saved PNG), resized to 299 px by clean-fid's own resizer (PIL bicubic per channel, in float),
then scaled by (x - 128) / 128 as in the TF graph. The 2048-d pool features give FID; the logits without the
fc bias (those of the original IS code, torch-fidelity's IS default) give IS and class accuracy (the TF graph's
1008 classes, not indexed as a data set's labels).

The model resizes its input itself (``resizes_input``): the scorer hands it images at their own size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from cleanfid.resize import build_resizer
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from i2i_unlearning.errors import ConfigError
from i2i_unlearning.metrics.inception import check_weights_file
from i2i_unlearning.weights import read_state_dict

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (
    f"Put a local copy of the FID Inception weights {WEIGHTS_FILE} there (pytorch-fid's GitHub release "
    f"fid_weights, https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}; "
    "torch-fidelity's GitHub releases carry it as weights-inception-2015-12-05-6726825d.pth) and set "
    "metrics.fid_inception_weights=/path/to/that/file"
)
# torch-fidelity's modules in the order its forward runs them, up to the 2048-d pool
_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
           "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
           "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


class FidInceptionFeatures(nn.Module):
    """FID Inception pool features (2048-d) and unbiased logits (1008) of RGB images in [0, 1], any size."""

    in_channels = 3
    image_size = 299
    embed_dim = 2048
    num_classes = 1008
    resizes_input = True

    def __init__(self, weights: str | Path, key: str = "metrics.fid_inception_weights"):
        super().__init__()
        path = check_weights_file(weights, key, WEIGHTS_HELP)
        state = read_state_dict(path, key)
        fc = state.get("fc.weight")
        if fc is None or tuple(fc.shape) != (self.num_classes, self.embed_dim):
            shape = "no fc.weight" if fc is None else f"fc.weight of shape {tuple(fc.shape)}"
            raise ConfigError(
                f"{key}={path} has {shape}, not the FID network's ({self.num_classes}, {self.embed_dim}) "
                f"(torchvision's inception_v3_google file goes with metrics.features=inception). {WEIGHTS_HELP}")
        buffer = io.BytesIO()  # the safely read tensors, handed to the library's own (strict) loader
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=buffer)
        except RuntimeError as exc:
            raise ConfigError(f"{key}={path} does not fit the FID Inception network: {exc}. {WEIGHTS_HELP}") from None
        self.resize = build_resizer("clean")
        self.weights_path = str(path)
        self.eval()

    def prepare(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) float in [0, 255]: quantised to uint8 (rounded, as
        torchvision's save_image), then clean-fid's "clean" resize, image by image on the CPU."""
        images = x.detach().mul(255).add(0.5).clamp(0, 255).to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
        resized = np.stack([self.resize(image) for image in images])
        return torch.from_numpy(resized).permute(0, 3, 1, 2).to(x.device)

    def embed_with_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] -> ((B, 2048) pool features, (B, 1008) logits without the fc bias)."""
        if self.training:
            self.eval()
        h = (self.prepare(x) - 128) / 128
        for name in _LAYERS:
            h = getattr(self.net, name)(h)
        features = h.flatten(1)
        return features, features @ self.net.fc.weight.T

    def forward(self, x: Tensor) -> Tensor:
        return self.embed_with_logits(x)[1]
