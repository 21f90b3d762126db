"""GoogLeNet (Inception v1) and the plumbing to pretrain it."""

import os

# albumentations asks PyPI for a newer release on import; this project runs offline, and the
# question is noise in every tool's output. Set before anything imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from backbone.googlenet import VARIANTS, GoogLeNet, GoogLeNetOutputs, googlenet  # noqa: E402

# ImageNet statistics: every pipeline normalises inputs with these (RGB, [0, 1] scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["VARIANTS", "GoogLeNet", "GoogLeNetOutputs", "googlenet", "IMAGENET_MEAN", "IMAGENET_STD"]
