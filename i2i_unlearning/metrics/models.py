"""Which feature models score a run, from ``cfg.metrics``.

* ``metrics.features``: ``default`` (the data set's own CNN, trained once and cached), ``fid_inception``
  (the standard FID network and resize, from ``metrics.fid_inception_weights``) or ``inception``
  (torchvision's Inception-v3 from ``metrics.inception_weights``): FID, IS, class accuracy and the input floors.
* ``metrics.embedding``: ``features`` (the same model's embedding) or ``clip`` (OpenCLIP
  ``metrics.clip_model`` from ``metrics.clip_weights``): cosine similarity, audits and t-SNE.

`check_metrics_config` runs with the other config checks, before any data, training or generation,
so a missing weights file fails at once with the file it expects and where to get it.
"""

from __future__ import annotations

from collections.abc import Callable

from i2i_unlearning.errors import ConfigError
from i2i_unlearning.metrics.features import FeatureModel

FEATURES = ("default", "fid_inception", "inception")
EMBEDDINGS = ("features", "clip")


def _choice(m, key: str, default: str, valid: tuple[str, ...]) -> str:
    value = str(m.get(key, default))
    if value not in valid:
        raise ConfigError(f"metrics.{key}={value!r}: use one of {list(valid)}")
    return value


def check_metrics_config(m) -> None:
    """Valid choices, their weights files present and open_clip importable (ConfigError otherwise)."""
    from i2i_unlearning.metrics import clip, inception

    features = _choice(m, "features", "default", FEATURES)
    if features == "inception":
        inception.check_weights_file(m.get("inception_weights"), "metrics.inception_weights", inception.WEIGHTS_HELP)
    elif features == "fid_inception":
        from i2i_unlearning.metrics import fid_inception  # imports torch-fidelity: only when asked for

        inception.check_weights_file(m.get("fid_inception_weights"), "metrics.fid_inception_weights",
                                     fid_inception.WEIGHTS_HELP)
    if _choice(m, "embedding", "features", EMBEDDINGS) == "clip":
        clip.check_weights_file(m.get("clip_weights"), "metrics.clip_weights", clip.WEIGHTS_HELP)
        clip.import_open_clip()


def feature_models(m, default_net: Callable[[], tuple[FeatureModel, dict]]
                   ) -> tuple[FeatureModel, FeatureModel | None, dict]:
    """(feature model for FID / IS / class accuracy, embedding model for cosine / audit / t-SNE or None
    when it is the feature model itself, info to record). ``default_net()`` gives the default
    network and its info, and is only called for ``metrics.features=default``."""
    check_metrics_config(m)
    if m.get("features", "default") == "inception":
        from i2i_unlearning.metrics.inception import InceptionFeatures

        net = InceptionFeatures(m.inception_weights)
        info = {"features": "inception", "weights": net.weights_path, "variant": net.variant,
                "num_classes": net.num_classes}
    elif m.get("features", "default") == "fid_inception":
        from i2i_unlearning.metrics.fid_inception import FidInceptionFeatures

        net = FidInceptionFeatures(m.fid_inception_weights)
        info = {"features": "fid_inception", "weights": net.weights_path, "resize": "clean-fid clean (PIL bicubic)",
                "num_classes": net.num_classes}
    else:
        net, info = default_net()
        info = {"features": "default", **info}
    embed = None
    if m.get("embedding", "features") == "clip":
        from i2i_unlearning.metrics.clip import ClipFeatures

        embed = ClipFeatures(m.clip_weights, model_name=str(m.get("clip_model", "ViT-H-14")))
        info.update(embedding="clip", clip_model=embed.model_name, clip_weights=embed.weights_path)
    return net, embed, info
