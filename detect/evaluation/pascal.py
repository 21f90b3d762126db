"""``voc07``, ``voc`` and ``ilsvrc``: VOC-devkit-style AP computed for all classes at once.

Conventions shared by the three (see ``matching.py`` for the rules themselves):

* Ranking: by descending score within a class; equal scores keep image-id order, then the order
  within the image (a stable sort after a stable sort by image id, as pycocotools does).
* Difficult objects are not positives; a detection matched to one counts as neither TP nor FP.
* A class without positives has AP NaN and is left out of the mean (shown as n/a).
* IoU threshold: ``>= 0.5`` as in the official devkits. py-faster-rcnn's ``voc_eval.py`` uses
  ``> 0.5`` (``ovmax > ovthresh``), so a detection with IoU exactly 0.5 is a true positive here and
  a false positive there; it also adds ``+ 1`` to raw VOC coordinates itself, which our coordinate
  conversion already does (``x1 = xmin - 1``).
"""

from __future__ import annotations

import numpy as np

from detect.evaluation.ap import average_precision_11_point, average_precision_all_point, precision_recall
from detect.evaluation.arrays import DetectionArrays, GroundTruthArrays
from detect.evaluation.matching import (
    FP,
    TP,
    ilsvrc_thresholds,
    match_ilsvrc,
    match_voc,
    qualifying_pairs,
)
from detect.evaluation.result import DetectionEvalResult, nan_mean

PASCAL_METRICS = ("voc07", "voc", "ilsvrc")


DENSE_TABLE_LIMIT = 1 << 25  # (class, image) groups up to this many: O(1) lookup tables (<= 256 MB)


def _image_positions(image_ids: np.ndarray, all_images: np.ndarray) -> np.ndarray:
    """Index of each id in the sorted ``all_images``; -1 where absent."""
    if len(all_images) == 0:
        return np.full(len(image_ids), -1, np.int64)
    low, high = int(all_images[0]), int(all_images[-1])
    if high - low < 4 * len(all_images) + 1024:  # dense ids: a lookup table beats binary search
        table = np.full(high - low + 1, -1, np.int64)
        table[all_images - low] = np.arange(len(all_images))
        inside = (image_ids >= low) & (image_ids <= high)
        positions = np.full(len(image_ids), -1, np.int64)
        positions[inside] = table[image_ids[inside] - low]
        return positions
    positions = np.minimum(np.searchsorted(all_images, image_ids), len(all_images) - 1)
    return np.where(all_images[positions] == image_ids, positions, -1)


def _rank(dets: DetectionArrays, positions: np.ndarray, num_classes: int) -> np.ndarray:
    """Indices ordering ``dets`` by class, then descending score, then image, then input order."""
    order = np.arange(len(dets))
    if len(dets) > 1 and (positions[1:] < positions[:-1]).any():  # skip the sort when already by image
        order = np.argsort(positions, kind="stable")
    order = order[np.argsort(-dets.scores[order], kind="stable")]
    small = dets.labels[order].astype(np.int16 if num_classes < 2**15 else np.int64)  # int16: radix sort
    return order[np.argsort(small, kind="stable")]


def _match(
    gt: GroundTruthArrays, dets: DetectionArrays, rule: str, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(ranking, status)``: detection indices in rank order and TP/FP/IGNORED per ranked detection."""
    if rule not in ("voc", "ilsvrc"):
        raise ValueError(f"matching rule must be 'voc' or 'ilsvrc', got {rule!r}")
    positions = _image_positions(dets.image_ids, gt.image_ids)
    if (positions < 0).any():
        missing = int(dets.image_ids[positions < 0][0])
        raise ValueError(f"detections refer to image id {missing}, which is not in the ground truth")
    ranking = _rank(dets, positions, gt.num_classes)
    num_images = len(gt.image_ids)
    # One group per (class, image): objects of a group are contiguous after a stable sort by key.
    gt_keys = gt.labels * num_images + _image_positions(gt.box_image_ids, gt.image_ids)
    det_keys = dets.labels[ranking] * num_images + positions[ranking]
    gt_order = np.argsort(gt_keys, kind="stable")
    if gt.num_classes * num_images <= DENSE_TABLE_LIMIT:
        counts_table = np.bincount(gt_keys, minlength=gt.num_classes * num_images)
        count = counts_table[det_keys]
        start = (np.cumsum(counts_table) - counts_table)[det_keys]
    else:
        sorted_keys = gt_keys[gt_order]
        start = np.searchsorted(sorted_keys, det_keys, side="left")
        count = np.searchsorted(sorted_keys, det_keys, side="right") - start
    gt_boxes = gt.boxes[gt_order]
    if rule == "voc":
        thresholds = np.full(len(gt_order), iou_threshold)
    else:
        thresholds = ilsvrc_thresholds(gt_boxes, default=iou_threshold)
    # Only detections sharing an image and class with some object need their boxes gathered.
    candidates = np.flatnonzero(count)
    pair_det, pair_gt, pair_iou = qualifying_pairs(
        start[candidates], count[candidates], dets.boxes[ranking[candidates]], gt_boxes, thresholds
    )
    match = match_voc if rule == "voc" else match_ilsvrc
    status = match(len(ranking), candidates[pair_det], pair_gt, pair_iou, gt.difficult[gt_order])
    return ranking, status


def match_detections(
    gt: GroundTruthArrays, dets: DetectionArrays, rule: str, iou_threshold: float = 0.5
) -> tuple[DetectionArrays, np.ndarray]:
    """Rank ``dets`` and match them (``rule``: ``voc`` or ``ilsvrc``); returns
    ``(ranked detections, status per ranked detection: 1 TP, 0 FP, -1 ignored)``."""
    ranking, status = _match(gt, dets, rule, iou_threshold)
    return dets.take(ranking), status


def evaluate_pascal(
    gt: GroundTruthArrays, dets: DetectionArrays, metric: str, iou_threshold: float = 0.5
) -> DetectionEvalResult:
    """Per-class AP and mAP under ``voc07`` (11-point), ``voc`` (all-point) or ``ilsvrc``."""
    if metric not in PASCAL_METRICS:
        raise ValueError(f"metric must be one of {PASCAL_METRICS}, got {metric!r}")
    ranking, status = _match(gt, dets, "ilsvrc" if metric == "ilsvrc" else "voc", iou_threshold)
    num_classes = gt.num_classes
    num_positives = np.bincount(gt.labels[~gt.difficult], minlength=num_classes)
    bounds = np.searchsorted(dets.labels[ranking], np.arange(num_classes + 1))
    integrate = average_precision_11_point if metric == "voc07" else average_precision_all_point
    aps, curves = [], []
    for c in range(num_classes):  # a loop over classes only: each step is vectorised
        seg = status[bounds[c] : bounds[c + 1]]
        if num_positives[c] == 0:
            aps.append(float("nan"))
            curves.append((np.zeros(0), np.zeros(0)))
            continue
        recall, precision = precision_recall(seg == TP, seg == FP, int(num_positives[c]))
        aps.append(integrate(recall, precision))
        curves.append((recall, precision))
    mean_ap = nan_mean(aps)
    return DetectionEvalResult(
        metric=metric,
        class_names=list(gt.class_names),
        ap=aps,
        num_positives=[int(n) for n in num_positives],
        num_detections=[int(n) for n in np.diff(bounds)],
        mean_ap=mean_ap,
        curves=curves,
        stats={"mAP": mean_ap},
    )
