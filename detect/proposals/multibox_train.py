"""Training MultiBox: the records, the train/val split, the model, optimizer groups, step and evaluation.

The pieces ``tools/train_multibox.py`` assembles around ``backbone.runtime.trainer.fit``; every
argument is a plain value, so another tool (or a test) can use them without that tool's config.
Errors a user can fix are ``ValueError``s naming the problem (the tool prefixes its config key),
except those of the files read, which are already one-line ``UserError``s (``WeightsError``,
``DatasetError``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from backbone import googlenet
from backbone.googlenet import GoogLeNet
from backbone.runtime.dist import all_reduce_sum
from backbone.runtime.paths import resolve_data_path
from backbone.runtime.trainer import StepOutput
from backbone.weights import load_model
from detect.datasets.records import DetectionRecord
from detect.datasets.spec import DatasetSpec, open_dataset_spec
from detect.proposals.multibox import MultiBoxArch, MultiBoxNet, build_multibox, multibox_loss, recall_at_k

logger = logging.getLogger(__name__)


def load_records(specs: Sequence[DatasetSpec]) -> list[DetectionRecord]:
    """All records of the listed data sets, class names ignored (MultiBox is class-agnostic).

    Image ids are kept when they are unique across the sets; otherwise the records are copies
    numbered 1..N. The data sets' own records are never changed: a proposal cache fingerprints
    their ids, and renumbering them in place would make a valid cache look stale.
    """
    if not specs:
        raise ValueError("no data set given")
    records: list[DetectionRecord] = []
    for spec in specs:
        dataset, report = open_dataset_spec(spec)
        logger.info("%s: %d images", spec.path, len(dataset.records))
        report.log(logger)  # what was fixed, kept or skipped, naming the first few files
        records.extend(dataset.records)
    if len({record.image_id for record in records}) < len(records):
        records = [dataclasses.replace(record, image_id=i + 1) for i, record in enumerate(records)]
    return records


def split_train_val(
    records: Sequence[DetectionRecord], fraction: float, seed: int
) -> tuple[list[DetectionRecord], list[DetectionRecord]]:
    """A seeded random ``fraction`` of the records held out for validation: ``(train, val)``."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = int(round(len(records) * fraction))
    if n_val == 0 or n_val == len(records):
        raise ValueError(f"val_fraction {fraction} leaves no train or no val image of {len(records)}")
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def load_backbone(init: str | None, variant: str) -> tuple[GoogLeNet, dict[str, Any]]:
    """The GoogLeNet to put MultiBox on, and where it came from (for the exported model's meta).

    ``init``: a train_cls ``model.pt`` (``$SHARED_DATA`` is expanded; a bad file raises
    ``WeightsError``), or None for a random ``variant`` network, which the meta then says.
    """
    if init is None:
        backbone = googlenet(variant, num_classes=1, aux_logits=False)
        return backbone, {"init": None, "note": "backbone randomly initialised (no train_cls checkpoint)"}
    backbone, init_meta = load_model(resolve_data_path(init), aux_logits=False)
    trained_from = {"init": str(init), "init_val": init_meta.get("val"), "init_data": init_meta.get("data")}
    return backbone, trained_from


def build_model(
    backbone: GoogLeNet,
    priors: np.ndarray,
    *,
    image_size: int,
    stage: str = "inception5b",
    num_priors: int = 200,
    reduced_channels: int = 128,
    grid: int = 7,
    dropout: float = 0.3,
    freeze_through: str | None = None,
) -> tuple[MultiBoxNet, MultiBoxArch]:
    """MultiBox on ``backbone`` with these priors, its stages up to ``freeze_through`` frozen.

    ValueError for a stage the backbone does not have or priors that do not fit.
    """
    arch = MultiBoxArch(
        variant=backbone.variant,
        stage=stage,
        num_priors=num_priors,
        reduced_channels=reduced_channels,
        grid=grid,
        dropout=dropout,
        transform_input=backbone.transform_input,
        image_size=image_size,
    )
    model = build_multibox(backbone, priors, arch)
    model.freeze_through(freeze_through)
    return model, arch


def build_optimizer(
    model: MultiBoxNet,
    kind: str = "adamw",
    lr: float = 1e-3,
    backbone_lr_factor: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> torch.optim.Optimizer:
    """SGD or AdamW: the head at ``lr``, the trainable backbone (if any) at ``lr * backbone_lr_factor``."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_factor})
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer kind must be sgd or adamw, got {kind!r}")


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def multibox_step(
    device: torch.device, alpha: float, priors: torch.Tensor | None, channels_last: bool = True
) -> Callable[[nn.Module, Any], StepOutput]:
    """The ``compute_loss`` of ``fit``: batch ``(images, boxes)`` -> MultiBox loss (``alpha``:
    weight of the localisation term; ``priors``: match from the priors instead of the predictions)."""
    memory_format = _memory_format(channels_last)

    def compute(model: nn.Module, batch: Any) -> StepOutput:
        images, boxes = batch
        pred_boxes, logits = model(images.to(device, memory_format=memory_format, non_blocking=True))
        # Matching and loss in fp32, whatever the autocast precision of the forward pass.
        targets = [b.to(device, non_blocking=True) for b in boxes]
        parts = multibox_loss(pred_boxes.float(), logits.float(), targets, alpha, priors)
        metrics = {"loc": float(parts["loc"].detach()), "conf": float(parts["conf"].detach())}
        return StepOutput(loss=parts["loss"], batch_size=int(images.shape[0]), metrics=metrics)

    return compute


@torch.no_grad()
def evaluate_multibox(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    alpha: float,
    priors: torch.Tensor | None,
    top_ks: tuple[int, ...],
    channels_last: bool = True,
) -> dict[str, float]:
    """Validation loss and recall of ground truth at IoU 0.5 by the top-k boxes, over all ranks."""
    model.eval()
    memory_format = _memory_format(channels_last)
    sums = {"loss": 0.0, "images": 0.0, "boxes": 0.0} | {f"hits@{k}": 0.0 for k in top_ks}
    for images, boxes in loader:
        pred_boxes, logits = model(images.to(device, memory_format=memory_format, non_blocking=True))
        boxes = [b.to(device, non_blocking=True) for b in boxes]
        sums["loss"] += float(multibox_loss(pred_boxes, logits, boxes, alpha, priors)["loss"]) * len(images)
        sums["images"] += len(images)
        for k in top_ks:
            hits, _ = recall_at_k(pred_boxes, logits, boxes, k)
            sums[f"hits@{k}"] += hits
        sums["boxes"] += sum(b.shape[0] for b in boxes)
    totals = all_reduce_sum(sums)
    out = {"loss": totals["loss"] / max(totals["images"], 1)}
    out |= {f"recall@{k}": 100.0 * totals[f"hits@{k}"] / max(totals["boxes"], 1) for k in top_ks}
    return out
