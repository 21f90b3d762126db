"""``coco``: pycocotools' COCOeval, untouched, plus per-class AP read from its precision array.

The headline numbers are COCOeval's own ``stats`` (AP, AP50, AP75, APs, APm, APl, AR1, AR10,
AR100, ARs, ARm, ARl); ``mean_ap`` is ``stats[0]`` (AP at IoU .50:.05:.95). Per-class AP averages
``precision[:, :, k, area=all, maxDets=100]`` over valid entries, the way ``summarize`` does for
all classes; the per-class PR curve is the IoU=0.50 slice on COCO's 101 recall points.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.cocoeval import COCOeval

from detect.datasets.coco import coco_from_dict
from detect.evaluation.arrays import DetectionArrays
from detect.evaluation.result import DetectionEvalResult

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco_results(dets: DetectionArrays, category_ids: list[int]) -> list[dict]:
    """Arrays (xyxy, labels) to a COCO results list (xywh, category ids)."""
    cats = np.asarray(category_ids, np.int64)[dets.labels]
    xywh = np.concatenate([dets.boxes[:, :2], dets.boxes[:, 2:] - dets.boxes[:, :2]], axis=1)
    return [
        {"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in box], "score": float(s)}
        for i, c, box, s in zip(dets.image_ids, cats, xywh, dets.scores, strict=True)
    ]


def evaluate_coco(
    gt_coco: dict,
    results: list[dict],
    class_names: list[str],
    category_ids: list[int],
    image_ids: list[int] | None = None,
) -> DetectionEvalResult:
    """Run COCOeval (bbox) on a COCO ground-truth dict and a COCO results list.

    ``image_ids`` restricts the evaluation (default: every image of ``gt_coco``, as pycocotools does).
    """
    cocoGt = coco_from_dict(gt_coco)  # noqa: N806 (pycocotools' names)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if results:
            cocoDt = cocoGt.loadRes(copy.deepcopy(results))  # noqa: N806 (loadRes edits its input)
        else:  # loadRes cannot take an empty list
            empty = {"images": gt_coco["images"], "categories": gt_coco["categories"], "annotations": []}
            cocoDt = coco_from_dict(empty)  # noqa: N806
        evaluator = COCOeval(cocoGt, cocoDt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    cat_index = {int(c): k for k, c in enumerate(evaluator.params.catIds)}
    aps, curves, positives, counts = [], [], [], []
    det_cats = np.asarray([r["category_id"] for r in results], np.int64)
    for cat in category_ids:
        k = cat_index.get(int(cat))
        per_class = precision[:, :, k, 0, -1] if k is not None else np.full((1, 1), -1.0)
        valid = per_class[per_class > -1]
        aps.append(float(np.mean(valid)) if valid.size else float("nan"))
        at_50 = per_class[0] if k is not None else np.zeros(0)
        keep = at_50 > -1
        curves.append(
            (np.asarray(evaluator.params.recThrs)[keep] if k is not None else np.zeros(0), at_50[keep])
        )
        anns = cocoGt.getAnnIds(catIds=[int(cat)], imgIds=evaluator.params.imgIds)
        positives.append(sum(1 for a in cocoGt.loadAnns(anns) if not a.get("iscrowd", 0)))
        counts.append(int((det_cats == int(cat)).sum()))
    stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats, strict=True)}
    stats["mAP"] = stats["AP"]
    return DetectionEvalResult(
        metric="coco",
        class_names=list(class_names),
        ap=aps,
        num_positives=positives,
        num_detections=counts,
        mean_ap=stats["AP"],
        curves=curves,
        stats=stats,
        summary_text=summary.getvalue().rstrip(),
    )
