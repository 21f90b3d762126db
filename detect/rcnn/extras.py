"""Fitting R-CNN's extras on a trained region classifier: box regression and linear SVMs.

Both read the pooled features of training regions (in eval mode, no augmentation): box
regression those of proposals with IoU > 0.6, the SVMs the ground-truth boxes (positives) and a
random share of each image's proposals (the pool that hard-negative mining draws from).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from detect.boxes import box_iou
from detect.datasets.records import DetectionRecord
from detect.rcnn.box_regression import BoxRegressor, collect_regression_samples, fit_box_regressor
from detect.rcnn.data import ImageSource, image_to_tensor, scale_to_image
from detect.rcnn.model import RegionClassifier
from detect.rcnn.svm import LinearSVMs, fit_svms

logger = logging.getLogger(__name__)


def training_regions(
    records: Sequence[DetectionRecord], proposals: Sequence[np.ndarray], images: ImageSource, desc: str
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(image (3, h, w), proposals, gt boxes, gt labels)`` per decodable image, in its pixels."""
    for index, record in enumerate(tqdm(records, desc=desc, unit="img", dynamic_ncols=True, mininterval=2.0)):
        image = images(index)
        if image is None:
            continue
        keep = ~record.difficult if len(record.difficult) else np.ones(len(record.boxes), bool)
        gt, _, _ = scale_to_image(record.boxes[keep], record, image)
        boxes, _, _ = scale_to_image(proposals[index], record, image)
        yield (
            image_to_tensor(image),
            torch.from_numpy(boxes),
            torch.from_numpy(gt),
            torch.from_numpy(record.labels[keep]),
        )


def train_box_regressor(
    model: RegionClassifier,
    records: Sequence[DetectionRecord],
    proposals: Sequence[np.ndarray],
    images: ImageSource,
    *,
    min_iou: float = 0.6,
    max_per_image: int = 64,
    ridge: float = 1000.0,
    channels_last: bool = True,
) -> BoxRegressor:
    samples = training_regions(records, proposals, images, "box regression features")
    features, boxes, targets, labels = collect_regression_samples(
        model, samples, min_iou, max_per_image, channels_last
    )
    logger.info("box regression: %d proposals with IoU > %.2f", len(features), min_iou)
    # Boxes are in each image's own downscaled pixels: the targets are scale-free ratios.
    return fit_box_regressor(features, boxes, targets, labels, model.num_classes, ridge)


@torch.no_grad()
def train_svms(
    model: RegionClassifier,
    records: Sequence[DetectionRecord],
    proposals: Sequence[np.ndarray],
    images: ImageSource,
    *,
    neg_iou: float = 0.3,
    negatives_per_image: int = 64,
    reg: float = 1e-3,
    seed: int = 0,
    channels_last: bool = True,
) -> LinearSVMs:
    model.eval()
    device = next(model.parameters()).device
    num_classes = model.num_classes
    rng = np.random.default_rng(seed)
    pos, pos_labels, neg, neg_iou_rows = [], [], [], []
    for image, boxes, gt, gt_labels in training_regions(records, proposals, images, "SVM features"):
        pick = rng.permutation(len(boxes))[:negatives_per_image]
        regions = torch.cat([gt, boxes[pick]])
        if len(regions) == 0:
            continue
        batch = image[None].to(device)
        batch = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        rois = torch.cat([regions.new_zeros((len(regions), 1)), regions], dim=1).to(device)
        feats = model.pooled_features(batch, rois).float().cpu()
        pos.append(feats[: len(gt)])
        pos_labels.append(gt_labels)
        per_class = torch.zeros(len(pick), num_classes)
        if len(gt):
            iou = box_iou(boxes[pick], gt)
            for c in range(num_classes):
                mask = gt_labels == c
                if mask.any():
                    per_class[:, c] = iou[:, mask].max(dim=1).values
        neg.append(feats[len(gt) :])
        neg_iou_rows.append(per_class)
    return fit_svms(
        torch.cat(pos),
        torch.cat(pos_labels),
        torch.cat(neg),
        torch.cat(neg_iou_rows),
        num_classes,
        reg=reg,
        neg_iou=neg_iou,
        seed=seed,
    )
