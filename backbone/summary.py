"""The paper's Table 1, computed from a model: one row per layer of the table.

Weights count convolution and linear kernels only (biases and BatchNorm excluded, as the paper's
figures do); multiply-adds are kernel size x output positions. Both are measured with forward
hooks on the real modules, so the table describes the network that runs, not a hand-kept copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from backbone.googlenet import INCEPTION_CHANNELS, GoogLeNet

# Table 1 rows in order: (row label, top-level children it covers). The paper's table has no LRN rows.
TABLE1_LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolution", ("conv1",)),
    ("max pool", ("maxpool1",)),
    ("convolution", ("conv2", "conv3")),
    ("max pool", ("maxpool2",)),
    ("inception (3a)", ("inception3a",)),
    ("inception (3b)", ("inception3b",)),
    ("max pool", ("maxpool3",)),
    ("inception (4a)", ("inception4a",)),
    ("inception (4b)", ("inception4b",)),
    ("inception (4c)", ("inception4c",)),
    ("inception (4d)", ("inception4d",)),
    ("inception (4e)", ("inception4e",)),
    ("max pool", ("maxpool4",)),
    ("inception (5a)", ("inception5a",)),
    ("inception (5b)", ("inception5b",)),
    ("avg pool", ("avgpool",)),
    ("dropout", ("dropout",)),
    ("linear", ("fc",)),
)


@dataclass
class Table1Row:
    label: str
    modules: tuple[str, ...]
    patch_stride: str = ""
    output_size: tuple[int, int, int] = (0, 0, 0)  # H, W, C
    depth: int = 0
    # (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj); None where the paper leaves it blank.
    channels: tuple[int | None, ...] = field(default_factory=lambda: (None,) * 6)
    weights: int = 0
    macs: int = 0


def _describe(model: GoogLeNet, names: tuple[str, ...]) -> tuple[str, int, tuple[int | None, ...]]:
    """Patch size/stride, depth and channel columns of a row, read from the modules."""
    first = getattr(model, names[0])
    if names[0].startswith("inception"):
        return "", 2, INCEPTION_CHANNELS[names[0]]
    if isinstance(first, nn.MaxPool2d):
        return f"{first.kernel_size}x{first.kernel_size}/{first.stride}", 0, (None,) * 6
    if names == ("conv2", "conv3"):
        reduce, conv = model.conv2.conv, model.conv3.conv
        k = conv.kernel_size[0]
        return (
            f"{k}x{k}/{conv.stride[0]}",
            2,
            (None, reduce.out_channels, conv.out_channels, None, None, None),
        )
    if names == ("conv1",):
        conv = model.conv1.conv
        return f"{conv.kernel_size[0]}x{conv.kernel_size[0]}/{conv.stride[0]}", 1, (None,) * 6
    if names == ("fc",):
        return "", 1, (None,) * 6
    return "", 0, (None,) * 6


def compute_table1(model: GoogLeNet, image_size: int = 224) -> list[Table1Row]:
    """Run one image through ``model`` (eval mode, aux heads not involved) and fill Table 1."""
    counts: dict[str, list[int]] = {}
    hooks = []
    for name in (n for _, group in TABLE1_LAYOUT for n in group):
        counts[name] = [0, 0]
        for module in getattr(model, name).modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not _inside_fused_copy(module, model):

                def hook(mod, _inputs, out, key=name):
                    positions = out.shape[-2] * out.shape[-1] if isinstance(mod, nn.Conv2d) else 1
                    counts[key][0] += mod.weight.numel()
                    counts[key][1] += mod.weight.numel() * positions

                hooks.append(module.register_forward_hook(hook))
    shapes: dict[str, tuple[int, int, int]] = {}
    for name in counts:
        hooks.append(
            getattr(model, name).register_forward_hook(
                lambda _m, _i, out, key=name: shapes.__setitem__(key, _shape(out))
            )
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    rows = []
    for label, names in TABLE1_LAYOUT:
        patch, depth, channels = _describe(model, names)
        if label == "avg pool":
            size = shapes["inception5b"][0]
            patch = f"{size}x{size}/1"
        rows.append(
            Table1Row(
                label=label,
                modules=names,
                patch_stride=patch,
                output_size=shapes[names[-1]],
                depth=depth,
                channels=channels,
                weights=sum(counts[n][0] for n in names),
                macs=sum(counts[n][1] for n in names),
            )
        )
    return rows


def _shape(out: torch.Tensor) -> tuple[int, int, int]:
    if out.dim() == 4:
        return (out.shape[2], out.shape[3], out.shape[1])
    return (1, 1, out.shape[-1])


def _inside_fused_copy(module: nn.Module, model: GoogLeNet) -> bool:
    """Inference-fused 1x1 convolutions duplicate branch weights; count the branches only."""
    return any(getattr(m, "fused_1x1", None) is module for m in model.modules())


def format_table1(rows: list[Table1Row]) -> str:
    """Plain-text Table 1: weights in units of 1024 (the paper's K), multiply-adds in millions."""
    cols = ("type", "patch/stride", "output size", "depth", "#1x1", "#3x3red", "#3x3", "#5x5red",
            "#5x5", "pool proj", "params", "ops")  # fmt: skip
    lines = [cols]
    for r in rows:
        h, w, c = r.output_size
        chans = tuple("" if v is None else str(v) for v in r.channels)
        params = f"{r.weights / 1024:.1f}K" if r.weights else ""
        ops = f"{r.macs / 1e6:.1f}M" if r.macs else ""
        lines.append((r.label, r.patch_stride, f"{h}x{w}x{c}", str(r.depth), *chans, params, ops))
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    total_w = sum(r.weights for r in rows)
    total_m = sum(r.macs for r in rows)
    out = ["  ".join(v.ljust(wd) for v, wd in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.append(f"total: {total_w:,} weights ({total_w / 1e6:.2f}M), {total_m / 1e9:.3f}G multiply-adds")
    return "\n".join(out)
