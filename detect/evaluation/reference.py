"""A straightforward per-class, per-detection Python transcription of the devkits' loops.

Used only as the reference the vectorised ``pascal.py`` is tested and benchmarked against: plain
lists and scalars, the loop structure of VOCevaldet.m / eval_det.m, the AP integration of
VOCap.m and VOCevaldet.m's 11-point loop. Same ranking convention as ``pascal.py`` (stable sort
by image id, then by descending score).
"""

from __future__ import annotations

import numpy as np

from detect.evaluation.ap import VOC07_RECALL_POINTS
from detect.evaluation.arrays import DetectionArrays, GroundTruthArrays


def _iou(a: list[float], b: list[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def _ap_all_point(recall: list[float], precision: list[float]) -> float:
    mrec = [0.0, *recall, 1.0]
    mpre = [0.0, *precision, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def _ap_11_point(recall: list[float], precision: list[float]) -> float:
    ap = 0.0
    for t in VOC07_RECALL_POINTS:
        reached = [p for r, p in zip(recall, precision, strict=True) if r >= t]
        ap = ap + (max(reached) if reached else 0.0) / 11
    return ap


def reference_pascal_ap(
    gt: GroundTruthArrays, dets: DetectionArrays, metric: str, iou_threshold: float = 0.5
) -> list[float]:
    """Per-class AP (NaN without positives) for ``voc07`` / ``voc`` / ``ilsvrc``, by plain loops."""
    order = np.argsort(dets.image_ids, kind="stable")
    det_rows = [
        (int(dets.image_ids[i]), int(dets.labels[i]), float(dets.scores[i]), dets.boxes[i].tolist())
        for i in order
    ]
    dets_of_class: dict[int, list[tuple[int, int, float, list[float]]]] = {}
    for row in det_rows:
        dets_of_class.setdefault(row[1], []).append(row)
    objects_of_class: dict[int, dict[int, list[tuple[list[float], bool, float]]]] = {}
    for k in range(len(gt.labels)):
        box = gt.boxes[k].tolist()
        w, h = box[2] - box[0], box[3] - box[1]
        threshold = min(iou_threshold, w * h / ((w + 10) * (h + 10))) if metric == "ilsvrc" else iou_threshold
        per_image = objects_of_class.setdefault(int(gt.labels[k]), {})
        per_image.setdefault(int(gt.box_image_ids[k]), []).append((box, bool(gt.difficult[k]), threshold))
    aps = []
    for c in range(gt.num_classes):
        objects = objects_of_class.get(c, {})
        npos = sum(not difficult for objs in objects.values() for _, difficult, _ in objs)
        if npos == 0:
            aps.append(float("nan"))
            continue
        class_dets = sorted(dets_of_class.get(c, []), key=lambda row: -row[2])  # stable
        taken = {image: [False] * len(objs) for image, objs in objects.items()}
        tp, fp = [], []
        for image, _, _, box in class_dets:
            objs = objects.get(image, [])
            best, best_k = -1.0, -1
            for k, (gt_box, _, threshold) in enumerate(objs):
                overlap = _iou(box, gt_box)
                if metric == "ilsvrc":  # best untaken object passing its own threshold
                    if not taken[image][k] and overlap >= threshold and overlap > best:
                        best, best_k = overlap, k
                elif overlap > best:  # VOC: best object overall, threshold checked afterwards
                    best, best_k = overlap, k
            if best_k >= 0 and best >= objs[best_k][2]:
                if objs[best_k][1]:  # difficult: neither
                    tp.append(0)
                    fp.append(0)
                elif not taken[image][best_k]:
                    taken[image][best_k] = True
                    tp.append(1)
                    fp.append(0)
                else:
                    tp.append(0)
                    fp.append(1)
            else:
                tp.append(0)
                fp.append(1)
        recall, precision, tp_sum, fp_sum = [], [], 0, 0
        for t, f in zip(tp, fp, strict=True):
            tp_sum += t
            fp_sum += f
            recall.append(tp_sum / npos)
            precision.append(tp_sum / (tp_sum + fp_sum) if tp_sum + fp_sum else 0.0)
        aps.append(_ap_11_point(recall, precision) if metric == "voc07" else _ap_all_point(recall, precision))
    return aps
