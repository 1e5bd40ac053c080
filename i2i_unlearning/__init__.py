"""i2i-unlearning: machine unlearning for image-to-image generative models (Lightning + Hydra)."""

__version__ = "0.1.0"
