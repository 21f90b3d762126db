"""GoogLeNet (Inception v1), Szegedy et al. 2014, "Going deeper with convolutions".

One implementation, three variants:

- ``paper``: Table 1 and Figure 3 as printed: convolutions with biases and ReLU, local response
  normalisation after the stem's first and last convolution, true 5x5 convolutions, 3x3/2 max
  pooling everywhere, dropout 0.4, auxiliary heads with 5x5/3 average pooling.
- ``bn``: the paper's network with BatchNorm after every convolution instead of LRN (5x5 kept).
  Trains from scratch on small data where ``paper`` is hard to optimise.
- ``torchvision``: torchvision's layout to the letter (3x3 in the "5x5" branch, 2x2 ``maxpool4``,
  dropout 0.2, adaptive aux pooling, optional ``transform_input``), so any
  ``torchvision.models.googlenet`` state_dict loads with ``strict=True`` and gives the same outputs.

Child names follow torchvision's, so state_dict keys read as the paper's table rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("paper", "bn", "torchvision")

# The paper's Table 1 columns per inception module:
# (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
INCEPTION_CHANNELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNetOutputs(NamedTuple):
    """What ``GoogLeNet.forward`` returns in every mode; the aux logits are None outside training."""

    logits: Tensor
    aux1: Tensor | None
    aux2: Tensor | None


@dataclass(frozen=True)
class VariantSpec:
    batch_norm: bool
    lrn: bool
    five_by_five: int  # kernel of the "5x5" branch: 5 in the paper, 3 in torchvision
    maxpool4_kernel: int  # 3 in the paper, 2 in torchvision
    dropout: float
    paper_aux_pool: bool  # 5x5/3 average pooling (paper) rather than adaptive 4x4 (torchvision)


SPECS = {
    "paper": VariantSpec(batch_norm=False, lrn=True, five_by_five=5, maxpool4_kernel=3, dropout=0.4,
                         paper_aux_pool=True),
    "bn": VariantSpec(batch_norm=True, lrn=False, five_by_five=5, maxpool4_kernel=3, dropout=0.4,
                      paper_aux_pool=True),
    "torchvision": VariantSpec(batch_norm=True, lrn=False, five_by_five=3, maxpool4_kernel=2, dropout=0.2,
                               paper_aux_pool=False),
}  # fmt: skip


class BasicConv2d(nn.Module):
    """Convolution + (BatchNorm) + ReLU. Without BatchNorm the convolution carries a bias."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=not batch_norm, **conv_kwargs)
        # eps=0.001 as torchvision, so its BatchNorm statistics load unchanged.
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001) if batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    """Figure 2(b): four parallel branches concatenated along channels."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        batch_norm: bool,
        five_by_five: int = 5,
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, batch_norm, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, batch_norm, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, batch_norm, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, batch_norm, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, batch_norm, kernel_size=five_by_five, padding=five_by_five // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, batch_norm, kernel_size=1),
        )
        # Set by backbone.inference.fuse_for_inference: the three 1x1 convolutions that read the
        # module's input, merged into one (one GEMM instead of three).
        self.fused_1x1: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_1x1 is not None:
            splits = [self.branch1.conv.out_channels, self.branch2[0].conv.out_channels,
                      self.branch3[0].conv.out_channels]  # fmt: skip
            b1, b2, b3 = F.relu(self.fused_1x1(x), inplace=True).split(splits, dim=1)
            b2, b3 = self.branch2[1](b2), self.branch3[1](b3)
        else:
            b1, b2, b3 = self.branch1(x), self.branch2(x), self.branch3(x)
        return torch.cat([b1, b2, b3, self.branch4(x)], dim=1)


class InceptionAux(nn.Module):
    """The auxiliary classifier of section 5: avgpool -> 1x1 conv 128 -> FC 1024 -> dropout -> linear."""

    def __init__(
        self, in_channels: int, num_classes: int, batch_norm: bool, paper_pool: bool, dropout: float = 0.7
    ) -> None:
        super().__init__()
        self.paper_pool = paper_pool
        self.conv = BasicConv2d(in_channels, 128, batch_norm, kernel_size=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        # N x 512 (4a) or 528 (4d) x 14 x 14 at 224 px input.
        if self.paper_pool and (x.shape[-2] - 5) // 3 + 1 == 4 and (x.shape[-1] - 5) // 3 + 1 == 4:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)  # the paper's 5x5/3 pooling -> 4 x 4
        else:
            x = F.adaptive_avg_pool2d(x, (4, 4))  # other input sizes still give 4 x 4
        x = self.conv(x)  # N x 128 x 4 x 4
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x), inplace=True)  # N x 1024
        return self.fc2(self.dropout(x))


# Top-level stages in forward order (aux heads, avgpool, dropout and fc excluded): the names
# forward_features accepts. LRN layers exist only in the paper variant.
STAGES = (
    "conv1", "maxpool1", "lrn1", "conv2", "conv3", "lrn2", "maxpool2",
    "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
)  # fmt: skip
AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}


class GoogLeNet(nn.Module):
    def __init__(
        self,
        variant: str = "paper",
        num_classes: int = 1000,
        aux_logits: bool = True,
        dropout: float | None = None,
        dropout_aux: float = 0.7,
        transform_input: bool = False,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if variant not in SPECS:
            raise ValueError(f"unknown GoogLeNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        spec = SPECS[variant]
        self.variant = variant
        self.num_classes = num_classes
        self.aux_logits = aux_logits
        # torchvision's ImageNet weights expect inputs normalised as (x - 0.5) / 0.5.
        self.transform_input = transform_input
        bn = spec.batch_norm

        def lrn() -> nn.Module | None:
            # Caffe's LRN (bvlc_googlenet): size 5, alpha 1e-4, beta 0.75; PyTorch divides alpha by size too.
            return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0) if spec.lrn else None

        self.conv1 = BasicConv2d(3, 64, bn, kernel_size=7, stride=2, padding=3)  # N x 64 x 112 x 112
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # N x 64 x 56 x 56
        self.lrn1 = lrn()
        self.conv2 = BasicConv2d(64, 64, bn, kernel_size=1)  # N x 64 x 56 x 56
        self.conv3 = BasicConv2d(64, 192, bn, kernel_size=3, padding=1)  # N x 192 x 56 x 56
        self.lrn2 = lrn()
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # N x 192 x 28 x 28

        def inception(name: str, in_channels: int) -> Inception:
            return Inception(
                in_channels, *INCEPTION_CHANNELS[name], batch_norm=bn, five_by_five=spec.five_by_five
            )

        self.inception3a = inception("inception3a", 192)  # N x 256 x 28 x 28
        self.inception3b = inception("inception3b", 256)  # N x 480 x 28 x 28
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # N x 480 x 14 x 14
        self.inception4a = inception("inception4a", 480)  # N x 512 x 14 x 14
        self.inception4b = inception("inception4b", 512)  # N x 512 x 14 x 14
        self.inception4c = inception("inception4c", 512)  # N x 512 x 14 x 14
        self.inception4d = inception("inception4d", 512)  # N x 528 x 14 x 14
        self.inception4e = inception("inception4e", 528)  # N x 832 x 14 x 14
        k4 = spec.maxpool4_kernel
        self.maxpool4 = nn.MaxPool2d(k4, stride=2, ceil_mode=True)  # N x 832 x 7 x 7
        self.inception5a = inception("inception5a", 832)  # N x 832 x 7 x 7
        self.inception5b = inception("inception5b", 832)  # N x 1024 x 7 x 7

        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, bn, spec.paper_aux_pool, dropout_aux)
            self.aux2 = InceptionAux(528, num_classes, bn, spec.paper_aux_pool, dropout_aux)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # the paper's 7x7/1 average pool at 224 px
        self.dropout = nn.Dropout(p=spec.dropout if dropout is None else dropout)
        self.num_features = 1024
        self.fc = nn.Linear(self.num_features, num_classes)

        self.frozen_stages: list[str] = []
        self.feature_info = self._trace_feature_info()
        if init_weights:
            self._init_weights()

    def _trace_feature_info(self) -> list[dict]:
        """Channels and stride of every stage, read off a forward pass (no hand-kept table)."""
        size = 64  # small enough to be cheap; every stride still divides it
        info = []
        with torch.no_grad():
            x = torch.zeros(1, 3, size, size)
            for name in self.stage_names():
                x = getattr(self, name)(x)
                info.append({"name": name, "channels": x.shape[1], "stride": size // x.shape[-1]})
        return info

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if self.variant == "torchvision":
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.Conv2d):
                    # Without BatchNorm, Xavier keeps activations in range through 22 layers (as the
                    # Caffe reproduction did); with BatchNorm, He init trains fastest.
                    if self.variant == "paper":
                        nn.init.xavier_uniform_(m.weight)
                    else:
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_names(self) -> list[str]:
        """The stages forward_features runs, in order (the LRN layers only where they exist)."""
        return [name for name in STAGES if getattr(self, name, None) is not None]

    def _transform_input(self, x: Tensor) -> Tensor:
        if not self.transform_input:
            return x
        # Maps ImageNet mean/std normalised input to the (x - 0.5) / 0.5 that torchvision's weights
        # expect; per-channel Python-float arithmetic, as torchvision does it, for identical rounding.
        channels = [
            x[:, c : c + 1] * (std / 0.5) + (mean - 0.5) / 0.5
            for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True))
        ]
        return torch.cat(channels, dim=1)

    def forward_features(self, x: Tensor, stage: str = "inception5b") -> Tensor:
        """Run the network up to and including ``stage`` (a name from ``stage_names()``)."""
        names = self.stage_names()
        if stage not in names:
            raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(names)}")
        x = self._transform_input(x)
        for name in names:
            x = getattr(self, name)(x)
            if name == stage:
                return x
        raise AssertionError("unreachable")

    def forward_stages(self, x: Tensor, first: str, last: str) -> Tensor:
        """Run the stages ``first`` .. ``last`` (inclusive) on ``x``, the output of the stage before
        ``first`` (the input image when ``first`` is the first stage, then ``transform_input`` applies).
        The detector's shared-feature mode runs the trunk once per image and the rest per region."""
        names = self.stage_names()
        for name in (first, last):
            if name not in names:
                raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(names)}")
        start, end = names.index(first), names.index(last)
        if start > end:
            raise ValueError(f"stage {first!r} comes after {last!r}")
        if start == 0:
            x = self._transform_input(x)
        for name in names[start : end + 1]:
            x = getattr(self, name)(x)
        return x

    def freeze_through(self, stage: str | None) -> None:
        """Freeze the stages up to and including ``stage`` (None: train everything).

        Frozen stages also keep their BatchNorm statistics: they stay in eval mode in training, so
        fine-tuning on small region batches does not drift the pretrained statistics.
        """
        names = self.stage_names()
        if stage is not None and stage not in names:
            raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(names)}")
        self.frozen_stages = names[: names.index(stage) + 1] if stage is not None else []
        for name in names:
            getattr(self, name).requires_grad_(name not in self.frozen_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> GoogLeNet:
        super().train(mode)
        for name in getattr(self, "frozen_stages", ()):
            getattr(self, name).eval()
        return self

    def forward_head(self, features: Tensor) -> Tensor:
        """Global average pool -> dropout -> linear, on ``inception5b`` features."""
        x = torch.flatten(self.avgpool(features), 1)  # N x 1024
        return self.fc(self.dropout(x))  # N x num_classes

    def forward(self, x: Tensor) -> GoogLeNetOutputs:
        x = self._transform_input(x)
        aux: dict[str, Tensor] = {}
        for name in self.stage_names():
            x = getattr(self, name)(x)
            head = AUX_AFTER.get(name)
            if head is not None and self.training and getattr(self, head) is not None:
                aux[head] = getattr(self, head)(x)
        return GoogLeNetOutputs(self.forward_head(x), aux.get("aux1"), aux.get("aux2"))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer and the aux heads' last layers for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        for head in (self.aux1, self.aux2):
            if head is not None:
                head.fc2 = nn.Linear(head.fc2.in_features, num_classes)
                nn.init.normal_(head.fc2.weight, std=0.01)
                nn.init.zeros_(head.fc2.bias)


def googlenet(
    variant: str = "paper", num_classes: int = 1000, aux_logits: bool = True, **kwargs
) -> GoogLeNet:
    """Build a randomly initialised GoogLeNet. Loading weights is ``backbone.weights``' job."""
    return GoogLeNet(variant=variant, num_classes=num_classes, aux_logits=aux_logits, **kwargs)
