"""Detection metrics: ``coco`` (pycocotools), ``voc07`` / ``voc`` (Pascal VOC devkit), ``ilsvrc`` (ILSVRC
DET devkit), as a streaming evaluator (``DetectionEvaluator``) and as functions over saved results.

Coordinates: records store VOC/ILSVRC boxes as ``x1 = xmin - 1, x2 = xmax``, so ``x2 - x1`` is the
devkits' ``xmax - xmin + 1`` and IoU computed here without any ``+ 1`` equals the devkits' IoU.
"""

from __future__ import annotations

from detect.evaluation.arrays import (
    DetectionArrays,
    GroundTruthArrays,
    detections_from_coco_results,
    detections_from_predictions,
    ground_truth_arrays,
)
from detect.evaluation.coco_metric import detections_to_coco_results, evaluate_coco
from detect.evaluation.evaluator import METRICS, DetectionEvaluator
from detect.evaluation.pascal import evaluate_pascal, match_detections
from detect.evaluation.result import DetectionEvalResult

__all__ = [
    "METRICS",
    "DetectionArrays",
    "DetectionEvalResult",
    "DetectionEvaluator",
    "GroundTruthArrays",
    "detections_from_coco_results",
    "detections_from_predictions",
    "detections_to_coco_results",
    "evaluate_coco",
    "evaluate_pascal",
    "ground_truth_arrays",
    "match_detections",
]
