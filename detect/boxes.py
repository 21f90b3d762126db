"""Box helpers on ``(N, 4)`` xyxy tensors in continuous pixel coordinates (see ``detect.datasets.records``).

Thin, named wrappers over ``torchvision.ops`` so the whole project agrees on one convention: a box
covers ``[x1, x2) x [y1, y2)`` and its width is ``x2 - x1`` (never ``+ 1``). Only what torchvision
does not offer is written here: element-wise (matched) IoU, degenerate-box filtering and
duplicate removal.
"""

from __future__ import annotations

import torch
import torchvision.ops as tv_ops


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``(N,)`` areas ``(x2 - x1) * (y2 - y1)``."""
    return tv_ops.box_area(boxes)


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` IoU matrix between every box of ``boxes_a`` and every box of ``boxes_b``."""
    return tv_ops.box_iou(boxes_a, boxes_b)


def matched_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """``(N,)`` IoU of ``boxes_a[i]`` with ``boxes_b[i]`` (no ``N x M`` matrix is built).

    Disjoint or degenerate pairs give 0 instead of NaN.
    """
    if boxes_a.shape != boxes_b.shape:
        raise ValueError(
            f"matched_box_iou needs equal shapes, got {tuple(boxes_a.shape)} and {tuple(boxes_b.shape)}"
        )
    top_left = torch.maximum(boxes_a[:, :2], boxes_b[:, :2])
    bottom_right = torch.minimum(boxes_a[:, 2:], boxes_b[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = box_area(boxes_a) + box_area(boxes_b) - inter
    return torch.where(
        union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter)
    )


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """COCO ``[x, y, w, h]`` to ``[x1, y1, x2, y2]``."""
    return tv_ops.box_convert(boxes, in_fmt="xywh", out_fmt="xyxy")


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[x1, y1, x2, y2]`` to COCO ``[x, y, w, h]``."""
    return tv_ops.box_convert(boxes, in_fmt="xyxy", out_fmt="xywh")


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip to the image ``[0, width] x [0, height]`` (continuous coordinates, so ``width`` itself
    is a valid ``x2``)."""
    return tv_ops.clip_boxes_to_image(boxes, (height, width))


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices of boxes whose width and height are both ``>= min_size``."""
    return tv_ops.remove_small_boxes(boxes, min_size)


def valid_box_mask(boxes: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: finite boxes with positive width and height (drops zero-area and inverted)."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return torch.isfinite(boxes).all(dim=1) & (widths > 0) & (heights > 0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression, in decreasing score order."""
    return tv_ops.nms(boxes, scores, iou_threshold)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS applied independently per label; indices in decreasing score order."""
    return tv_ops.batched_nms(boxes, scores, labels, iou_threshold)


def dedup_boxes(boxes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sorted indices of the first occurrence of each distinct box after rounding ``boxes * scale``.

    R-CNN removes duplicate proposals this way (``scale=1/16`` merges boxes that land on the same
    feature-map cell); ``scale=1`` removes exact pixel duplicates.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    keys = torch.round(boxes * scale).to(torch.int64)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    positions = torch.arange(boxes.shape[0], device=boxes.device)
    first = torch.full((int(inverse.max()) + 1,), boxes.shape[0], dtype=torch.int64, device=boxes.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return torch.sort(first).values
