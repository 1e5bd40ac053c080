"""OpenCLIP image embeddings as a feature model (``metrics.embedding=clip``), from a local weights file.

The paper's cosine similarity (and the reference's t-SNE) uses OpenCLIP ViT-H-14 with the LAION-2B
weights ``laion2b_s32b_b79k``. The model is built from open_clip's config of ``metrics.clip_model``
without any download and filled strictly from ``metrics.clip_weights`` (read safely, weights.py).
open_clip is the optional extra ``clip`` (``pip install -e .[clip]``).

CLIP has no class head: ``embed_with_logits`` returns an empty (B, 0) logits tensor, so it serves the
embedding (cosine, audit, t-SNE) and can never be mistaken for a classifier (an argmax over it fails).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from i2i_unlearning.errors import ConfigError
from i2i_unlearning.metrics.inception import check_weights_file
from i2i_unlearning.weights import load_weights

WEIGHTS_HELP = (
    "Put a local copy of the OpenCLIP weights of metrics.clip_model there (the paper: ViT-H-14 with the "
    "LAION-2B s32b_b79k weights, the open_clip weights file, .safetensors or open_clip_pytorch_model.bin, of "
    "the Hugging Face repository laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and set "
    "metrics.clip_weights=/path/to/that/file"
)


def import_open_clip():
    """The open_clip module, or a ConfigError saying how to install the optional extra."""
    try:
        import open_clip
    except ImportError as exc:
        raise ConfigError(
            f"metrics.embedding=clip needs open_clip, which is not installed ({exc}); install the optional "
            "extra: pip install -e '.[clip]' (open_clip_torch, pinned in pyproject.toml)"
        ) from None
    return open_clip


class ClipFeatures(nn.Module):
    """L2-normalised OpenCLIP image embeddings of RGB images in [0, 1] at the model's input size."""

    in_channels = 3

    def __init__(self, weights: str | Path, model_name: str = "ViT-H-14", key: str = "metrics.clip_weights"):
        super().__init__()
        path = check_weights_file(weights, key, WEIGHTS_HELP)
        open_clip = import_open_clip()
        try:  # no pretrained tag, no weights: nothing is fetched
            model = open_clip.create_model(model_name, pretrained=None, load_weights=False, pretrained_text=False)
        except RuntimeError as exc:
            raise ConfigError(f"metrics.clip_model={model_name!r}: not an open_clip model config ({exc})") from None
        load_weights(model, path, what=key)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        size = size if isinstance(size, int) else size[0]
        self.visual = model.visual  # the text tower is not needed
        self.image_size = int(size)
        self.embed_dim = int(model.visual.output_dim)
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.model_name, self.weights_path = model_name, str(path)
        self.eval()

    def embed_with_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) in [0, 1] -> ((B, D) unit-norm embedding, (B, 0) empty logits)."""
        if self.training:
            self.eval()
        e = self.visual((x - self.mean) / self.std)
        e = torch.nn.functional.normalize(e.float(), dim=-1)
        return e, e.new_zeros(e.shape[0], 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed_with_logits(x)[0]
