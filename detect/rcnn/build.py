"""Building a detector to train: initial weights, the C+1-way classifier, optimizer groups."""

from __future__ import annotations

from typing import Any, Literal

import torch

from backbone import googlenet
from backbone.runtime.errors import UserError
from backbone.runtime.optim import optimizer_for_groups
from backbone.weights import load_model, load_torchvision_weights
from detect.rcnn.model import RegionClassifier, RegionClassifierArch

InitKind = Literal["model", "torchvision"]


def initial_backbone(
    init: str | None, init_kind: InitKind, variant: str, num_classes: int, aux_logits: bool = True
) -> tuple[Any, dict[str, Any]]:
    """GoogLeNet with a ``num_classes + 1``-way classifier (background last) and where it came from.

    ``init``: a train_cls ``model.pt`` (any variant; ``init_kind="model"``), torchvision's ImageNet
    GoogLeNet file (``"torchvision"``; its variant, with ``transform_input``), or None (random ``variant``).
    """
    outputs = num_classes + 1
    if init is None and init_kind == "torchvision":
        raise UserError(
            "model.init_kind torchvision needs model.init (the path of torchvision's googlenet-*.pth)"
        )
    if init is None:
        return googlenet(variant, num_classes=outputs, aux_logits=aux_logits), {"init": None}
    if init_kind == "torchvision":
        model = load_torchvision_weights(init, num_classes=outputs, aux_logits=aux_logits)
        return model, {"init": init, "init_kind": "torchvision"}
    model, meta = load_model(init, num_classes=outputs, aux_logits=aux_logits)
    return model, {
        "init": init,
        "init_kind": "model",
        "init_val": meta.get("val"),
        "init_data": meta.get("data"),
    }


def build_detector(
    init: str | None,
    init_kind: InitKind,
    variant: str,
    num_classes: int,
    *,
    mode: Literal["crop", "shared"] = "crop",
    input_size: int = 224,
    padding: int = 16,
    warp: Literal["anisotropic", "square"] = "anisotropic",
    trunk_stage: str = "inception4e",
    aux_logits: bool = True,
    sampling_ratio: int = 2,
    freeze_through: str | None = None,
) -> tuple[RegionClassifier, dict[str, Any]]:
    backbone, trained_from = initial_backbone(init, init_kind, variant, num_classes, aux_logits)
    arch = RegionClassifierArch(
        variant=backbone.variant,
        num_classes=num_classes,
        aux_logits=backbone.aux_logits,
        mode=mode,
        input_size=input_size,
        padding=padding,
        warp=warp,
        trunk_stage=trunk_stage,
        sampling_ratio=sampling_ratio,
        transform_input=backbone.transform_input,
    )
    try:
        model = RegionClassifier(backbone, arch)
        backbone.freeze_through(freeze_through)
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    return model, trained_from


def head_parameters(model: RegionClassifier) -> list[torch.nn.Parameter]:
    """The layers made new for C + 1 outputs: the classifier and the aux heads' last layers."""
    net = model.backbone
    layers = [net.fc] + [head.fc2 for head in (net.aux1, net.aux2) if head is not None]
    return [p for layer in layers for p in layer.parameters()]


def build_optimizer(
    model: RegionClassifier,
    lr: float,
    head_lr_mult: float,
    momentum: float,
    weight_decay: float,
    kind: str = "sgd",
) -> torch.optim.Optimizer:
    """SGD (or AdamW) with the new layers at ``lr * head_lr_mult`` (R-CNN: x10 on the new layer)."""
    head = {id(p) for p in head_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [  # the base group first: the trainer logs param_groups[0]'s lr
        {"params": [p for p in trainable if id(p) not in head], "lr": lr, "weight_decay": weight_decay},
        {
            "params": [p for p in trainable if id(p) in head],
            "lr": lr * head_lr_mult,
            "weight_decay": weight_decay,
        },
    ]
    return optimizer_for_groups(kind, [g for g in groups if g["params"]], lr, momentum)
