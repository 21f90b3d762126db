"""The evaluator protocol (detectron2's): ``reset()``, ``process(predictions)``, ``evaluate()``.

Works the same in a single process, inside a training loop, and under torchrun: every rank
processes its share, ``evaluate()`` (called on all ranks, it is a collective) gathers the
predictions to rank 0 as float64 tensors (no pickling of the payload) and rank 0 computes the
metric; other ranks get ``None``. Images seen twice (a padding ``DistributedSampler`` repeats a
few) count once: the first occurrence in (rank, processing) order is kept. The ground truth is
restricted to the images processed, so scoring a subset gives that subset's numbers, and the
result does not depend on the number of ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from backbone.runtime.dist import all_gather_tensor, get_rank, is_main_process
from detect.datasets.coco import dataset_to_coco
from detect.datasets.records import DetectionDataset
from detect.evaluation.arrays import DetectionArrays, detections_from_predictions, ground_truth_arrays
from detect.evaluation.coco_metric import detections_to_coco_results, evaluate_coco
from detect.evaluation.pascal import PASCAL_METRICS, evaluate_pascal
from detect.evaluation.result import DetectionEvalResult

logger = logging.getLogger(__name__)
METRICS = ("coco", *PASCAL_METRICS)


class DetectionEvaluator:
    """Scores predictions against ``dataset`` with ``metric`` in ``coco | voc07 | voc | ilsvrc``.

    ``process`` takes an iterable of per-image dicts ``{"image_id", "boxes" (N, 4) xyxy in image
    pixels, "scores" (N,), "labels" (N,) in [0, C)}`` (tensors or arrays); an image with no
    detections still counts (its objects are missed). ``coco_gt``: the original COCO dict, when the
    data set came from one, so ``coco`` reproduces a direct pycocotools run (segmentation areas,
    crowd regions) instead of evaluating the loaded records.
    """

    def __init__(
        self,
        dataset: DetectionDataset,
        metric: str = "voc",
        iou_threshold: float = 0.5,
        coco_gt: dict | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dataset = dataset
        self.metric = metric
        self.iou_threshold = iou_threshold
        self.coco_gt = coco_gt
        self._known_ids = {int(r.image_id) for r in dataset.records}
        self.reset()

    def reset(self) -> None:
        self._rows: list[np.ndarray] = []  # (n, 8): entry, image_id, label, score, x1, y1, x2, y2
        self._seen: list[tuple[int, int]] = []  # (entry, image_id)

    def process(self, predictions: Iterable[Mapping[str, Any]]) -> None:
        for prediction in predictions:
            dets, seen = detections_from_predictions([prediction], len(self.dataset.class_names))
            image_id = seen[0]
            if image_id not in self._known_ids:
                raise ValueError(
                    f"prediction for image id {image_id}, which is not in data set {self.dataset.name!r}"
                )
            entry = len(self._seen)
            self._seen.append((entry, image_id))
            columns = [np.full(len(dets), entry, np.float64), dets.image_ids, dets.labels, dets.scores]
            self._rows.append(np.column_stack([*columns, dets.boxes]).astype(np.float64).reshape(-1, 8))

    def _gathered(self) -> tuple[np.ndarray, np.ndarray]:
        rank = float(get_rank())
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, 8))
        seen = np.asarray(self._seen, np.float64).reshape(-1, 2)
        rows = np.column_stack([np.full(len(rows), rank), rows])
        seen = np.column_stack([np.full(len(seen), rank), seen])
        all_rows = all_gather_tensor(torch.from_numpy(rows)).numpy()
        all_seen = all_gather_tensor(torch.from_numpy(seen)).numpy()
        return all_rows, all_seen

    def evaluate(self) -> DetectionEvalResult | None:
        """Gather (collective: call on every rank) and compute; ``None`` except on rank 0."""
        rows, seen = self._gathered()
        if not is_main_process():
            return None
        entry_key = seen[:, 0].astype(np.int64) * (1 << 32) + seen[:, 1].astype(np.int64)
        image_ids = seen[:, 2].astype(np.int64)
        _, first = np.unique(image_ids, return_index=True)  # first occurrence in (rank, entry) order
        duplicates = len(image_ids) - len(first)
        if duplicates:
            logger.info("evaluator: %d repeated image predictions ignored (sampler padding)", duplicates)
        row_key = rows[:, 0].astype(np.int64) * (1 << 32) + rows[:, 1].astype(np.int64)
        rows = rows[np.isin(row_key, entry_key[first])]
        dets = DetectionArrays(
            image_ids=rows[:, 2].astype(np.int64),
            boxes=rows[:, 5:9].copy(),
            scores=rows[:, 4].copy(),
            labels=rows[:, 3].astype(np.int64),
        ).sorted_by_image()
        evaluated = sorted(int(i) for i in image_ids[first])
        if self.metric == "coco":
            gt_coco = self.coco_gt if self.coco_gt is not None else dataset_to_coco(self.dataset)
            results = detections_to_coco_results(dets, self.dataset.category_ids)
            return evaluate_coco(
                gt_coco, results, self.dataset.class_names, self.dataset.category_ids, evaluated
            )
        gt = ground_truth_arrays(self.dataset, evaluated)
        return evaluate_pascal(gt, dets, self.metric, self.iou_threshold)
