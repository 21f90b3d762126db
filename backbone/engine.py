"""Classification training step and evaluation for GoogLeNet.

``classification_step`` is the ``compute_loss`` that ``backbone.runtime.trainer.fit`` runs, with the
paper's loss: ``main + aux_weight * (aux1 + aux2)`` (aux_weight 0.3, section 5). ``evaluate`` returns
top-1 / top-5 accuracy (percent) and mean loss, summed exactly over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from backbone.googlenet import GoogLeNetOutputs
from backbone.runtime.dist import all_reduce_sum
from backbone.runtime.log import Progress
from backbone.runtime.trainer import StepOutput

AUX_WEIGHT = 0.3  # the paper's discount of the auxiliary classifiers' losses


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """Move a NCHW batch to ``device``, in channels_last layout by default (2.4x faster on CPU)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, memory_format=memory_format, non_blocking=True)


def classification_loss(
    outputs: GoogLeNetOutputs,
    targets: torch.Tensor,
    aux_weight: float = AUX_WEIGHT,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, parts)``: cross-entropy of the main head plus ``aux_weight`` x each aux head's,
    in fp32 even when the logits come from a bf16/fp16 autocast forward pass. ``targets``: class
    indices (B,) or class probabilities (B, K), e.g. from ``batch_mix``."""
    main = F.cross_entropy(outputs.logits.float(), targets, label_smoothing=label_smoothing)
    aux_losses = [
        F.cross_entropy(aux.float(), targets, label_smoothing=label_smoothing)
        for aux in (outputs.aux1, outputs.aux2)
        if aux is not None
    ]
    aux = torch.stack(aux_losses).sum() if aux_losses else main.new_zeros(())
    loss = main + aux_weight * aux
    return loss, {"loss_main": float(main.detach()), "loss_aux": float(aux.detach())}


BatchMix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mix(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> BatchMix | None:
    """MixUp and/or CutMix on whole batches (torchvision.transforms.v2), one of the enabled two drawn
    per batch: ``mix(images, labels) -> (mixed images, (B, num_classes) soft targets)``. None when
    both alphas are 0. The draws come from torch's global RNG, which checkpoints save and restore."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    mixes = [
        mix(alpha=alpha, num_classes=num_classes)
        for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha > 0
    ]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def classification_step(
    device: torch.device,
    aux_weight: float = AUX_WEIGHT,
    label_smoothing: float = 0.0,
    channels_last: bool = True,
    mix: BatchMix | None = None,
) -> Callable[[nn.Module, Any], StepOutput]:
    """The ``compute_loss`` for the training loop: batch ``(images, labels)`` -> StepOutput. With
    ``mix`` (``batch_mix``) the loss is taken against the mixed soft targets; the logged top-1
    still counts the unmixed label."""

    def compute(model: nn.Module, batch: Any) -> StepOutput:
        images, labels = batch
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        images = to_device(images, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        targets = labels if mix is None else targets.to(device, non_blocking=True)
        outputs = model(images)
        loss, parts = classification_loss(outputs, targets, aux_weight, label_smoothing)
        top1 = (outputs.logits.detach().argmax(1) == labels).float().mean().item() * 100.0
        return StepOutput(loss=loss, batch_size=int(labels.shape[0]), metrics=parts | {"top1": top1})

    return compute


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    channels_last: bool = True,
    total: int | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent, mean cross-entropy and image count, over all ranks.

    Each rank must see a disjoint share of the set (e.g. ``build_eval_loader``), so the sums are
    exact. Top-5 is reported only for more than 5 classes (with 5 or fewer it is always 100%).
    """
    was_training = model.training
    model.eval()
    sums = {"correct1": 0.0, "correct5": 0.0, "loss": 0.0, "count": 0.0}
    num_classes = 0
    progress = Progress(batches, total=total, desc=desc)
    for images, labels in progress:
        images = to_device(images, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        outputs = model(images)
        logits = outputs.logits if isinstance(outputs, GoogLeNetOutputs) else outputs
        num_classes = logits.shape[1]
        k = min(5, num_classes)
        topk = logits.topk(k, dim=1).indices
        hits = topk == labels[:, None]
        sums["correct1"] += hits[:, 0].sum().item()
        sums["correct5"] += hits.any(dim=1).sum().item()
        sums["loss"] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        sums["count"] += labels.shape[0]
        progress.update(int(labels.shape[0]))
    progress.close()
    model.train(was_training)
    totals = all_reduce_sum(sums)
    count = max(totals["count"], 1.0)
    metrics = {"top1": 100.0 * totals["correct1"] / count}
    if num_classes > 5:
        metrics["top5"] = 100.0 * totals["correct5"] / count
    return metrics | {"loss": totals["loss"] / count, "count": totals["count"]}
