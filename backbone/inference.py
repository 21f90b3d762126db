"""Inference-only rewrites of a trained GoogLeNet that give the same outputs, faster.

- BatchNorm folded into the preceding convolution (torch's ``fuse_conv_bn_eval``): one pass over
  the activations instead of two.
- In every inception module the three 1x1 convolutions that read the module's input (branch 1,
  and the reductions of branches 2 and 3) merged into one convolution: one larger GEMM instead of
  three small ones.
- Weights and activations in channels_last, the layout oneDNN's CPU kernels prefer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from backbone.googlenet import BasicConv2d, GoogLeNet, Inception


def fold_batch_norm(model: nn.Module) -> None:
    """In place: every BasicConv2d's BatchNorm folded into its convolution (eval mode only)."""
    for module in model.modules():
        if isinstance(module, BasicConv2d) and module.bn is not None:
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = None


def merge_inception_1x1(module: Inception) -> None:
    """In place: the module's three input-side 1x1 convolutions as one (weights concatenated)."""
    convs = [module.branch1.conv, module.branch2[0].conv, module.branch3[0].conv]
    if any(c.bias is None for c in convs):
        raise ValueError("merge the 1x1 convolutions after folding BatchNorm (they need biases)")
    merged = nn.Conv2d(convs[0].in_channels, sum(c.out_channels for c in convs), kernel_size=1)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([c.weight for c in convs]))
        merged.bias.copy_(torch.cat([c.bias for c in convs]))
    module.fused_1x1 = merged.to(device=convs[0].weight.device, dtype=convs[0].weight.dtype)


def fuse_for_inference(model: GoogLeNet, merge_1x1: bool = True, channels_last: bool = True) -> GoogLeNet:
    """A copy of ``model`` in eval mode, rewritten for speed; the original is left untouched."""
    fused = copy.deepcopy(model).eval()
    fold_batch_norm(fused)
    if merge_1x1:
        for module in fused.modules():
            if isinstance(module, Inception):
                merge_inception_1x1(module)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused
