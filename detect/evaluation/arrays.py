"""Flat array views of ground truth and detections: what the vectorised metrics work on.

Detections enter as per-image prediction dicts (a model's output) or as a COCO results list
(``image_id, category_id, bbox [x, y, w, h], score``); both become ``DetectionArrays`` with labels
in ``[0, C)`` and xyxy boxes in the records' continuous coordinates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detect.datasets.common import DatasetError
from detect.datasets.records import DetectionDataset


@dataclass
class GroundTruthArrays:
    """All ground-truth boxes of the evaluated images, concatenated in record order."""

    image_ids: np.ndarray  # (I,) int64, sorted unique: the evaluated images (with or without boxes)
    box_image_ids: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) float64 xyxy
    labels: np.ndarray  # (M,) int64
    difficult: np.ndarray  # (M,) bool
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class DetectionArrays:
    image_ids: np.ndarray  # (D,) int64
    boxes: np.ndarray  # (D, 4) float64 xyxy
    scores: np.ndarray  # (D,) float64
    labels: np.ndarray  # (D,) int64 in [0, C)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, index: np.ndarray) -> DetectionArrays:
        return DetectionArrays(
            self.image_ids[index], self.boxes[index], self.scores[index], self.labels[index]
        )

    def sorted_by_image(self) -> DetectionArrays:
        """Stable sort by image id: ties in score are then broken by image order, then by the order
        within the image, like pycocotools' accumulate (which concatenates images in id order)."""
        return self.take(np.argsort(self.image_ids, kind="stable"))


def empty_detections() -> DetectionArrays:
    return DetectionArrays(
        np.zeros(0, np.int64), np.zeros((0, 4), np.float64), np.zeros(0, np.float64), np.zeros(0, np.int64)
    )


def concat_detections(parts: Iterable[DetectionArrays]) -> DetectionArrays:
    parts = list(parts)
    if not parts:
        return empty_detections()
    return DetectionArrays(
        np.concatenate([p.image_ids for p in parts]),
        np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.labels for p in parts]),
    )


def ground_truth_arrays(
    dataset: DetectionDataset, image_ids: Iterable[int] | None = None
) -> GroundTruthArrays:
    """Ground truth of ``dataset`` restricted to ``image_ids`` (default: every record)."""
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    records = [r for r in dataset.records if wanted is None or r.image_id in wanted]
    ids = np.asarray(sorted({r.image_id for r in records}), np.int64)
    if len(ids) != len(records):
        raise ValueError(f"data set {dataset.name!r} has duplicate image ids")
    counts = [len(r.labels) for r in records]
    return GroundTruthArrays(
        image_ids=ids,
        box_image_ids=np.repeat(np.asarray([r.image_id for r in records], np.int64), counts),
        boxes=np.concatenate(
            [np.asarray(r.boxes, np.float64).reshape(-1, 4) for r in records] or [np.zeros((0, 4))]
        ),
        labels=np.concatenate([np.asarray(r.labels, np.int64) for r in records] or [np.zeros(0, np.int64)]),
        difficult=np.concatenate([np.asarray(r.difficult, bool) for r in records] or [np.zeros(0, bool)]),
        class_names=list(dataset.class_names),
    )


def _as_numpy(value: Any, dtype: type, shape_tail: tuple[int, ...]) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly on GPU
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype).reshape(-1, *shape_tail)


def detections_from_predictions(
    predictions: Iterable[Mapping[str, Any]], num_classes: int
) -> tuple[DetectionArrays, list[int]]:
    """Per-image dicts ``{image_id, boxes (N, 4) xyxy, scores (N,), labels (N,)}`` (tensors or
    arrays) to arrays; also returns the image ids seen, in order (an image may have no boxes)."""
    parts, seen = [], []
    for pred in predictions:
        image_id = int(pred["image_id"])
        boxes = _as_numpy(pred["boxes"], np.float64, (4,))
        scores = _as_numpy(pred["scores"], np.float64, ())
        labels = _as_numpy(pred["labels"], np.int64, ())
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
        check_detections(boxes, scores, labels, num_classes, f"predictions for image {image_id}")
        parts.append(DetectionArrays(np.full(len(scores), image_id, np.int64), boxes, scores, labels))
        seen.append(image_id)
    return concat_detections(parts), seen


def check_detections(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, num_classes: int, source: str
) -> None:
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError(f"{source}: box coordinates and scores must be finite numbers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{source}: labels must lie in [0, {num_classes})")


def detections_from_coco_results(
    results: Any, category_ids: list[int], source: str | Path = "<detections>"
) -> DetectionArrays:
    """A COCO results list to arrays; ``category_ids[label]`` maps labels to COCO category ids."""
    if not isinstance(results, list):
        raise DatasetError(
            source, "detections must be a COCO results list [{image_id, category_id, bbox, score}]"
        )
    label_of = {int(c): i for i, c in enumerate(category_ids)}
    try:
        image_ids = np.asarray([int(r["image_id"]) for r in results], np.int64)
        categories = [int(r["category_id"]) for r in results]
        bboxes = [r["bbox"] for r in results]
        scores = np.asarray([float(r["score"]) for r in results], np.float64)
        odd = next((i for i, b in enumerate(bboxes) if not isinstance(b, (list, tuple)) or len(b) != 4), None)
        xywh = np.asarray(bboxes if odd is None else [], np.float64).reshape(-1, 4)
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(source, f"malformed COCO results entry ({type(err).__name__}: {err})") from None
    if odd is not None:  # reshape(-1, 4) would have turned 8 numbers into two boxes
        raise DatasetError(source, f"entry {odd}: bbox is not 4 numbers [x, y, width, height]")
    negative = np.flatnonzero((xywh[:, 2] < 0) | (xywh[:, 3] < 0))
    if negative.size:  # inverted boxes give meaningless IoUs; a zero size is fine (overlaps nothing)
        first = int(negative[0])
        more = f" ({negative.size} entries in all)" if negative.size > 1 else ""
        raise DatasetError(
            source, f"entry {first}: bbox {bboxes[first]} has a negative width or height{more}"
        )
    unknown = sorted(set(categories) - set(label_of))
    if unknown:
        raise DatasetError(
            source, f"unknown category id(s) {unknown[:5]} (ground truth has {sorted(label_of)})"
        )
    labels = np.asarray([label_of[c] for c in categories], np.int64)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    try:
        check_detections(boxes, scores, labels, len(category_ids), str(source))
    except ValueError as err:
        raise DatasetError(source, str(err).split(": ", 1)[-1]) from None
    return DetectionArrays(image_ids, boxes, scores, labels)
