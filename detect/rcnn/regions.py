"""Regions for the R-CNN classifier: label proposals against ground truth, sample fg/bg, warp with context.

Labels follow the project's convention: classes are ``0..C-1`` and background is ``C``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

from detect.boxes import box_iou


def label_proposals(
    proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, num_classes: int, fg_iou: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Each proposal's highest IoU with a ground-truth box, and its label: that box's class when
    the IoU is at least ``fg_iou``, background (``num_classes``) otherwise."""
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    labels = np.full(len(proposals), num_classes, np.int64)
    if len(gt_boxes) == 0 or len(proposals) == 0:
        return np.zeros(len(proposals), np.float32), labels
    iou = box_iou(torch.from_numpy(proposals), torch.from_numpy(gt_boxes)).numpy()
    best = iou.argmax(axis=1)
    max_iou = iou[np.arange(len(proposals)), best]
    foreground = max_iou >= fg_iou
    labels[foreground] = np.asarray(gt_labels, np.int64)[best[foreground]]
    return max_iou.astype(np.float32), labels


def sample_regions(
    max_iou: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    num_regions: int,
    fg_fraction: float = 0.25,
    bg_iou: tuple[float, float] = (0.1, 0.5),
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of ``num_regions`` labelled regions: up to ``fg_fraction`` foreground, the rest
    background with IoU in ``[bg_iou[0], bg_iou[1])`` (Fast R-CNN's 0.1 lower bound; R-CNN used 0).

    Too few foreground regions: background fills the batch (R-CNN). Too few background regions in
    the range: any non-foreground region is used, then regions repeat. An image with no regions at
    all gives an empty array.
    """
    rng = rng if rng is not None else np.random.default_rng()
    if len(labels) == 0 or num_regions <= 0:
        return np.zeros(0, np.int64)
    fg = np.flatnonzero(labels < num_classes)
    bg_all = np.flatnonzero(labels == num_classes)
    bg = bg_all[(max_iou[bg_all] >= bg_iou[0]) & (max_iou[bg_all] < bg_iou[1])]
    if len(bg) == 0:
        bg = bg_all
    num_fg = min(len(fg), int(round(num_regions * fg_fraction)))
    chosen_fg = rng.choice(fg, num_fg, replace=False) if num_fg else np.zeros(0, np.int64)
    num_bg = num_regions - num_fg
    if len(bg) == 0:  # only foreground exists: repeat it to fill the batch
        pool, chosen_bg = fg, np.zeros(0, np.int64)
        extra = rng.choice(pool, num_bg, replace=True) if num_bg else np.zeros(0, np.int64)
        return np.concatenate([chosen_fg, extra]).astype(np.int64)
    chosen_bg = rng.choice(bg, num_bg, replace=len(bg) < num_bg)
    return np.concatenate([chosen_fg, chosen_bg]).astype(np.int64)


def context_boxes(boxes: Tensor, output_size: int, padding: int, square: bool = False) -> Tensor:
    """Dilate boxes about their centres so that, warped to ``output_size`` pixels, each keeps
    ``padding`` pixels of context on every side at the output's scale (R-CNN's p = 16 at 227).

    ``square``: first grow each box to the square of its longer side about its centre (R-CNN's
    "tightest square with context"), so the warp scales both axes alike and keeps the object's
    aspect ratio; the default anisotropic warp stretches a 2:1 box (an ellipse) into a square."""
    if square:
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True).expand(-1, 2) / 2
        boxes = torch.cat([centre - half, centre + half], dim=1)
    if padding <= 0:
        return boxes
    if 2 * padding >= output_size:
        raise ValueError(f"context padding {padding} leaves nothing of a {output_size}-pixel warp")
    scale = output_size / (output_size - 2 * padding)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0) * (scale / 2)  # a degenerate box warps 1 px
    return torch.cat([centre - half, centre + half], dim=1)


def warp_regions(
    images: Tensor,
    rois: Tensor,
    output_size: int,
    padding: int = 16,
    sampling_ratio: int = 2,
    square: bool = False,
) -> Tensor:
    """Warp each region to ``output_size`` x ``output_size`` with context padding, batched.

    ``images``: ``(B, 3, H, W)`` normalised (so 0 is the mean pixel); ``rois``: ``(R, 5)`` rows
    ``(batch index, x1, y1, x2, y2)`` in that tensor's pixels. Anisotropic warp as R-CNN (``square``:
    the tightest square, see ``context_boxes``); outside the image is the mean pixel (roi_align
    samples beyond the border as 0). Returns ``(R, 3, S, S)``.
    """
    if rois.numel() == 0:
        return images.new_zeros((0, images.shape[1], output_size, output_size))
    boxes = context_boxes(rois[:, 1:].float(), output_size, padding, square)
    rois = torch.cat([rois[:, :1].to(boxes.dtype), boxes], dim=1).to(images.dtype)
    # aligned=True: box coordinates are continuous (pixel i spans [i, i + 1)), as in our records.
    return roi_align(images, rois, output_size, 1.0, sampling_ratio, aligned=True)
