"""Region probabilities to detections: drop background, threshold, per-class NMS, top-k (one function)."""

from __future__ import annotations

import torch
from torch import Tensor

from detect.boxes import batched_nms, clip_boxes


def postprocess_detections(
    boxes: Tensor,
    probs: Tensor,
    image_size: tuple[int, int],
    *,
    score_threshold: float = 0.01,
    nms_iou: float = 0.3,
    max_per_image: int = 100,
    class_boxes: Tensor | None = None,
) -> dict[str, Tensor]:
    """``boxes`` ``(P, 4)`` proposals in image pixels, ``probs`` ``(P, C + 1)`` (background last).

    Every (proposal, class) pair above ``score_threshold`` is a candidate; NMS at ``nms_iou`` runs
    within each class (R-CNN: 0.3); the ``max_per_image`` highest-scoring survivors are kept.
    ``class_boxes`` ``(P, C, 4)``: per-class refined boxes (box regression) used instead of ``boxes``.
    Returns ``{"boxes" (K, 4), "scores" (K,), "labels" (K,)}`` sorted by falling score.
    """
    num_classes = probs.shape[1] - 1
    height, width = image_size
    scores = probs[:, :num_classes]
    if class_boxes is None:
        class_boxes = boxes[:, None, :].expand(-1, num_classes, 4)
    class_boxes = clip_boxes(class_boxes.reshape(-1, 4), height, width)
    labels = torch.arange(num_classes, device=probs.device).repeat(len(probs))
    scores = scores.reshape(-1)
    keep = scores > score_threshold
    class_boxes, scores, labels = class_boxes[keep], scores[keep], labels[keep]
    nonempty = (class_boxes[:, 2] > class_boxes[:, 0]) & (class_boxes[:, 3] > class_boxes[:, 1])
    class_boxes, scores, labels = class_boxes[nonempty], scores[nonempty], labels[nonempty]
    keep = batched_nms(class_boxes.float(), scores.float(), labels, nms_iou)[:max_per_image]
    return {"boxes": class_boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def empty_detections(device: torch.device | str = "cpu") -> dict[str, Tensor]:
    return {
        "boxes": torch.zeros((0, 4), device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
    }
