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


def _group_keys(image_ids: np.ndarray, labels: np.ndarray, all_images: np.ndarray) -> np.ndarray:
    position = np.searchsorted(all_images, image_ids)
    return labels.astype(np.int64) * len(all_images) + position


def match_detections(
    gt: GroundTruthArrays, dets: DetectionArrays, rule: str, iou_threshold: float = 0.5
) -> tuple[DetectionArrays, np.ndarray]:
    """Rank ``dets`` and match them; returns ``(ranked detections, status per detection)``."""
    if rule not in ("voc", "ilsvrc"):
        raise ValueError(f"matching rule must be 'voc' or 'ilsvrc', got {rule!r}")
    known = np.isin(dets.image_ids, gt.image_ids)
    if not known.all():
        missing = int(dets.image_ids[~known][0])
        raise ValueError(f"detections refer to image id {missing}, which is not in the ground truth")
    dets = dets.sorted_by_image()
    by_score = np.argsort(-dets.scores, kind="stable")
    ranked = dets.take(by_score[np.argsort(dets.labels[by_score], kind="stable")])
    gt_keys = _group_keys(gt.box_image_ids, gt.labels, gt.image_ids)
    gt_order = np.argsort(gt_keys, kind="stable")
    gt_boxes = gt.boxes[gt_order]
    if rule == "voc":
        thresholds = np.full(len(gt_order), iou_threshold)
    else:
        thresholds = ilsvrc_thresholds(gt_boxes, default=iou_threshold)
    pair_det, pair_gt, pair_iou = qualifying_pairs(
        _group_keys(ranked.image_ids, ranked.labels, gt.image_ids),
        ranked.boxes,
        gt_keys[gt_order],
        gt_boxes,
        thresholds,
    )
    match = match_voc if rule == "voc" else match_ilsvrc
    status = match(len(ranked), pair_det, pair_gt, pair_iou, gt.difficult[gt_order])
    return ranked, status


def evaluate_pascal(
    gt: GroundTruthArrays, dets: DetectionArrays, metric: str, iou_threshold: float = 0.5
) -> DetectionEvalResult:
    """Per-class AP and mAP under ``voc07`` (11-point), ``voc`` (all-point) or ``ilsvrc``."""
    if metric not in PASCAL_METRICS:
        raise ValueError(f"metric must be one of {PASCAL_METRICS}, got {metric!r}")
    ranked, status = match_detections(gt, dets, "ilsvrc" if metric == "ilsvrc" else "voc", iou_threshold)
    num_classes = gt.num_classes
    num_positives = np.bincount(gt.labels[~gt.difficult], minlength=num_classes)
    bounds = np.searchsorted(ranked.labels, np.arange(num_classes + 1))
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
