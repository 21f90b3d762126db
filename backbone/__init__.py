"""GoogLeNet (Inception v1) and the plumbing to pretrain it."""

from backbone.googlenet import VARIANTS, GoogLeNet, GoogLeNetOutputs, googlenet

# ImageNet statistics: every pipeline normalises inputs with these (RGB, [0, 1] scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["VARIANTS", "GoogLeNet", "GoogLeNetOutputs", "googlenet", "IMAGENET_MEAN", "IMAGENET_STD"]
